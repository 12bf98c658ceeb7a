"""Hostile and broken weight files: each ends in one named error, within a memory limit.

The files are made here: torch.save-style zips with hand-assembled pickles (bad strides,
offsets and sizes, zero strides over huge sizes, deep nesting, state changes of reader
objects), deflate bombs, CRC damage, truncation, .npz headers that claim more than they hold.
They are read in a subprocess under RLIMIT_AS and a timeout, so a regression that allocates
what a file claims, crashes or hangs fails the test instead of the machine.
"""

import json
import os
import pickle
import re
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from sameo_jax import model_io, state_dict_file

from .conftest import REPO_ROOT

MEMORY_LIMIT = 3 << 30  # jax's CPU client needs about 1.5 GiB of address space
TIMEOUT_S = 120
PATCH = "image_encoder.patch_embed.proj.weight"
PATCH_SHAPE = (192, 3, 16, 16)


# ----------------------------------------------------------------------------- file makers


def _ops(value) -> bytes:
    """Pickle opcodes that push `value` (a str, int, bool or tuple of them)."""
    return pickle.dumps(value, protocol=2)[2:-1]


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def tensor(record: str, offset, size, stride, numel: int, storage: str = "FloatStorage"
           ) -> bytes:
    """What torch.save writes for one tensor: _rebuild_tensor_v2(storage, offset, size, ...)."""
    persistent_id = (b"(" + _ops("storage") + _global("torch", storage) + _ops(record)
                     + _ops("cpu") + _ops(numel) + b"tQ")
    return (_global("torch._utils", "_rebuild_tensor_v2") + b"(" + persistent_id + _ops(offset)
            + _ops(tuple(size)) + _ops(tuple(stride)) + b"\x89"
            + _global("collections", "OrderedDict") + b")RtR")


def state_pickle(entries: dict[str, bytes]) -> bytes:
    """{"model": OrderedDict(entries)} as protocol-2 opcodes."""
    body = b"".join(_ops(key) + value for key, value in entries.items())
    return (b"\x80\x02}" + _ops("model") + _global("collections", "OrderedDict") + b")R("
            + body + b"us.")


def torch_zip(path, pkl: bytes, records: dict[str, bytes], byteorder: bytes | None = b"little"):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        if byteorder is not None:
            z.writestr("archive/byteorder", byteorder)
        for key, data in records.items():
            z.writestr(f"archive/data/{key}", data)
    return path


def one_tensor_file(path, offset, size, stride, numel: int, record_numel: int | None = None,
                    key: str = "w", storage: str = "FloatStorage", dtype=np.float32):
    data = np.arange(numel if record_numel is None else record_numel).astype(dtype).tobytes()
    return torch_zip(path, state_pickle({key: tensor("0", offset, size, stride, numel,
                                                     storage)}), {"0": data})


def set_declared_size(path, member: str, size: int) -> None:
    """Rewrites the uncompressed size that the zip's headers declare for `member`."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    struct.pack_into("<I", raw, info.header_offset + 22, size)  # local file header
    pos = raw.find(b"PK\x01\x02")
    while pos >= 0:  # central directory entries
        name_len = struct.unpack_from("<H", raw, pos + 28)[0]
        if raw[pos + 46: pos + 46 + name_len].decode() == member:
            struct.pack_into("<I", raw, pos + 24, size)
        pos = raw.find(b"PK\x01\x02", pos + 4)
    path.write_bytes(bytes(raw))


def damage(path, member: str, at: int):
    """Flips one byte of `member`'s stored data (its CRC no longer matches)."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)
    raw[info.header_offset + 30 + name_len + extra_len + at] ^= 0xFF
    path.write_bytes(bytes(raw))
    return path


def npy_bytes(header_shape, data: bytes, descr: str = "<f4") -> bytes:
    header = repr({"descr": descr, "fortran_order": False, "shape": header_shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + data


def deep_tuple_key_pickle(depth: int) -> bytes:
    """{((...(None,)...),): 1}: hashing the key recursed until the C stack overflowed."""
    return b"\x80\x02}N" + b"\x85" * depth + b"K\x01s."


def build_modification_pickle() -> bytes:
    """BUILD on the shared storage type: would make later loads read float32 as int8."""
    return (b"\x80\x02" + _global("torch", "FloatStorage") + b"}" + _ops("dtype")
            + _ops("int8") + b"sb0" + state_pickle({})[2:])


def make_cases(d) -> dict[str, tuple[str, str]]:
    """{case: (file, the error it must give)}; files written under folder d."""
    cases = {}

    def case(name, path, error):
        cases[name] = (str(path), error)

    case("stride_past_storage", one_tensor_file(d / "a.pt", 0, (4, 4), (8, 1), 16),
         r"tensor 'w': size \(4, 4\), stride \(8, 1\) and offset 0 reach element 27 of "
         r"storage data/0, which holds 16")
    case("negative_stride", one_tensor_file(d / "b.pt", 15, (4,), (-1,), 16),
         r"tensor 'w': stride is not 1 non-negative integers")
    case("negative_offset", one_tensor_file(d / "c.pt", -100000, (4,), (1,), 16),
         r"tensor 'w': storage offset is not a non-negative integer")
    case("size_past_storage", one_tensor_file(d / "e.pt", 0, (1_000_000,), (1,), 16),
         r"reach element 999999 of storage data/0, which holds 16")
    case("offset_past_storage", one_tensor_file(d / "f.pt", 2**40, (1,), (1,), 16),
         r"offset 1099511627776 reach element 1099511627776")
    case("zero_stride_huge_size", one_tensor_file(d / "g.pt", 0, (40_000, 20_000), (0, 0), 1),
         r"size \(40000, 20000\) with stride \(0, 0\) repeats elements of its storage")
    case("negative_size", one_tensor_file(d / "h.pt", 0, (-4, 4), (4, 1), 16),
         r"size is not a tuple of at most 8 non-negative integers")
    case("huge_int_size", one_tensor_file(d / "i.pt", 0, (2**80,), (1,), 16),
         r"size is not a tuple")
    case("storage_longer_than_record",
         one_tensor_file(d / "j.pt", 0, (4,), (1,), 10**9, record_numel=16),
         r"record data/0 \(tensor 'w'\) holds 64 bytes, the pickle declares 1000000000 x "
         r"float32 = 4000000000 bytes")
    torch_zip(d / "k.pt", state_pickle({"w": tensor("7", 0, (4,), (1,), 4)}), {})
    case("missing_record", d / "k.pt", r"record data/7 \(tensor 'w'\) is missing")
    torch_zip(d / "l.pt", state_pickle({"w": tensor("../x", 0, (4,), (1,), 4)}), {})
    case("record_name_escape", d / "l.pt", r"a storage key is not a record name")

    case("crc_damage", damage(one_tensor_file(d / "m.pt", 0, (1024,), (1,), 1024),
                              "archive/data/0", 2000),
         r"record data/0 \(tensor 'w'\) is damaged \(Bad CRC-32")

    truncated = d / "n.pt"
    truncated.write_bytes(one_tensor_file(d / "n0.pt", 0, (1024,), (1,), 1024)
                          .read_bytes()[:3000])
    case("truncated_pt", truncated, r"not a zip archive or a truncated one")

    bomb = d / "bomb.pt.zip"  # a 4 KB zip whose inner .pt claims 3.9 GB
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("weights/efficient_sam_vitt.pt", bytes(1 << 20))
    set_declared_size(bomb, "weights/efficient_sam_vitt.pt", 0xF0000000)
    case("deflate_bomb_declared", bomb,
         r"the entry weights/efficient_sam_vitt.pt declares 3840.0 MiB uncompressed, over the "
         r"reader's limit of 1024.0 MiB")

    liar = d / "liar.pt.zip"  # declares 1 MiB, inflates to 16 MiB
    with zipfile.ZipFile(liar, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.pt", bytes(16 << 20))
    set_declared_size(liar, "x.pt", 1 << 20)
    case("deflate_bomb_lying", liar, r"the entry x.pt is damaged \(Bad CRC-32")

    with zipfile.ZipFile(d / "npz_huge.npz", "w") as z:
        z.writestr(PATCH + ".npy", npy_bytes((10**6, 10**6), b"\0" * 64))
    case("npz_header_huge_shape", d / "npz_huge.npz",
         r"the header claims shape \(1000000, 1000000\) of float32 \(4000000000000 bytes\) but "
         r"the entry holds 64 bytes")
    with zipfile.ZipFile(d / "npz_neg.npz", "w") as z:
        z.writestr("w.npy", npy_bytes((-1, 16), b"\0" * 64))
    case("npz_negative_shape", d / "npz_neg.npz", r"shape \(-1, 16\) is not")
    with zipfile.ZipFile(d / "npz_hdr.npz", "w") as z:
        z.writestr("w.npy", b"\x93NUMPY\x02\x00" + struct.pack("<I", 2**31) + b"{")
    case("npz_header_length_lie", d / "npz_hdr.npz", r"entry 'w.npy': not a valid .npy header")
    np.savez(d / "npz_trunc.npz", w=np.arange(4096, dtype=np.float32))
    (d / "npz_trunc.npz").write_bytes((d / "npz_trunc.npz").read_bytes()[:5000])
    case("truncated_npz", d / "npz_trunc.npz", r"not a zip archive or a truncated one")
    np.savez(d / "npz_crc.npz", w=np.arange(4096, dtype=np.float32))
    case("npz_crc_damage", damage(d / "npz_crc.npz", "w.npy", 400),
         r"entry 'w.npy' is damaged \(Bad CRC-32")
    with zipfile.ZipFile(d / "npz_lie.npz", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("w.npy", npy_bytes((1 << 20,), bytes(4 << 20)))
    set_declared_size(d / "npz_lie.npz", "w.npy", 0xF0000000)
    case("npz_declared_size_lie", d / "npz_lie.npz", r"entry 'w.npy': the header claims shape "
         r"\(1048576,\) of float32 \(4194304 bytes\) but the entry holds 402653\d+ bytes")
    n = 0xE0000000  # 3.5 GiB of uint8, as both the header and the zip entry declare
    with zipfile.ZipFile(d / "npz_bomb.npz", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("w.npy", npy_bytes((n,), bytes(1 << 20), descr="|u1"))
    set_declared_size(d / "npz_bomb.npz", "w.npy", n + 128)
    case("npz_deflate_bomb", d / "npz_bomb.npz",
         r"the tensors hold 3584.0 MiB, over the reader's limit of 1024.0 MiB")

    deep = torch_zip(d / "deep.pt", deep_tuple_key_pickle(100_000), {})
    case("pickle_deep_nesting", deep, r"the pickle nests deeper than 64 levels")
    big = torch_zip(d / "bigpkl.pt", b"\x80\x02N" + b"0N" * (1 << 20) + b".", {})
    case("pickle_too_large", big, r"archive/data.pkl declares 2.0 MiB uncompressed, over the "
         r"reader's limit of 1.0 MiB")
    torch_zip(d / "build.pt", build_modification_pickle(), {})
    case("pickle_modifies_reader", d / "build.pt", r"tries to set the state of a tensor, "
         "storage or function")
    torch_zip(d / "notensor.pt", state_pickle({"w": _ops(3)}), {})
    case("value_not_tensor", d / "notensor.pt", r"entry 'w' is a int, not a tensor")
    torch_zip(d / "badkey.pt", state_pickle({"a\nerror: b": tensor("0", 0, (1,), (1,), 1)}),
              {"0": bytes(4)})
    case("key_not_printable", d / "badkey.pt", r"a state_dict key is not a printable name")
    torch_zip(d / "order.pt", state_pickle({"w": tensor("0", 0, (4,), (1,), 4)}),
              {"0": bytes(16)}, byteorder=b"middle")
    case("bad_byteorder", d / "order.pt", r"byteorder record says middle")
    torch_zip(d / "evil.pt", b"\x80\x02cos\nsystem\n(X\x04\x00\x00\x00trueR.", {})
    case("code_execution", d / "evil.pt", r"refusing to load 'os.system'")

    # Against the model: checked before the data is read (the damaged record is never read).
    shape = one_tensor_file(d / "shape.pt", 0, (192, 3, 16, 17), (816, 272, 17, 1),
                            192 * 816, key=PATCH)
    case("shape_not_the_variant", damage(shape, "archive/data/0", 1000),
         r"image_encoder.patch_embed.proj.weight has shape \(192, 3, 16, 17\), which does not "
         r"fit the model")
    case("integer_weights", one_tensor_file(d / "int.pt", 0, PATCH_SHAPE, (768, 256, 16, 1),
                                            192 * 768, key=PATCH, storage="LongStorage",
                                            dtype=np.int64),
         r"patch_embed.proj.weight has dtype int64; weights must be floating point")
    return cases


# ----------------------------------------------------------------------------- the runs

_WORKER = """
import json, sys
from sameo_jax import model_io
for name, path in json.loads(sys.argv[1]).items():
    try:
        model_io.read_state_dict(path)
        result = "no error"
    except model_io.CheckpointError as exc:
        result = f"{type(exc).__name__}: {exc}"
    print(json.dumps([name, result]), flush=True)
"""


_LAUNCHER = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({0}, {0})); "
             "os.execv(sys.executable, [sys.executable] + sys.argv[1:])")


def run_limited(args, memory_limit: int = MEMORY_LIMIT, timeout: float = TIMEOUT_S):
    """Runs `python *args` from the repository root with its address space limited."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-c", _LAUNCHER.format(memory_limit), *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """{case: (file, expected error, the error the reader gave)}, read in one subprocess."""
    cases = make_cases(tmp_path_factory.mktemp("hostile"))
    result = run_limited(["-c", _WORKER, json.dumps({k: v[0] for k, v in cases.items()})])
    got = dict(json.loads(line) for line in result.stdout.splitlines())
    crashed = result.stderr[-2000:] if result.returncode else ""
    return {k: (*v, got.get(k, f"(not reached; the reader process ended: {crashed})"))
            for k, v in cases.items()}


CASES = ["stride_past_storage", "negative_stride", "negative_offset", "size_past_storage",
         "offset_past_storage", "zero_stride_huge_size", "negative_size", "huge_int_size",
         "storage_longer_than_record", "missing_record", "record_name_escape", "crc_damage",
         "truncated_pt", "deflate_bomb_declared", "deflate_bomb_lying",
         "npz_header_huge_shape", "npz_negative_shape", "npz_header_length_lie",
         "truncated_npz", "npz_crc_damage", "npz_declared_size_lie", "npz_deflate_bomb",
         "pickle_deep_nesting",
         "pickle_too_large", "pickle_modifies_reader", "value_not_tensor", "key_not_printable",
         "bad_byteorder", "code_execution", "shape_not_the_variant", "integer_weights"]


@pytest.mark.parametrize("case", CASES)
def test_hostile_file_gives_one_named_error(hostile, case):
    path, expected, got = hostile[case]
    assert got.startswith(("CheckpointError: ", "UnsafeCheckpointError: ")), got
    assert os.path.basename(path.split(":")[0]) in got, got
    assert "\n" not in got
    assert re.search(expected, got), got


def test_every_case_is_checked(tmp_path):
    assert sorted(make_cases(tmp_path)) == sorted(CASES)


def test_crafted_files_read_right_when_honest(tmp_path):
    """The same file makers give a valid file: shared storage views, offsets, big-endian."""
    values = np.arange(24, dtype=np.float32)
    entries = {"a": tensor("0", 0, (2, 3), (3, 1), 24), "b": tensor("0", 6, (3, 2), (1, 3), 24),
               "c": tensor("0", 23, (), (), 24), "e": tensor("1", 0, (0, 5), (5, 1), 0)}
    for order, dtype in ((b"little", "<f4"), (b"big", ">f4")):
        path = torch_zip(tmp_path / f"{order.decode()}.pt", state_pickle(entries),
                         {"0": values.astype(dtype).tobytes(), "1": b""}, byteorder=order)
        got = model_io.read_state_dict(path)
        np.testing.assert_array_equal(got["a"], values[:6].reshape(2, 3))
        np.testing.assert_array_equal(got["b"], values[6:12].reshape(2, 3).T)
        assert got["c"] == 23 and got["c"].shape == ()
        assert got["e"].shape == (0, 5)
        assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in got.values())


def test_a_refused_file_changes_nothing_for_later_loads(tmp_path):
    """BUILD on the storage type is refused, and a later load still reads float32."""
    with pytest.raises(model_io.UnsafeCheckpointError, match="set the state"):
        model_io.read_state_dict(torch_zip(tmp_path / "b.pt", build_modification_pickle(), {}))
    path = one_tensor_file(tmp_path / "ok.pt", 0, (4,), (1,), 4)
    np.testing.assert_array_equal(model_io.read_state_dict(path)["w"], np.arange(4.0))


def test_decompression_cap_counts_every_record(tmp_path, monkeypatch):
    """Honest but large records stop at MAX_UNCOMPRESSED_BYTES, counted over the whole file."""
    monkeypatch.setattr(state_dict_file, "MAX_UNCOMPRESSED_BYTES", 1 << 20)
    entries = {f"w{i}": tensor(str(i), 0, (1 << 17,), (1,), 1 << 17) for i in range(3)}
    path = torch_zip(tmp_path / "big.pt", state_pickle(entries),
                     {str(i): bytes(1 << 19) for i in range(3)})
    with pytest.raises(model_io.CheckpointError, match=r"storages hold 1.5 MiB, over the "
                       r"reader's limit of 1.0 MiB"):
        model_io.read_state_dict(path)


def test_pickle_depth_counts_memo_and_mutation():
    """Nesting built through the memo (GET of a list, then APPEND) is counted, and a legit
    torch-style pickle is far below the limit."""
    deep = b"\x80\x02]q\x00" + b"h\x00]q\x00a" * 100 + b"."  # list nested 100 deep via memo
    state_dict_file.check_pickle_depth(state_pickle({"w": tensor("0", 0, (4,), (1,), 4)}), "ok")
    nested = b"\x80\x02" + b"(" * 80 + b"N" + b"t" * 80 + b"."
    with pytest.raises(model_io.CheckpointError, match="nests deeper than 64"):
        state_dict_file.check_pickle_depth(nested, "x")
    state_dict_file.check_pickle_depth(deep, "x")  # lists do not hash: depth of tuples matters
    with pytest.raises(model_io.CheckpointError, match="nests deeper than 64"):
        state_dict_file.check_pickle_depth(deep_tuple_key_pickle(65), "x")


# ----------------------------------------------------------------------------- the CLI


def assert_one_error_line(result, *needles):
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode != 0, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("case", ["zero_stride_huge_size", "deflate_bomb_declared",
                                  "npz_header_huge_shape", "crc_damage"])
def test_converter_cli_one_line(hostile, tmp_path, case):
    path = hostile[case][0]
    result = run_limited(["-m", "sameo_jax.model_io", path, str(tmp_path / "out")])
    assert_one_error_line(result, os.path.basename(path))
    assert not (tmp_path / "out").exists()


def test_predict_cli_one_line(hostile, tmp_path):
    path = hostile["stride_past_storage"][0]
    (tmp_path / "p.json").write_text(json.dumps([{"box": [1, 1, 5, 5]}]))
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "i.png")
    result = run_limited(["predict.py", f"--checkpoint={path}", f"--image={tmp_path / 'i.png'}",
                          f"--prompts={tmp_path / 'p.json'}"])
    assert_one_error_line(result, "reach element 27 of storage data/0")


def test_file_makers_give_small_files(hostile):
    """The hostile files are tiny: what they claim is what the reader must not allocate."""
    sizes = {case: os.path.getsize(path.split(":")[0]) for case, (path, _, _) in hostile.items()}
    assert sizes["zero_stride_huge_size"] < 1000 and sizes["deflate_bomb_declared"] < 5000
