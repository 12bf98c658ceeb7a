"""Official EfficientSAM state_dict files (`.pt`, `.pt.zip`, `.npz`), read without trusting them.

No torch is needed and no code from the file runs: the pickle of a `.pt` may name only tensors,
storages and plain containers, each load gets objects of its own (a file cannot change what a
later load accepts), and pickle nesting is capped before unpickling. Everything the file
claims is checked before anything is allocated: every tensor's size, stride and offset against
its storage, every storage against the size of its zip record, every `.npy` header against the
bytes of its entry, and decompressed sizes against `MAX_UNCOMPRESSED_BYTES`. Damage (CRC,
truncation, bad headers) is reported by file and key as a `CheckpointError`.

    with open_state_dict("efficient_sam_vitt.pt") as f:
        f.tensors          # {key: TensorInfo(shape, dtype)}: what the file claims; nothing read
        arrays = f.read()  # {key: np.ndarray} in native byte order
"""

from __future__ import annotations

import collections
import dataclasses
import io
import math
import os
import pathlib
import pickle
import pickletools
import re
import sys
import zipfile
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

# The official ViT-S weights are 106 MB of float32; 1 GiB leaves room for float64 and extras.
MAX_UNCOMPRESSED_BYTES = 1 << 30
MAX_PICKLE_BYTES = 1 << 20  # the official data.pkl holds about 36 KB
MAX_PICKLE_DEPTH = 64  # nesting of containers and calls; a state_dict needs about 10
MAX_NDIM = 8
_MAX_INT64 = 2**63 - 1
_MAX_NPY_HEADER = 12 + 10_000 + 64
_RECORD_KEY = re.compile(r"[0-9A-Za-z_]{1,64}")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that asks for something other than tensors and plain containers."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """What a file claims about one tensor, checked against its data but not yet read."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def printable(text: Any, limit: int = 200) -> str:
    """An untrusted name for a one-line message: shortened, escaped when not printable."""
    text = str(text)
    if len(text) > limit:
        text = text[:limit] + "..."
    return text if text.isprintable() else ascii(text)


def _one_line(exc: BaseException) -> str:
    return printable(" ".join(str(exc).split()) or type(exc).__name__, 300)


def _bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


# ----------------------------------------------------------------------------- zip records


class _Archive:
    """A zip whose records are read whole, with sizes checked and decompression capped."""

    def __init__(self, zf: zipfile.ZipFile, source: str, budget: list[int]):
        self.zf = zf
        self.source = source
        self.names = set(zf.namelist())
        self._budget = budget  # [bytes still allowed to decompress], shared by nested archives

    def size(self, name: str) -> int:
        return self.zf.getinfo(name).file_size

    def read(self, name: str, limit: int, what: str) -> bytes:
        """The whole record `name`, refused when it declares more than `limit` bytes."""
        info = self.zf.getinfo(name)
        if info.file_size > limit:
            raise CheckpointError(
                f"{self.source}: {what} declares {_bytes(info.file_size)} uncompressed, over the "
                f"reader's limit of {_bytes(limit)}")
        if info.file_size > self._budget[0]:
            raise CheckpointError(
                f"{self.source}: reading {what} would decompress more than "
                f"{_bytes(MAX_UNCOMPRESSED_BYTES)} in all (MAX_UNCOMPRESSED_BYTES)")
        self._budget[0] -= info.file_size
        try:
            with self.zf.open(info) as stream:
                data = stream.read(info.file_size)
                extra = stream.read(1)  # reaching the end checks the CRC
        except MemoryError:
            raise
        except Exception as exc:
            raise CheckpointError(
                f"{self.source}: {what} is damaged ({_one_line(exc)}); the file is corrupt or "
                "truncated, copy or download it again") from None
        if len(data) != info.file_size or extra:
            raise CheckpointError(
                f"{self.source}: {what} is damaged (holds {len(data) + len(extra)} bytes, its "
                f"zip entry says {info.file_size}); copy or download the file again")
        return data

    def close(self) -> None:
        self.zf.close()


# ----------------------------------------------------------------------------- pickle


def check_pickle_depth(data: bytes, where: str, limit: int = MAX_PICKLE_DEPTH) -> None:
    """Refuses a pickle whose containers or calls nest deeper than `limit`, without running it.

    Hashing a deeply nested tuple (a dict key) overflows the C stack, so this runs first. Each
    value on the simulated stack carries an upper bound of its nesting.
    """
    stack: list[int] = []
    marks: list[int] = []
    memo: dict[Any, int] = {}
    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1] if stack else 0
                continue
            if name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(arg, 0))
                continue
            if name == "DUP":
                stack.append(stack[-1] if stack else 0)
                continue
            if name == "MARK":
                marks.append(len(stack))
                continue
            before = op.stack_before
            consumed: list[int] = []
            if pickletools.markobject in before:
                start = marks.pop() if marks else 0
                consumed, stack[start:] = stack[start:], []
                n_fixed = before.index(pickletools.markobject)
            else:
                n_fixed = len(before)
            n_fixed = min(n_fixed, len(stack))
            if n_fixed:
                consumed, stack[-n_fixed:] = stack[-n_fixed:] + consumed, []
            if not op.stack_after:
                continue
            if name in ("APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"):
                depth = max(consumed[0], 1 + max(consumed[1:], default=0))  # grows in place
            else:
                depth = 1 + max(consumed) if consumed else 0
            if depth > limit:
                raise CheckpointError(
                    f"{where}: the pickle nests deeper than {limit} levels (MAX_PICKLE_DEPTH); "
                    "a state_dict needs about 10")
            stack.append(depth)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{where}: corrupt pickle ({_one_line(exc)})") from None


class _ModifyRefused(Exception):
    """A pickle's BUILD on one of the reader's own objects."""


class _Refusing:
    """Objects a pickle can reach: no attributes to set, no state to restore."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise _ModifyRefused


class _StorageType(_Refusing):
    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: np.dtype):
        self.name, self.dtype = name, dtype


class _Storage(_Refusing):
    __slots__ = ("key", "dtype", "numel")

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef(_Refusing):
    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage: Any, offset: Any, size: Any, stride: Any):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class _Function(_Refusing):
    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


def _storage_dtypes() -> dict[str, np.dtype]:
    import ml_dtypes

    return {
        "FloatStorage": np.dtype(np.float32), "DoubleStorage": np.dtype(np.float64),
        "HalfStorage": np.dtype(np.float16), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
        "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32),
        "ShortStorage": np.dtype(np.int16), "CharStorage": np.dtype(np.int8),
        "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
    }


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *unused: Any) -> Any:
    return _TensorRef(storage, offset, size, stride)  # checked once its key is known


def _rebuild_parameter(data: Any, *unused: Any) -> Any:
    return data


class _TensorUnpickler(pickle.Unpickler):
    """Builds `_TensorRef`s for tensors and refuses every global outside a fresh allow-list."""

    def __init__(self, data: bytes, where: str):
        super().__init__(io.BytesIO(data))
        self._where = where
        self._types = {name: _StorageType(name, dtype)
                       for name, dtype in _storage_dtypes().items()}
        self._globals: dict[tuple[str, str], Any] = {
            ("collections", "OrderedDict"): _Function(collections.OrderedDict),
            ("torch._utils", "_rebuild_tensor_v2"): _Function(_rebuild_tensor),
            ("torch._utils", "_rebuild_tensor"): _Function(_rebuild_tensor),
            ("torch._utils", "_rebuild_parameter"): _Function(_rebuild_parameter),
            **{("torch", name): t for name, t in self._types.items()},
        }
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._globals[(module, name)]
        except (KeyError, TypeError):
            raise UnsafeCheckpointError(
                f"{self._where}: refusing to load '{printable(module)}.{printable(name)}' from "
                "the checkpoint; only tensors and plain containers are accepted (the file may "
                "be malicious or not a weights file)") from None

    def persistent_load(self, pid: Any) -> _Storage:
        if not (type(pid) is tuple and len(pid) == 5 and type(pid[0]) is str
                and pid[0] == "storage" and any(pid[1] is t for t in self._types.values())):
            raise CheckpointError(
                f"{self._where}: unexpected persistent id (expected a tensor storage)")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if type(key) is not str or not _RECORD_KEY.fullmatch(key):
            raise CheckpointError(f"{self._where}: a storage key is not a record name")
        if type(numel) is not int or not 0 <= numel <= _MAX_INT64:
            raise CheckpointError(f"{self._where}: storage data/{key} has an invalid size")
        known = self.storages.setdefault(key, _Storage(key, storage_type.dtype, numel))
        if known.dtype != storage_type.dtype or known.numel != numel:
            raise CheckpointError(
                f"{self._where}: storage data/{key} is declared twice with different types or "
                "sizes")
        return known


# ----------------------------------------------------------------------------- state dicts


class StateDictFile:
    """An opened state_dict file: `tensors` (checked claims) now, `read()` the data."""

    def __init__(self, source: str, tensors: dict[str, TensorInfo],
                 reader: Callable[[Iterable[str]], dict[str, np.ndarray]],
                 closers: list[_Archive]):
        self.source = source
        self.tensors = tensors
        self._reader = reader
        self._closers = closers

    def read(self, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """{key: array} for `keys` (default all), each C-contiguous in native byte order."""
        keys = list(self.tensors if keys is None else keys)
        total = sum(self.tensors[k].nbytes for k in keys)
        if total > MAX_UNCOMPRESSED_BYTES:
            raise CheckpointError(
                f"{self.source}: the tensors hold {_bytes(total)}, over the reader's limit of "
                f"{_bytes(MAX_UNCOMPRESSED_BYTES)} (MAX_UNCOMPRESSED_BYTES)")
        return self._reader(keys)

    def close(self) -> None:
        for archive in self._closers:
            archive.close()

    def __enter__(self) -> StateDictFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_state_dict(path: str | os.PathLike) -> StateDictFile:
    """Opens an official `.pt` (torch >= 1.6 zip), a zip holding one `.pt`, or a `.npz`.

    Reads the zip directory and the pickle or `.npy` headers, and checks every claim they make;
    tensor data is read by `StateDictFile.read`. Raises CheckpointError naming file and key.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise CheckpointError(
            f"{path}: not a zip archive or a truncated one ({_one_line(exc)}); the official "
            ".pt (torch.save's zip format, torch >= 1.6), .pt.zip and .npz are read") from None
    archive = _Archive(zf, str(path), [MAX_UNCOMPRESSED_BYTES])
    try:
        return _open_archive(archive, nested_ok=True)
    except BaseException:
        archive.close()
        raise


def _open_archive(archive: _Archive, nested_ok: bool) -> StateDictFile:
    names = archive.zf.namelist()
    pickles = [n for n in names if n == "data.pkl" or (n.endswith("/data.pkl")
                                                        and n.count("/") == 1)]
    if len(pickles) > 1:
        raise CheckpointError(f"{archive.source}: several data.pkl records in one archive")
    if pickles:
        return _open_torch(archive, pickles[0])
    if any(n.endswith(".npy") for n in names):
        return _open_npz(archive)
    inner = [n for n in names if n.endswith((".pt", ".pth"))]
    if nested_ok and len(inner) == 1:  # ViT-S is distributed as a zip holding the .pt
        data = archive.read(inner[0], MAX_UNCOMPRESSED_BYTES, f"the entry {printable(inner[0])}")
        source = f"{archive.source}:{printable(inner[0])}"
        try:
            zf = zipfile.ZipFile(io.BytesIO(data))
        except (zipfile.BadZipFile, ValueError, EOFError) as exc:
            raise CheckpointError(f"{source}: not a zip archive ({_one_line(exc)})") from None
        nested = _open_archive(_Archive(zf, source, archive._budget), nested_ok=False)
        nested._closers.append(archive)
        return nested
    raise CheckpointError(
        f"{archive.source}: neither a torch.save checkpoint (no data.pkl) nor a .npz of arrays"
        + (" nor a zip holding one .pt" if nested_ok else ""))


def _open_torch(archive: _Archive, pkl: str) -> StateDictFile:
    source, prefix = archive.source, pkl[: -len("data.pkl")]
    where = f"{source}: {printable(pkl)}"
    file_order = "little"
    if prefix + "byteorder" in archive.names:
        raw = archive.read(prefix + "byteorder", 16, "the byteorder record").strip()
        if raw not in (b"little", b"big"):
            said = printable(raw.decode("latin-1"))
            raise CheckpointError(f"{source}: byteorder record says {said}, not 'little' or 'big'")
        file_order = raw.decode()
    data = archive.read(pkl, MAX_PICKLE_BYTES, printable(pkl))
    check_pickle_depth(data, where)
    unpickler = _TensorUnpickler(data, where)
    try:
        obj = unpickler.load()
    except (CheckpointError, MemoryError):
        raise
    except _ModifyRefused:
        raise UnsafeCheckpointError(
            f"{where}: the pickle tries to set the state of a tensor, storage or function; "
            "refused (the file may be malicious)") from None
    except Exception as exc:  # a truncated or corrupt pickle
        raise CheckpointError(f"{where}: corrupt checkpoint pickle ({_one_line(exc)})") from None
    refs = _tensor_refs(obj, source)
    tensors = {key: _check_tensor(ref, f"{source}: tensor '{key}'") for key, ref in refs.items()}
    first_user = {}
    for key, ref in refs.items():
        first_user.setdefault(ref.storage.key, key)
    storages = unpickler.storages.values()
    for storage in storages:
        if storage.key not in first_user:
            continue  # a storage no tensor of the state_dict uses is never read
        record = f"{prefix}data/{storage.key}"
        what = f"record data/{storage.key} (tensor '{first_user[storage.key]}')"
        if record not in archive.names:
            raise CheckpointError(f"{source}: {what} is missing from the archive")
        want = storage.numel * storage.dtype.itemsize
        if archive.size(record) != want:
            raise CheckpointError(
                f"{source}: {what} holds {archive.size(record)} bytes, the pickle declares "
                f"{storage.numel} x {storage.dtype} = {want} bytes; the file is damaged")
    total = sum(s.numel * s.dtype.itemsize for s in storages if s.key in first_user)
    if total > MAX_UNCOMPRESSED_BYTES:
        raise CheckpointError(
            f"{source}: the storages hold {_bytes(total)}, over the reader's limit of "
            f"{_bytes(MAX_UNCOMPRESSED_BYTES)} (MAX_UNCOMPRESSED_BYTES)")
    swap = file_order != sys.byteorder

    def read(keys: Iterable[str]) -> dict[str, np.ndarray]:
        keys = list(keys)
        uses = collections.Counter(refs[k].storage.key for k in keys)
        cache: dict[str, bytes] = {}
        out = {}
        for key in keys:
            ref, info = refs[key], tensors[key]
            storage = ref.storage
            if storage.key not in cache:
                cache[storage.key] = archive.read(
                    f"{prefix}data/{storage.key}", storage.numel * storage.dtype.itemsize,
                    f"record data/{storage.key} (tensor '{key}')")
            flat = np.frombuffer(cache[storage.key], storage.dtype)
            itemsize = storage.dtype.itemsize
            view = np.lib.stride_tricks.as_strided(  # in bounds: checked by _check_tensor
                flat[ref.offset:], shape=info.shape, strides=[s * itemsize for s in ref.stride])
            value = np.array(view, order="C")
            if swap and itemsize > 1:
                value.byteswap(inplace=True)
            out[key] = value
            uses[storage.key] -= 1
            if not uses[storage.key]:
                del cache[storage.key]
        return out

    return StateDictFile(source, tensors, read, [archive])


def _tensor_refs(obj: Any, source: str) -> dict[str, _TensorRef]:
    """{"model": state_dict} or a state_dict -> {key: tensor}; anything else is refused."""
    if isinstance(obj, dict) and "model" in obj:
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{source}: expected {{'model': state_dict}} or a state_dict "
                              "of tensors")
    for key, value in obj.items():
        if type(key) is not str or not key.isprintable() or len(key) > 300:
            raise CheckpointError(f"{source}: a state_dict key is not a printable name")
        if type(value) is not _TensorRef:
            raise CheckpointError(
                f"{source}: entry '{key}' is a {type(value).__name__}, not a tensor")
    return dict(obj)


def _int_tuple(value: Any, n: int | None = None) -> tuple[int, ...] | None:
    if type(value) not in (tuple, list) or len(value) > MAX_NDIM or (
            n is not None and len(value) != n):
        return None
    if not all(type(v) is int and 0 <= v <= _MAX_INT64 for v in value):
        return None
    return tuple(value)


def _check_tensor(ref: _TensorRef, where: str) -> TensorInfo:
    """A tensor's size, stride and offset must stay inside its storage and not repeat it."""
    storage = ref.storage
    if type(storage) is not _Storage:
        raise CheckpointError(f"{where}: has no storage")
    size = _int_tuple(ref.size)
    if size is None:
        raise CheckpointError(f"{where}: size is not a tuple of at most {MAX_NDIM} "
                              "non-negative integers")
    stride = _int_tuple(ref.stride, len(size))
    if stride is None:
        raise CheckpointError(f"{where}: stride is not {len(size)} non-negative integers")
    offset = ref.offset
    if type(offset) is not int or not 0 <= offset <= _MAX_INT64:
        raise CheckpointError(f"{where}: storage offset is not a non-negative integer")
    numel = math.prod(size)
    if numel:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= storage.numel:
            raise CheckpointError(
                f"{where}: size {size}, stride {stride} and offset {offset} reach element "
                f"{last} of storage data/{storage.key}, which holds {storage.numel}")
        if numel > last - offset + 1:
            raise CheckpointError(
                f"{where}: size {size} with stride {stride} repeats elements of its storage "
                f"({numel} elements from a span of {last - offset + 1})")
    return TensorInfo(size, storage.dtype)


def _open_npz(archive: _Archive) -> StateDictFile:
    source = archive.source
    headers: dict[str, tuple[str, int, np.dtype, bool]] = {}
    tensors: dict[str, TensorInfo] = {}
    for name in archive.zf.namelist():
        where = f"{source}: entry '{printable(name)}'"
        if not name.endswith(".npy"):
            raise CheckpointError(f"{where} is not a .npy array")
        key = name[: -len(".npy")]
        if not key.isprintable() or len(key) > 300:
            raise CheckpointError(f"{where}: the name is not a printable key")
        shape, fortran, dtype, offset = _npy_header(archive, name, where)
        nbytes = math.prod(shape) * dtype.itemsize
        held = archive.size(name) - offset
        if nbytes != held:
            raise CheckpointError(
                f"{where}: the header claims shape {shape} of {dtype} ({nbytes} bytes) but the "
                f"entry holds {held} bytes of data")
        headers[key] = (name, offset, dtype, fortran)
        tensors[key] = TensorInfo(shape, dtype.newbyteorder("="))

    def read(keys: Iterable[str]) -> dict[str, np.ndarray]:
        out = {}
        for key in keys:
            name, offset, dtype, fortran = headers[key]
            raw = archive.read(name, archive.size(name), f"entry '{printable(name)}'")
            shape = tensors[key].shape
            flat = np.frombuffer(raw, dtype, count=math.prod(shape), offset=offset)
            value = flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)
            out[key] = np.array(value, dtype=dtype.newbyteorder("="), order="C")
        return out

    return StateDictFile(source, tensors, read, [archive])


def _npy_header(archive: _Archive, name: str, where: str
                ) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, data offset) of a .npy entry, read from its first bytes."""
    fmt = np.lib.format
    try:
        with archive.zf.open(name) as stream:  # numpy reads a header up to 10,000 characters
            head = io.BytesIO(stream.read(_MAX_NPY_HEADER))
        version = fmt.read_magic(head)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(head)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(head)
        else:
            raise CheckpointError(f"{where}: unsupported .npy format version {version}")
        offset = head.tell()
    except (CheckpointError, MemoryError):
        raise
    except Exception as exc:
        raise CheckpointError(f"{where}: not a valid .npy header ({_one_line(exc)})") from None
    if dtype.hasobject:
        raise CheckpointError(f"{where}: holds Python objects; a .npz is read without pickles")
    if dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in "biuf":
        raise CheckpointError(f"{where}: unsupported dtype {dtype}; numbers only")
    checked = _int_tuple(shape)
    if checked is None:
        raise CheckpointError(f"{where}: shape {printable(shape)} is not at most {MAX_NDIM} "
                              "non-negative integers")
    return checked, bool(fortran), dtype, offset
