"""On-disk cache of frozen-encoder image embeddings: one bfloat16 [E, E, D] per example.

Written once per data set split by `embed.py` (each process its own shards), then read by the
input pipeline of every run. A cache folder holds:

    cache.json                        format, fingerprint (encoder weights + preprocessing),
                                      embedding shape [E, E, D]
    <source>/<split>/split.json       examples N, examples per shard S, the source it was made of
    <source>/<split>/shard-00003.npy  uint16 [n, E, E, D]: the bfloat16 bits of examples
                                      [3 S, 3 S + n), n = min(S, N - 3 S)
    <source>/<split>/shard-00003.json its first example, count, image ids and payload CRC-32

Keys are (source, split, example index in the split). A shard is written once its .json is
there: both files are written under temporary names and renamed into place, so an interrupted
writer leaves no half shard and a rerun writes only what is missing. Reading checks each
claim against the files (JSON types and sizes, the .npy header, the file size, the payload
checksum on first use in a process) and never allocates beyond what they claim; a cache made
with other weights or preprocessing is refused. Every failure is a `CacheError` (a
ValueError) whose message names the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import ml_dtypes
import numpy as np

from sameo_jax.preprocessing import PIXEL_MEAN, PIXEL_STD

FORMAT = "sameo-embedding-cache"
VERSION = 1
CACHE_FILE = "cache.json"
SPLIT_FILE = "split.json"
MAX_JSON_BYTES = 1 << 20  # every JSON file of a cache is far smaller
_NAME_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_SHARD_JSON = re.compile(r"^shard-(\d{5,9})\.json$")
# Encoder structure fields: with equal weights they fix the function the cache holds.
_ENCODER_FIELDS = ("img_size", "patch_size", "encoder_width", "encoder_depth", "encoder_heads",
                   "mlp_ratio", "pos_embed_grid", "embed_dim")
RESIZE = "bilinear, align_corners=False, no antialias, aspect not kept, float32 from uint8"


class CacheError(ValueError):
    """A cache file that is missing, malformed, truncated, corrupt or made for other inputs."""


def params_digest(params: Any) -> str:
    """SHA-256 over a parameter tree's paths, dtypes, shapes and values (hex)."""
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            leaf = leaf.addressable_data(0)  # replicated: every process holds all of it
        value = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def fingerprint(model_cfg: Any, encoder_params: Any) -> dict[str, Any]:
    """What the embeddings depend on: the encoder's weights (digest) and structure (fields of
    the EfficientSamConfig `model_cfg`), and the preprocessing (model frame, resize
    convention, normalisation)."""
    config = dataclasses.asdict(model_cfg)
    return {
        "encoder_weights_sha256": params_digest(encoder_params),
        "encoder": {k: config[k] for k in _ENCODER_FIELDS},
        "preprocessing": {
            "image_size": model_cfg.img_size,
            "resize": RESIZE,
            "pixel_mean": [float(x) for x in PIXEL_MEAN],
            "pixel_std": [float(x) for x in PIXEL_STD],
        },
    }


def _differences(cached: Any, wanted: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two JSON trees differ, each with both values."""
    if isinstance(cached, dict) and isinstance(wanted, dict):
        out = []
        for key in sorted(set(cached) | set(wanted)):
            out += _differences(cached.get(key), wanted.get(key), f"{prefix}{key}.")
        return out
    if cached == wanted:
        return []
    return [f"{prefix.rstrip('.')} (cache: {cached}, now: {wanted})"]


def _read_json(path: pathlib.Path, what: str) -> dict[str, Any]:
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise CacheError(f"{path}: {size} bytes, more than any {what} holds")
        with open(path, "rb") as f:
            data = json.loads(f.read(MAX_JSON_BYTES + 1))
    except FileNotFoundError:
        raise CacheError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"{path}: not a readable {what} ({e})") from None
    if not isinstance(data, dict):
        raise CacheError(f"{path}: expected a JSON object ({what})")
    return data


def _write_atomic(path: pathlib.Path, write) -> None:
    """Writes `path` through `write(file)` under a temporary name, then renames it in place."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(path: pathlib.Path, data: dict[str, Any]) -> None:
    _write_atomic(path, lambda f: f.write(json.dumps(data, indent=1).encode()))


def _int(data: dict[str, Any], key: str, path: pathlib.Path, low: int = 0) -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise CacheError(f"{path}: {key!r} must be an integer >= {low}, got {value!r}")
    return value


def _split_dir(root: pathlib.Path, source: str, split: str) -> pathlib.Path:
    parts = [*source.split("/"), split]
    if not all(_NAME_PART.match(p) for p in parts):
        raise CacheError(f"{root}: source {source!r} / split {split!r} is not a plain name")
    return root.joinpath(*parts)


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def _written_shards(directory: pathlib.Path) -> set[int]:
    """Indices of the shards whose .json is in `directory` (what is there, not what is
    claimed)."""
    names = (_SHARD_JSON.match(p.name) for p in directory.iterdir())
    return {int(m.group(1)) for m in names if m}


class EmbeddingStore:
    """An embedding cache folder (see the module docstring).

    `EmbeddingStore(path, fingerprint)` opens an existing cache and refuses one made for
    another fingerprint (None: no check); `EmbeddingStore.create(...)` opens or starts one.
    """

    def __init__(self, path: str | os.PathLike, fingerprint: dict[str, Any] | None = None):
        self.path = pathlib.Path(path)
        meta_path = self.path / CACHE_FILE
        if not self.path.is_dir():
            raise CacheError(f"{self.path}: no embedding cache here (write one with embed.py)")
        meta = _read_json(meta_path, "embedding cache description")
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise CacheError(f"{meta_path}: not a version-{VERSION} {FORMAT} file "
                             f"(format {meta.get('format')!r}, version {meta.get('version')!r})")
        shape = meta.get("embedding_shape")
        if not (isinstance(shape, list) and len(shape) == 3
                and all(isinstance(x, int) and not isinstance(x, bool) and 0 < x <= 1 << 16
                        for x in shape)):
            raise CacheError(f"{meta_path}: 'embedding_shape' must be 3 positive integers, "
                             f"got {shape!r}")
        if not isinstance(meta.get("fingerprint"), dict):
            raise CacheError(f"{meta_path}: no 'fingerprint' object")
        self.embedding_shape: tuple[int, int, int] = tuple(shape)
        self.fingerprint: dict[str, Any] = meta["fingerprint"]
        if fingerprint is not None:
            self.check(fingerprint)

    def check(self, fingerprint: dict[str, Any]) -> None:
        """Raises CacheError naming what differs when the cache was made for other inputs."""
        diff = _differences(self.fingerprint, json.loads(json.dumps(fingerprint)))
        if diff:
            what = ("other encoder weights" if any(d.startswith("encoder_weights") for d in diff)
                    else "another encoder or preprocessing")
            raise CacheError(f"embedding cache {self.path} was made with {what}: "
                             f"{'; '.join(diff)}")

    @classmethod
    def create(cls, path: str | os.PathLike, fingerprint: dict[str, Any],
               embedding_shape: Sequence[int]) -> EmbeddingStore:
        """Opens the cache at `path` (it must match), or starts an empty one there."""
        path = pathlib.Path(path)
        meta = {"format": FORMAT, "version": VERSION,
                "embedding_shape": [int(x) for x in embedding_shape],
                "fingerprint": fingerprint}
        if not (path / CACHE_FILE).exists():
            if path.is_dir() and any(p.name != CACHE_FILE for p in path.iterdir()):
                raise CacheError(f"{path}: a non-empty folder without {CACHE_FILE}; give an "
                                 "empty or new folder for the embedding cache")
            path.mkdir(parents=True, exist_ok=True)
            _write_json(path / CACHE_FILE, meta)  # several processes write the same bytes
        store = cls(path, fingerprint)
        if store.embedding_shape != tuple(meta["embedding_shape"]):
            raise CacheError(f"{path / CACHE_FILE}: embeddings {store.embedding_shape}, the "
                             f"encoder gives {tuple(meta['embedding_shape'])}")
        return store

    def has_split(self, source: str, split: str) -> bool:
        return (_split_dir(self.path, source, split) / SPLIT_FILE).exists()

    def writer(self, source: str, split: str, num_examples: int, shard_size: int,
               description: str) -> SplitWriter:
        """Writes (source, split); `description` names the data it is made of (checked on
        reading and on resuming)."""
        return SplitWriter(self, source, split, num_examples, shard_size, description)

    def reader(self, source: str, split: str, description: str | None = None) -> SplitReader:
        """Reads a complete (source, split); `description` (if given) must match the writer's."""
        return SplitReader(self, source, split, description)


@dataclasses.dataclass(frozen=True)
class _Layout:
    """A split's shards: shard k holds examples [k * shard_size, ...)."""

    num_examples: int
    shard_size: int

    @property
    def num_shards(self) -> int:
        return -(-self.num_examples // self.shard_size)

    def count(self, k: int) -> int:
        return min(self.shard_size, self.num_examples - k * self.shard_size)


def _read_layout(directory: pathlib.Path) -> tuple[_Layout, str]:
    path = directory / SPLIT_FILE
    data = _read_json(path, "embedding cache split description")
    layout = _Layout(_int(data, "num_examples", path), _int(data, "shard_size", path, 1))
    description = data.get("source")
    if not isinstance(description, str):
        raise CacheError(f"{path}: 'source' must be a string")
    return layout, description


class SplitWriter:
    """Writes the shards of one (source, split); any subset, in any order, by any process."""

    def __init__(self, store: EmbeddingStore, source: str, split: str, num_examples: int,
                 shard_size: int, description: str):
        self.store = store
        self.directory = _split_dir(store.path, source, split)
        self.layout = _Layout(int(num_examples), int(shard_size))
        if self.layout.shard_size <= 0:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        if (self.directory / SPLIT_FILE).exists():
            layout, made_of = _read_layout(self.directory)
            if layout.num_examples != self.layout.num_examples or made_of != description:
                raise CacheError(
                    f"{self.directory / SPLIT_FILE}: made of {made_of} ({layout.num_examples} "
                    f"examples), the data now is {description} ({num_examples} examples); "
                    "write to another folder or delete this one")
            self.layout = layout  # resume with the shards already chosen
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            _write_json(self.directory / SPLIT_FILE, {
                "num_examples": self.layout.num_examples,
                "shard_size": self.layout.shard_size, "source": description})

    def shard_examples(self, k: int) -> range:
        """The example indices of shard k."""
        start = k * self.layout.shard_size
        return range(start, start + self.layout.count(k))

    def pending(self, process_index: int = 0, process_count: int = 1) -> list[int]:
        """Unwritten shards of this process's share (shard k belongs to k % process_count)."""
        return [k for k in range(process_index, self.layout.num_shards, process_count)
                if not (self.directory / f"{_shard_name(k)}.json").exists()]

    def write(self, k: int, embeddings: np.ndarray, image_ids: Sequence[int]) -> None:
        """Shard k: embeddings [n, E, E, D] (any float dtype; stored as bfloat16) and the
        examples' image ids [n]."""
        n = self.layout.count(k)
        shape = (n, *self.store.embedding_shape)
        if not 0 <= k < self.layout.num_shards or np.shape(embeddings) != shape:
            raise ValueError(f"shard {k}: expected embeddings {shape}, got "
                             f"{np.shape(embeddings)}")
        bits = np.ascontiguousarray(
            np.asarray(embeddings).astype(ml_dtypes.bfloat16)).view(np.uint16)
        bits = bits.astype("<u2", copy=False)
        name = _shard_name(k)
        for stale in self.directory.glob(f"{name}.*.tmp-*"):  # left by an interrupted writer
            stale.unlink(missing_ok=True)
        _write_atomic(self.directory / f"{name}.npy",
                      lambda f: np.lib.format.write_array(f, bits, allow_pickle=False))
        _write_json(self.directory / f"{name}.json", {
            "start": k * self.layout.shard_size, "count": n,
            "image_ids": [int(i) for i in image_ids], "crc32": zlib.crc32(bits)})


class SplitReader:
    """Random access to one complete (source, split): `get(i)` -> bfloat16 [E, E, D].

    Picklable (for worker processes): open shards are not carried along, each process maps
    and checks them on first use.
    """

    dtype = np.dtype(ml_dtypes.bfloat16)

    def __init__(self, store: EmbeddingStore, source: str, split: str,
                 description: str | None = None):
        self.store_path = store.path
        self.embedding_shape = store.embedding_shape
        self.source, self.split = source, split
        self.directory = _split_dir(store.path, source, split)
        if not (self.directory / SPLIT_FILE).exists():
            raise CacheError(f"embedding cache {store.path} has no {source}/{split}: write it "
                             f"with embed.py --out {store.path} --split {split}")
        self.layout, made_of = _read_layout(self.directory)
        if description is not None and made_of != description:
            raise CacheError(f"{self.directory / SPLIT_FILE}: made of {made_of}, the data now "
                             f"is {description}")
        written = {k for k in _written_shards(self.directory) if k < self.layout.num_shards}
        if len(written) < self.layout.num_shards:  # the first gap lies within len(written)
            first = next(k for k in range(len(written) + 1) if k not in written)
            raise CacheError(
                f"{self.directory / SPLIT_FILE}: the cache of {source}/{split} is incomplete "
                f"({self.layout.num_shards - len(written)} of {self.layout.num_shards} shards "
                f"missing, first {_shard_name(first)}); finish it with embed.py --out "
                f"{store.path} --split {split}")
        self._image_ids = np.concatenate(
            [self._shard_ids(k) for k in range(self.layout.num_shards)] or [np.zeros(0)]
        ).astype(np.int64)
        self._open: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": {}}

    def __len__(self) -> int:
        return self.layout.num_examples

    def image_id(self, index: int) -> int:
        """The image id the writer saw at `index` (to check the data has not changed)."""
        return int(self._image_ids[index])

    def get(self, index: int, out: np.ndarray | None = None) -> np.ndarray:
        """Example `index`'s embedding, bfloat16 [E, E, D]: a copy, or written into `out`
        (e.g. a row of a batch) and returned."""
        index = int(index)
        if not 0 <= index < self.layout.num_examples:
            raise IndexError(f"{self.source}/{self.split}: example {index} not in "
                             f"[0, {self.layout.num_examples})")
        k, row = divmod(index, self.layout.shard_size)
        shard = self._open.get(k)
        if shard is None:
            shard = self._open[k] = self._map(k)
        if out is None:
            return np.array(shard[row]).view(ml_dtypes.bfloat16)
        out.view(np.uint16)[...] = shard[row]
        return out

    def _shard_meta(self, k: int) -> tuple[pathlib.Path, dict[str, Any]]:
        path = self.directory / f"{_shard_name(k)}.json"
        meta = _read_json(path, "embedding cache shard description")
        count = self.layout.count(k)
        if (_int(meta, "start", path) != k * self.layout.shard_size
                or _int(meta, "count", path) != count):
            raise CacheError(f"{path}: holds examples from {meta['start']} ({meta['count']}), "
                             f"{SPLIT_FILE} says {k * self.layout.shard_size} ({count})")
        _int(meta, "crc32", path)
        return path, meta

    def _shard_ids(self, k: int) -> np.ndarray:
        path, meta = self._shard_meta(k)
        ids = meta.get("image_ids")
        if not (isinstance(ids, list) and len(ids) == meta["count"]
                and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)):
            raise CacheError(f"{path}: 'image_ids' must be {meta['count']} integers")
        return np.asarray(ids, np.int64)

    def _map(self, k: int) -> np.ndarray:
        """Shard k memory-mapped as uint16 [n, E, E, D], after checking header, size and CRC."""
        meta_path, meta = self._shard_meta(k)
        path = self.directory / f"{_shard_name(k)}.npy"
        shape = (meta["count"], *self.embedding_shape)
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    header = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    header = np.lib.format.read_array_header_2_0(f)
                else:
                    raise ValueError(f"unsupported .npy version {version}")
                offset = f.tell()
                size = os.fstat(f.fileno()).st_size
        except FileNotFoundError:
            raise CacheError(f"{path}: missing (its {meta_path.name} is there)") from None
        except (OSError, ValueError, SyntaxError) as e:
            raise CacheError(f"{path}: not a .npy file ({e})") from None
        got_shape, fortran, dtype = header
        if tuple(got_shape) != shape or fortran or dtype != np.dtype("<u2"):
            raise CacheError(f"{path}: holds {dtype} {tuple(got_shape)}, expected uint16 "
                             f"{shape}")
        expected = offset + int(np.prod(shape)) * 2
        if size != expected:
            raise CacheError(f"{path}: {size} bytes, expected {expected} (truncated or "
                             "damaged; delete it and its .json and rerun embed.py)")
        data = np.memmap(path, dtype="<u2", mode="r", offset=offset, shape=shape)
        if zlib.crc32(data) != meta["crc32"]:
            raise CacheError(f"{path}: contents do not match the checksum in {meta_path.name} "
                             "(corrupt; delete both and rerun embed.py)")
        return data


def summary(path: str | os.PathLike) -> list[str]:
    """One line per split of a cache folder: examples and shards written."""
    root = pathlib.Path(path)
    lines = []
    for split_file in sorted(root.rglob(SPLIT_FILE)):
        layout, made_of = _read_layout(split_file.parent)
        done = len(list(split_file.parent.glob("shard-*.json")))
        lines.append(f"{split_file.parent.relative_to(root)}: {layout.num_examples} examples "
                     f"of {made_of}, {done} of {layout.num_shards} shards written")
    return lines
