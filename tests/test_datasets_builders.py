"""Release builders (COCOA, COCOA-cls, D2SA, KINS) on tiny fixtures in the exact release
layouts; masks checked pixel-exactly against pycocotools, counts against the JSON."""

import ast
import json
import pathlib
import re

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from datasets import build
from sameo_jax.data import pipeline, pooling, sources

H, W = 30, 40


# ----------------------------------------------------------------------------- fixtures


def _rect_poly(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _poly_mask(poly, h=H, w=W):
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([poly], h, w))).astype(bool)


def _rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _write_image(path: pathlib.Path, seed: int, kind: str = "png", h=H, w=W):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    if kind == "corrupt":
        path.write_bytes(b"\xff\xd8 this is not a jpeg")
    elif kind == "grey":
        Image.fromarray(pixels[..., 0]).save(path, format="PNG")
    elif kind == "jpeg":
        Image.fromarray(pixels).save(path, format="JPEG", quality=90)
    else:
        Image.fromarray(pixels).save(path, format="PNG")


def _region(poly, name="thing", stuff=0, occluder=None, order=1):
    """A COCOA region; `occluder` (polygon) makes it occluded with visible/invisible RLE."""
    r = {"segmentation": poly, "name": name, "isStuff": stuff, "order": order,
         "area": float(_poly_mask(poly).sum())}
    amodal = _poly_mask(poly)
    if occluder is None:
        r["occlude_rate"] = 0.0
    else:
        hidden = amodal & _poly_mask(occluder)
        r["visible_mask"] = _rle(amodal & ~hidden)
        r["invisible_mask"] = _rle(hidden)
        r["occlude_rate"] = float(hidden.sum() / amodal.sum())
    return r


def write_cocoa(manual: pathlib.Path, split_file="COCO_amodal_val2014.json"):
    """COCOA original layout: images + one annotation record per image with `regions`."""
    folder = manual / "val2014"
    images, anns = [], []
    specs = {
        1: ("png", [_region(_rect_poly(2, 2, 20, 15)),
                    _region(_rect_poly(10, 5, 35, 25), occluder=_rect_poly(2, 2, 20, 15)),
                    _region(_rect_poly(0, 20, 40, 30), name="grass", stuff=1)]),
        2: ("jpeg", [_region([3.5, 4.0, 30.2, 6.1, 18.7, 27.9]),
                     _region(_rect_poly(0, 0, 40, 10), name="sky", stuff=1),
                     # 96 % hidden: removed by the tiny-visible rule
                     _region(_rect_poly(2, 2, 38, 28), occluder=_rect_poly(2, 2, 38, 27))]),
        3: ("grey", [_region(_rect_poly(1, 1, 39, 29), name="wall", stuff=1)]),  # only stuff
        4: ("corrupt", [_region(_rect_poly(2, 2, 8, 8))]),
        5: ("png", [_region(_rect_poly(4, 4, 16, 16), occluder=_rect_poly(10, 10, 30, 30)),
                    _region(_rect_poly(20, 4, 36, 16))]),
        6: ("png", []),  # image without any annotation record
    }
    for image_id, (kind, regions) in specs.items():
        name = f"COCO_val2014_{image_id:012d}.jpg"
        _write_image(folder / name, image_id, kind)
        images.append({"id": image_id, "file_name": name, "height": H, "width": W})
        if regions:
            anns.append({"id": 100 + image_id, "image_id": image_id, "regions": regions,
                         "size": len(regions), "depth_constraint": "1-2"})
    # An RLE whose size disagrees with the image: that region is skipped and counted.
    bad = anns[-1]["regions"][0]["visible_mask"]
    anns[-1]["regions"][0]["visible_mask"] = {"size": [H + 1, W], "counts": bad["counts"]}
    (manual / split_file).write_text(json.dumps({"images": images, "annotations": anns}))
    return images, anns


def write_coco_style(manual: pathlib.Path, file_name: str, image_dir: str, keys: dict,
                     visible_box_key=None, categories=(1, 2, 3)):
    """COCO-style amodal release, one record per instance; visible as RLE and as polygon."""
    images, anns = [], []
    occ = _rect_poly(15, 0, 40, 30)
    instances = {
        1: [(_rect_poly(2, 2, 25, 20), "rle"), (_rect_poly(5, 18, 35, 28), None)],
        2: [(_rect_poly(10, 3, 30, 27), "poly"), ([[1, 1, 9, 1, 9, 9, 1, 9]], None)],
    }
    for image_id, inst in instances.items():
        name = f"{image_id:06d}.png"
        _write_image(manual / image_dir / name, 10 + image_id)
        images.append({"id": image_id, "file_name": name, "height": H, "width": W})
        for poly, visible_kind in inst:
            seg = poly if isinstance(poly[0], list) else [poly]
            amodal = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(seg, H, W)))
            ann = {"id": len(anns) + 1, "image_id": image_id,
                   "category_id": categories[len(anns) % len(categories)],
                   keys["amodal"]: seg,
                   keys["bbox"]: [float(v) for v in mask_utils.toBbox(
                       mask_utils.merge(mask_utils.frPyObjects(seg, H, W)))],
                   "iscrowd": 0}
            if visible_kind == "rle":
                ann[keys["visible"]] = _rle(amodal.astype(bool) & ~_poly_mask(occ))
            elif visible_kind == "poly":
                ann[keys["visible"]] = [_rect_poly(10, 3, 15, 27)]
            else:
                ann[keys["visible"]] = _rle(amodal.astype(bool))
            if keys.get("occ"):
                vis = ann[keys["visible"]]
                v = mask_utils.area(vis if isinstance(vis, dict) else mask_utils.merge(
                    mask_utils.frPyObjects(vis, H, W)))
                ann[keys["occ"]] = float(1 - v / amodal.sum())
            if visible_box_key:
                ann[visible_box_key] = [1.0, 2.0, 3.0, 4.0]
            anns.append(ann)
    cats = [{"id": c, "name": f"class{c}"} for c in categories]
    (manual / file_name).write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return images, anns


# ----------------------------------------------------------------------------- helpers


def _decode_coco(seg, h=H, w=W):
    """pycocotools directly: polygon list / flat polygon / RLE -> bool mask."""
    if isinstance(seg, dict):
        return mask_utils.decode(seg).astype(bool)
    if seg and not isinstance(seg[0], list):
        seg = [seg]
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(seg, h, w))).astype(bool)


def _run_build(capsys, argv):
    rc = build.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _number(text, label):
    m = re.search(re.escape(label) + r"\s*(\d+)", text)
    assert m, f"{label!r} not in summary:\n{text}"
    return int(m.group(1))


def _by_image_id(source):
    return {int(source[i]["image_id"]): source[i] for i in range(len(source))}


# ----------------------------------------------------------------------------- tests


def test_cocoa_release_layout_counts_and_masks(tmp_path, capsys):
    manual, data = tmp_path / "manual", tmp_path / "data"
    manual.mkdir()
    images, anns = write_cocoa(manual)
    rc, out, err = _run_build(capsys, ["cocoa", "--manual_dir", str(manual), "--data_dir",
                                       str(data), "--split", "validation"])
    assert rc == 0, err

    # What pycocotools says about the JSON itself.
    raw = json.loads((manual / "COCO_amodal_val2014.json").read_text())
    all_regions = [(a["image_id"], r) for a in raw["annotations"] for r in a["regions"]]
    corrupt = {4}
    usable = [(i, r) for i, r in all_regions if i not in corrupt]
    stuff = [r for _, r in usable if r["isStuff"]]
    bad_rle = [r for _, r in usable if "visible_mask" in r and r["visible_mask"]["size"] != [H, W]]
    expected_kept, occluded = {}, 0
    for image_id, r in usable:
        if r["isStuff"] or r in bad_rle:
            continue
        amodal_rle = mask_utils.merge(mask_utils.frPyObjects([r["segmentation"]], H, W))
        a = int(mask_utils.area(amodal_rle))
        v = int(mask_utils.area(r["visible_mask"])) if "visible_mask" in r else a
        if v / a < 0.05:
            continue
        occluded += v < a
        expected_kept.setdefault(image_id, []).append(r)

    assert _number(out, "instances read:") == len(all_regions) == 10
    assert _number(out, "in skipped images:") == 1
    assert _number(out, "skipped (bad mask):") == len(bad_rle) == 1
    assert _number(out, "removed by rule 'stuff':") == len(stuff) == 3
    assert _number(out, "removed by rule 'tiny_visible':") == 1
    assert _number(out, "kept:") == sum(map(len, expected_kept.values())) == 4
    assert _number(out, "(occluded:") == occluded == 1
    assert _number(out, "images skipped (corrupt_image):") == 1
    assert _number(out, "images skipped (no_instances_left):") == 2  # stuff-only + empty
    assert "the full release has 1323" in out  # size check on a fixture: a note, not an error
    assert "open_source('cocoa', split" in out

    source = sources.open_source("cocoa", "validation", str(data))
    assert len(source) == len(expected_kept) == 3
    for image_id, example in _by_image_id(source).items():
        file_name = next(im["file_name"] for im in images if im["id"] == image_id)
        with Image.open(manual / "val2014" / file_name) as im:
            np.testing.assert_array_equal(example["image"], np.asarray(im.convert("RGB")))
        assert example["source"] == "cocoa"
        obj = example["objects"]
        regions = expected_kept[image_id]
        assert obj["amodal_mask"].shape == (len(regions), H, W)
        for k, r in enumerate(regions):
            amodal = _decode_coco(r["segmentation"])
            visible = _decode_coco(r["visible_mask"]) if "visible_mask" in r else amodal
            np.testing.assert_array_equal(obj["amodal_mask"][k], amodal)
            np.testing.assert_array_equal(obj["visible_mask"][k], visible)
            box = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(visible.astype(np.uint8))))
            np.testing.assert_allclose(obj["visible_bbox"][k], [*box[:2], *(box[:2] + box[2:])])
            assert obj["occlusion_rate"][k] == pytest.approx(r["occlude_rate"])
        assert obj["category_id"].tolist() == [0] * len(regions)
    # The loader's masks from the stored files: pooled from the PNGs over their boxes, or at
    # the stored size read from the stored pooled masks (a build without them, as before
    # 1.2.0, pools the PNGs there too): those of the arrays.
    for i in range(len(source)):
        record, masks = source.record(i), source[i]["objects"]
        parsed = record._parsed
        assert all(pooling.stored_size(b) in (None, pooling.STORED_SIZE)
                   for b in parsed["objects"]["amodal_mask_pooled"])
        older = sources.Record({**parsed, "objects": {
            k: v for k, v in parsed["objects"].items() if not k.endswith("_pooled")}},
            record._features, record.where)
        every = np.arange(record.num_instances)
        for kind, size in [("amodal", 7), ("visible", 7), ("amodal", 16), ("visible", 32),
                           ("amodal", 256), ("visible", 256)]:
            full = masks[f"{kind}_mask"]
            for reader in (record, older):
                pooled, nonempty = reader.pooled_masks(kind, every, size)
                np.testing.assert_array_equal(pooled, pipeline.downsample_masks(full, size))
                np.testing.assert_array_equal(nonempty, full.reshape(len(full), -1).any(axis=1))
    # A damaged stored pooled mask is an error naming the example and the mask.
    record = source.record(0)
    record._parsed["objects"]["visible_mask_pooled"][0] = b"\x00\x01\x02"
    with pytest.raises(ValueError, match=r"/[0-9.]+ validation example 0: visible mask 0: stored"):
        record.pooled_masks("visible", [0], pooling.STORED_SIZE)


def test_cocoa_cls_and_d2sa(tmp_path, capsys):
    keys = {"amodal": "segmentation", "visible": "visible_mask", "bbox": "bbox",
            "occ": "occlude_rate"}
    for name, file_name, image_dir, split in [
        ("cocoa_cls", "COCO_amodal_train2014_with_classes.json", "train2014", "train"),
        ("d2sa", "D2S_amodal_validation.json", "images", "validation"),
    ]:
        manual, data = tmp_path / name, tmp_path / f"data_{name}"
        manual.mkdir()
        _, anns = write_coco_style(manual, file_name, image_dir, keys)
        rc, out, err = _run_build(capsys, [name, "--manual_dir", str(manual), "--data_dir",
                                           str(data), "--split", split])
        assert rc == 0, err
        assert _number(out, "kept:") == len(anns) == 4
        _check_coco_style(sources.open_source(name, split, str(data)), anns, keys)


def test_kins_original_and_2020(tmp_path, capsys):
    for config, file_name, keys in [
        ("original", "instances_val.json",
         {"amodal": "segmentation", "visible": "inmodal_seg", "bbox": "bbox",
          "vbox": "inmodal_bbox"}),
        ("update_2020", "update_test_2020.json",
         {"amodal": "a_segm", "visible": "i_segm", "bbox": "a_bbox", "vbox": "i_bbox"}),
    ]:
        manual, data = tmp_path / config, tmp_path / f"data_{config}"
        manual.mkdir()
        _, anns = write_coco_style(manual, file_name, "testing/image_2", keys,
                                   visible_box_key=keys["vbox"], categories=(1, 2, 4, 5, 6, 7, 8))
        rc, out, err = _run_build(capsys, [f"kins/{config}", "--manual_dir", str(manual),
                                           "--data_dir", str(data), "--split", "validation"])
        assert rc == 0, err
        assert f"kins/{config}/1.2.0" in out
        source = sources.open_source(f"kins/{config}", "validation", str(data))
        _check_coco_style(source, anns, keys)
        for example in _by_image_id(source).values():  # the release's visible box is kept
            np.testing.assert_allclose(example["objects"]["visible_bbox"], [[1, 2, 4, 6]] * 2)
    # Without a config name the default (original) build is found.
    assert len(sources.open_source("kins", "validation", str(tmp_path / "data_original"))) == 2


def _check_coco_style(source, anns, keys):
    examples = _by_image_id(source)
    assert len(examples) == 2
    for image_id, example in examples.items():
        obj = example["objects"]
        mine = [a for a in anns if a["image_id"] == image_id]
        assert obj["category_id"].tolist() == [a["category_id"] for a in mine]
        for k, a in enumerate(mine):
            amodal = _decode_coco(a[keys["amodal"]])
            visible = _decode_coco(a[keys["visible"]])
            np.testing.assert_array_equal(obj["amodal_mask"][k], amodal)
            np.testing.assert_array_equal(obj["visible_mask"][k], visible)
            x, y, w, h = a[keys["bbox"]]
            np.testing.assert_allclose(obj["amodal_bbox"][k], [x, y, x + w, y + h])
            rate = 1 - visible.sum() / amodal.sum()
            assert obj["occlusion_rate"][k] == pytest.approx(rate, abs=1e-6)


def test_missing_manual_file_names_file_and_page(tmp_path, capsys):
    manual = tmp_path / "manual"
    manual.mkdir()
    write_cocoa(manual)  # only the val file exists
    rc, out, err = _run_build(capsys, ["cocoa", "--manual_dir", str(manual), "--data_dir",
                                       str(tmp_path / "data")])
    assert rc == 2
    assert "COCO_amodal_train2014.json" in err
    assert "https://github.com/Wakeupbuddy/amodalAPI" in err
    assert len(err.strip().splitlines()) == 1


def test_missing_images_folder_and_bad_json(tmp_path, capsys):
    manual = tmp_path / "manual"
    manual.mkdir()
    write_cocoa(manual)
    for p in (manual / "val2014").iterdir():
        p.unlink()
    args = ["cocoa", "--manual_dir", str(manual), "--data_dir", str(tmp_path / "d"),
            "--split", "validation"]
    rc, _, err = _run_build(capsys, args)
    assert rc == 2 and "val2014" in err and "COCO_val2014_000000000001.jpg" in err
    (manual / "COCO_amodal_val2014.json").write_text("{not json")
    rc, _, err = _run_build(capsys, args)
    assert rc == 2 and "COCO_amodal_val2014.json: not valid JSON" in err


def test_rebuild_needs_overwrite_and_strict_sizes(tmp_path, capsys):
    manual, data = tmp_path / "manual", tmp_path / "data"
    manual.mkdir()
    write_cocoa(manual)
    args = ["cocoa", "--manual_dir", str(manual), "--data_dir", str(data), "--split",
            "validation", "--max_images", "2"]
    assert _run_build(capsys, args)[0] == 0
    rc, _, err = _run_build(capsys, args)
    assert rc == 2 and "--overwrite" in err
    rc, out, _ = _run_build(capsys, [*args, "--overwrite", "--clean", "min_visible_fraction=0.01"])
    assert rc == 0 and _number(out, "images read:") == 2
    assert "removed by rule 'tiny_visible'" not in out  # 96 %-hidden region now kept
    rc, _, err = _run_build(capsys, [*args, "--overwrite", "--strict_sizes"])
    assert rc == 2 and "the full release has 1323" in err


def test_layering_no_model_imports():
    """datasets/ and sameo_jax/data/ never import sameo_jax.models (nor TensorFlow)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    files = [*(root / "datasets").rglob("*.py"), *(root / "sameo_jax" / "data").rglob("*.py")]
    assert len(files) > 10
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for n in names:
                assert not n.startswith(("sameo_jax.models", "tensorflow.", "tensorflow")) or \
                    n.startswith("tensorflow_datasets"), f"{path.name} imports {n}"
