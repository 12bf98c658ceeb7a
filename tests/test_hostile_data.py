"""Hostile and broken inputs, made here: COCO masks that do not add up or would make
pycocotools allocate by coordinate range, release files with duplicate ids, path escapes, bad
types and odd image modes, truncated JSON, a failing rebuild. Everything that could hang or
blow up memory on a regression runs in a subprocess under an address-space limit and a
timeout, and the command lines are run as a user runs them (one `error:` line, no traceback).
"""

import hashlib
import json
import os
import pathlib
import re
import resource
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from datasets import amodal_builder, build
from sameo_jax import masks as mask_lib
from sameo_jax.data import sources
from sameo_jax.evaluation import evaluator
from tests.conftest import REPO_ROOT
from tests.test_datasets_builders import (
    H,
    W,
    _number,
    _rect_poly,
    _rle,
    _run_build,
    _write_image,
    write_coco_style,
)

MEMORY_LIMIT = 2 << 30  # address space of each subprocess (a 1e30 polygon asks ~24 GB)
TIMEOUT_S = 120
COCO_KEYS = {"amodal": "segmentation", "visible": "visible_mask", "bbox": "bbox",
             "occ": "occlude_rate"}
RELEASE_FILE = "COCO_amodal_val2014_with_classes.json"


def run_limited(args: list[str], timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """`python ARGS` from the repository root under MEMORY_LIMIT and a timeout."""

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, timeout=timeout,
                          capture_output=True, text=True, preexec_fn=limit)


def assert_one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """A non-zero exit with exactly one `error:` line (containing `needles`), no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# ----------------------------------------------------------------------------- masks

# Decodes every case in a limited child: prints the reason of each refusal or the RLE made.
_DECODE_CASES = """
import json, sys
from sameo_jax import masks
out = []
for seg, h, w in json.load(open(sys.argv[1])):
    try:
        out.append(masks.encode_rle(masks.decode_segmentation(seg, h, w))["counts"])
    except masks.BadSegmentation as e:
        out.append("refused: " + e.reason)
print(json.dumps(out))
"""


def _random_rle(h: int, w: int, seed: int) -> dict:
    mask = np.random.default_rng(seed).random((h, w)) < 0.5
    return _rle(mask)


def _first_runs(counts: str, n: int) -> str:
    """The characters of the first `n` runs of compressed counts (a whole-run prefix)."""
    ends = [i for i, c in enumerate(counts) if not (ord(c) - 48) & 0x20]
    return counts[: ends[n - 1] + 1]


def _zigzag(n: int) -> list[float]:
    return [float(v) for i in range(n) for v in ((0, 0) if i % 2 else (W, H))]


def test_masks_that_do_not_add_up_are_refused_by_reason(tmp_path):
    good = _rle(np.pad(np.ones((10, 10), bool), ((5, H - 15), (7, W - 17))))
    big = _random_rle(400, 500, 0)  # about 100k characters: checked in two chunks
    cut = _first_runs(big["counts"], 60_000)
    poly = _rect_poly(5.5, 4, 30, 20)
    cases = {
        "good RLE": (good, H, W, "ok"),
        "good uncompressed": ({"size": [H, W], "counts": [5, 10, H * W - 15]}, H, W, "ok"),
        "good polygon": ([poly], H, W, "ok"),
        "polygon past the edge": ([[-20, -10, 50, 5, 10, 45]], H, W, "ok"),
        "big RLE in chunks": (big, 400, 500, "ok"),
        "too short": ({"size": [H, W], "counts": "0:"}, H, W, "RLE counts do not sum to H*W"),
        "too long": ({"size": [H, W], "counts": good["counts"] + "11"}, H, W,
                     "RLE counts do not sum to H*W"),
        "big cut short": ({"size": [400, 500], "counts": cut}, 400, 500,
                          "RLE counts do not sum to H*W"),
        "10M zeros": ({"size": [H, W], "counts": "0" * 10_000_000}, H, W,
                      "RLE counts do not sum to H*W"),
        "3M ones": ({"size": [2000, 2000], "counts": "1" * 3_000_000}, 2000, 2000,
                    "RLE counts do not sum to H*W"),
        "unfinished run": ({"size": [H, W], "counts": "0R"}, H, W, "RLE counts malformed"),
        "negative run": ({"size": [H, W], "counts": "053F"}, H, W, "RLE counts malformed"),
        "bad character": ({"size": [H, W], "counts": "0`U1 "}, H, W, "RLE counts malformed"),
        "non-ASCII": ({"size": [H, W], "counts": "0\u00e9"}, H, W, "RLE counts malformed"),
        "run too long": ({"size": [H, W], "counts": "ooooooo0"}, H, W, "RLE counts malformed"),
        "uncompressed short": ({"size": [H, W], "counts": [10, 20]}, H, W,
                               "RLE counts do not sum to H*W"),
        "uncompressed negative": ({"size": [H, W], "counts": [-1, H * W + 1]}, H, W,
                                  "RLE counts malformed"),
        "uncompressed floats": ({"size": [H, W], "counts": [600.5, 599.5]}, H, W,
                                "RLE counts malformed"),
        "zero size": ({"size": [0, W], "counts": "0"}, H, W, "RLE size malformed"),
        "negative size": ({"size": [-H, W], "counts": good["counts"]}, H, W,
                          "RLE size malformed"),
        "string size": ({"size": [str(H), W], "counts": good["counts"]}, H, W,
                        "RLE size malformed"),
        "other size": ({"size": [H + 1, W], "counts": good["counts"]}, H, W,
                       "RLE size disagrees with the image"),
        "no counts": ({"size": [H, W]}, H, W, "RLE without counts/size"),
        "huge coordinate": ([[0, 0, 1e30, 0, 10, 10]], H, W, "polygon far outside the image"),
        "odd length": ([[0, 0, 10, 0, 10]], H, W, "polygon of odd length"),
        "two points": ([[0, 0, 10, 10]], H, W, "polygon with fewer than 3 points"),
        "NaN": ([[0, 0, float("nan"), 0, 10, 10]], H, W, "polygon with non-finite coordinates"),
        "infinity": ([[0, 0, float("inf"), 0, 10, 10]], H, W,
                     "polygon with non-finite coordinates"),
        "strings": ([[0, 0, "10", 0, 10, 10]], H, W, "polygon malformed"),
        "zig-zag outline": ([_zigzag(20_000)], H, W, "polygon outline too long"),
        "a string": ("mask", H, W, "segmentation of an unsupported type"),
    }
    path = tmp_path / "cases.json"
    path.write_text(json.dumps([c[:3] for c in cases.values()]))
    proc = run_limited(["-c", _DECODE_CASES, str(path)], timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = dict(zip(cases, json.loads(proc.stdout), strict=True))
    for name, (seg, h, w, expected) in cases.items():
        if expected != "ok":
            assert got[name] == f"refused: {expected}", name
            continue
        if isinstance(seg, list):
            reference = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        else:
            reference = mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) \
                else mask_lib.coco_rle(seg)
        assert got[name] == mask_lib.encode_rle(mask_utils.decode(reference))["counts"], name


def test_evaluate_results_file_with_bad_masks(tmp_path):
    """`evaluate.py --results` skips each bad mask and counts it by reason; nothing usable,
    or a file that is not UTF-8, ends in one error line."""
    example = evaluator.open_split(evaluator.EvalOptions(split="demo"))[0]  # evaluate.py's scenes
    image_id, (h, w) = int(example["image_id"]), example["image"].shape[:2]
    good = mask_lib.encode_rle(example["objects"]["amodal_mask"][0])

    def result(seg):
        return {"image_id": image_id, "category_id": 1, "segmentation": seg, "score": 0.9}

    bad = [
        {"size": [h, w], "counts": _first_runs(good["counts"], 3)},
        {"size": [h, w], "counts": good["counts"] + "11"},
        {"size": [h, w], "counts": [10, 20]},
        {"size": [h, w], "counts": "0R"},
        [[0, 0, 1e30, 0, 10, 10]],
        [[0, 0, 10, 0, 10]],
        {"size": [h, -w], "counts": good["counts"]},
    ]
    results = tmp_path / "results.json"
    results.write_text(json.dumps([result(good), *map(result, bad)]))
    args = ["evaluate.py", "--split", "demo", "--max_images", "2", "--results"]
    proc = run_limited([*args, str(results), "--json", str(tmp_path / "m.json")])
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith(str(results)))
    assert "using 1 of 8 entries" in line
    skipped = json.loads((tmp_path / "m.json").read_text())["inputs"]["results"]["skipped"]
    assert skipped == {
        "a bad segmentation (RLE counts do not sum to H*W)": 3,
        "a bad segmentation (RLE counts malformed)": 1,
        "a bad segmentation (polygon far outside the image)": 1,
        "a bad segmentation (polygon of odd length)": 1,
        "a bad segmentation (RLE size malformed)": 1,
    }

    only_bad = tmp_path / "only_bad.json"
    only_bad.write_text(json.dumps([result(seg) for seg in bad]))
    assert_one_error_line(run_limited([*args, str(only_bad)]), "no usable results",
                          "RLE counts do not sum to H*W")
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(json.dumps([result(good)]).replace("0.9", "0.9, \"n\": \"\xe9\"")
                       .encode("latin-1"))
    assert_one_error_line(run_limited([*args, str(latin1)]), "latin1.json: not valid JSON")
    assert_one_error_line(run_limited([*args, str(results), "--split", "kitti"]),
                          "--split=kitti")


# ----------------------------------------------------------------------------- images


def _grey16() -> np.ndarray:
    return np.linspace(0, 65535, H * W).astype(np.uint16).reshape(H, W)


def _pixels(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def write_odd_images(folder: pathlib.Path) -> dict[str, np.ndarray]:
    """Images of odd modes in `folder` -> the RGB each must become (all H x W as shown)."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = _pixels(1)
    expected = {}
    Image.fromarray(_grey16()).save(folder / "grey16.png")
    assert Image.open(folder / "grey16.png").mode.startswith("I;16")
    expected["grey16.png"] = np.repeat(np.round(_grey16() / 257).astype(np.uint8)[..., None],
                                       3, axis=2)
    Image.fromarray(rgb).quantize(8).save(folder / "palette.png")
    expected["palette.png"] = np.asarray(Image.open(folder / "palette.png").convert("RGB"))
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    expected["cmyk.jpg"] = np.asarray(Image.open(folder / "cmyk.jpg").convert("RGB"))
    alpha = np.full((H, W, 1), 7, np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha], axis=2)).save(folder / "rgba.png")
    expected["rgba.png"] = rgb
    Image.fromarray(np.stack([rgb[..., 0], alpha[..., 0]], axis=2)).save(folder / "la.png")
    expected["la.png"] = np.repeat(rgb[..., :1], 3, axis=2)
    stored = _pixels(2, W, H)  # kept W x H; EXIF orientation 6 shows it turned clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(folder / "exif.png", exif=exif)
    expected["exif.png"] = np.rot90(stored, k=-1)
    frames = [Image.fromarray(np.full((H, W, 3), c, np.uint8)) for c in (40, 200)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    expected["anim.gif"] = np.full((H, W, 3), 40, np.uint8)
    grey = np.linspace(0, 1, H * W, dtype=np.float32).reshape(H, W)
    Image.fromarray(grey).save(folder / "float.tif")
    expected["float.tif"] = np.repeat(np.round(grey * 255).astype(np.uint8)[..., None], 3, 2)
    return expected


def write_bomb(path: pathlib.Path, width: int, height: int) -> None:
    """A tiny PNG whose header claims width x height pixels."""
    _write_image(path, 0, h=2, w=2)
    data = bytearray(path.read_bytes())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    crc = zlib.crc32(bytes(data[12:29]))
    data[29:33] = crc.to_bytes(4, "big")
    path.write_bytes(bytes(data))


def test_predict_image_reader_gives_right_rgb_for_every_mode(tmp_path):
    from sameo_jax.inference import load_image

    for name, expected in write_odd_images(tmp_path).items():
        got = load_image(tmp_path / name)
        assert got.dtype == np.uint8 and got.shape == (H, W, 3), name
        np.testing.assert_array_equal(got, expected, err_msg=name)
    assert load_image(tmp_path / "grey16.png").max() == 255  # scaled, not all white
    assert (load_image(tmp_path / "grey16.png") < 255).mean() > 0.99


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    write_bomb(tmp_path / "bomb.png", 10_000, 10_000)  # PIL itself would only warn
    write_bomb(tmp_path / "huge.png", 100_000, 100_000)  # PIL refuses
    probe = ("import sys\nfrom sameo_jax import image_io\n"
             "for path in sys.argv[1:]:\n"
             "    try:\n        image_io.read_rgb(path)\n"
             "    except image_io.ImageError as e:\n        print(e.reason, e)\n")
    paths = [str(tmp_path / name) for name in ("bomb.png", "huge.png")]
    proc = run_limited(["-c", probe, *paths], timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2
    for line, path in zip(lines, paths, strict=True):
        assert line.startswith(f"decompression_bomb {path}:"), line


# ----------------------------------------------------------------------------- builds


def _ann(image_id, **kw):
    poly = _rect_poly(2, 2, 25, 20)
    ann = {"id": 0, "image_id": image_id, "category_id": 1, "segmentation": [poly],
           "bbox": [2.0, 2.0, 23.0, 18.0], "iscrowd": 0}
    ann.update(kw)
    return ann


def write_hostile_release(root: pathlib.Path) -> tuple[pathlib.Path, dict[int, np.ndarray]]:
    """A COCOA-cls style release with one of each malformed entry. Returns the manual_dir and
    image_id -> the RGB each written image must have."""
    manual, folder = root / "manual", root / "manual" / "val2014"
    secret = root / "outside" / "secret.png"
    _write_image(secret, 99)
    expected = write_odd_images(folder)
    _write_image(folder / "plain.png", 3)
    _write_image(folder / "small.png", 4, h=20, w=20)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    write_bomb(folder / "bomb.png", 10_000, 10_000)
    (folder / "link.png").symlink_to(secret)
    good = dict(height=H, width=W)
    images = [{"id": 1, "file_name": "plain.png", **good}]
    written = {1: np.asarray(Image.open(folder / "plain.png"))}
    for k, name in enumerate(expected):
        images.append({"id": 2 + k, "file_name": name, **good})
        written[2 + k] = expected[name]
    images += [
        {"id": 20, "file_name": "plain.png", **good},  # id 20 twice: both skipped
        {"id": 20, "file_name": "rgba.png", **good},
        {"id": 21, "file_name": str(secret), **good},  # absolute
        {"id": 22, "file_name": "../../outside/secret.png", **good},
        {"id": 23, "file_name": "link.png", **good},  # a symlink out of the folder
        {"id": 24, "file_name": "missing.png", **good},
        {"id": 25, "file_name": "corrupt.png", **good},
        {"id": 26, "file_name": "small.png", **good},  # the file is 20 x 20
        {"id": 27, "file_name": "bomb.png", "height": 10_000, "width": 10_000},
        {"id": "28", "file_name": "plain.png", **good},
        {"id": 29, "file_name": "plain.png", "height": "30", "width": W},
        "not an image",
    ]
    anns = [_ann(i["id"]) for i in images if isinstance(i, dict)]
    good_rle = _rle(np.ones((H, W), bool))
    anns += [
        _ann(1, bbox=[float("nan"), 2, 3, 4]),
        _ann(1, bbox=[2, 3, 4]),
        _ann(1, segmentation=[[0, 0, 10, 0, 10]]),
        _ann(1, segmentation=[[0, 0, 1e30, 0, 10, 10]]),
        _ann(1, segmentation={"size": [H, W], "counts": good_rle["counts"][:-1] + "0"}),
        _ann(1, segmentation={"size": [H, W], "counts": good_rle["counts"] + "11"}),
        _ann(1, visible_mask={"size": [H, W], "counts": [5, 5]}),
        _ann(1, category_id="cat"),
        _ann(1, occlude_rate="high"),
        _ann(1, occlude_rate=1.5),
        _ann(999),
        ["not", "an", "annotation"],
    ]
    for k, ann in enumerate(anns):
        if isinstance(ann, dict):
            ann["id"] = k + 1
    (manual / RELEASE_FILE).write_text(json.dumps({"images": images, "annotations": anns}))
    return manual, written


def test_build_skips_and_counts_every_malformed_entry(tmp_path):
    manual, written = write_hostile_release(tmp_path)
    data = tmp_path / "data"
    proc = run_limited(["-m", "datasets.build", "cocoa_cls", "--manual_dir", str(manual),
                        "--data_dir", str(data), "--split", "validation"])
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    out = proc.stdout
    images_skipped = {
        "bad_entry_type": 3, "duplicate_image_id": 2, "unsafe_file_name": 2,
        "path_outside_folder": 1, "missing_image": 1, "corrupt_image": 1, "size_mismatch": 1,
        "decompression_bomb": 1,
    }
    for reason, n in images_skipped.items():
        assert _number(out, f"images skipped ({reason}):") == n, reason
    assert _number(out, "images read:") == len(written) + sum(images_skipped.values())
    assert _number(out, "written:") == len(written)
    bad_masks = {"RLE counts do not sum to H*W": 3, "polygon far outside the image": 1,
                 "polygon of odd length": 1}
    for reason, n in bad_masks.items():
        assert _number(out, f"{reason}:") == n, reason
    assert _number(out, "skipped (bad mask):") == sum(bad_masks.values())
    instances_skipped = {"bad_box": 2, "bad_entry_type": 4, "bad_occlusion_rate": 1,
                         "unknown_image_id": 1}
    for reason, n in instances_skipped.items():
        assert _number(out, f"  skipped ({reason}):") == n, reason
    # Every instance read is accounted for exactly once.
    read, in_skipped = _number(out, "instances read:"), _number(out, "in skipped images:")
    kept = _number(out, "kept:")
    assert in_skipped == sum(images_skipped.values()) - 2  # one annotation per image with an id
    assert read == in_skipped + sum(bad_masks.values()) + sum(instances_skipped.values()) + kept

    source = sources.open_source("cocoa_cls", "validation", str(data))
    stored = {int(source[i]["image_id"]): source[i]["image"] for i in range(len(source))}
    assert sorted(stored) == sorted(written)  # nothing from outside --manual_dir
    for image_id, rgb in written.items():
        np.testing.assert_array_equal(stored[image_id], rgb, err_msg=str(image_id))


def test_broken_release_json_is_one_error_line(tmp_path, capsys):
    manual = tmp_path / "manual"
    manual.mkdir()
    write_coco_style(manual, RELEASE_FILE, "val2014", COCO_KEYS)
    release = manual / RELEASE_FILE
    args = ["cocoa_cls", "--manual_dir", str(manual), "--data_dir", str(tmp_path / "d"),
            "--split", "validation"]
    release.write_bytes(release.read_bytes().replace(b"class1", b"cl\xe4ss1"))
    assert_one_error_line(run_limited(["-m", "datasets.build", *args]),
                          f"{release}: not valid JSON")
    for text, needle in [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"images": {"id": 1}, "annotations": []}', "top-level 'images' is a dict"),
        ('{"images": [], "annotations": [], "categories": [{"id": "a"}]}', "categories[0]"),
        ("[1, 2]", "expected a JSON object"),
    ]:
        release.write_text(text)
        rc, _, err = _run_build(capsys, args)
        assert rc == 2 and err.startswith(f"error: {release}") and needle in err, err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d" / "cocoa_cls").exists()
    for bad_usage, needle in [([], "required: name"), ([*args, "--max_images", "0"], "'0'")]:
        with pytest.raises(SystemExit) as exit_info:
            build.main(bad_usage)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("error:") and needle in err, err
        assert len(err.strip().splitlines()) == 1


def _tree_digest(folder: pathlib.Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_failed_rebuild_leaves_the_old_build(tmp_path, capsys):
    manual, data = tmp_path / "manual", tmp_path / "data"
    manual.mkdir()
    write_coco_style(manual, RELEASE_FILE, "val2014", COCO_KEYS)
    args = ["cocoa_cls", "--manual_dir", str(manual), "--data_dir", str(data), "--split",
            "validation"]
    assert _run_build(capsys, args)[0] == 0
    built = data / "cocoa_cls" / str(amodal_builder.AmodalBuilder.VERSION)
    before = _tree_digest(built)

    # Fails while generating (after examples were written to the staging folder).
    rc, _, err = _run_build(capsys, [*args, "--overwrite", "--strict_sizes"])
    assert rc == 2 and "the full release has 1223" in err
    # Fails reading the release: a truncated file.
    release = manual / RELEASE_FILE
    text = release.read_text()
    release.write_text(text[: len(text) // 2])
    assert_one_error_line(run_limited(["-m", "datasets.build", *args, "--overwrite"]),
                          f"{release}: not valid JSON")
    assert _tree_digest(built) == before
    assert sorted(p.name for p in data.iterdir()) == ["cocoa_cls"]  # no staging left
    assert len(sources.open_source("cocoa_cls", "validation", str(data))) == 2

    release.write_text(text)
    rc, out, _ = _run_build(capsys, [*args, "--overwrite", "--max_images", "1"])
    assert rc == 0 and re.search(r"written: 1\b", out)
    assert len(sources.open_source("cocoa_cls", "validation", str(data))) == 1
    assert sorted(p.name for p in data.iterdir()) == ["cocoa_cls"]
    assert sorted(p.name for p in built.parent.iterdir()) == [built.name]


def test_swap_in_puts_the_old_build_back_when_the_move_fails(tmp_path, monkeypatch):
    old, new = tmp_path / "out", tmp_path / "new"
    old.mkdir()
    (old / "kept").write_text("old")
    new.mkdir()
    real_replace = os.replace

    def failing_replace(src, dst):
        if pathlib.Path(src) == new:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(build.os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space"):
        build.swap_in(new, old)
    assert (old / "kept").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "out"]
