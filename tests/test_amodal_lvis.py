"""Amodal-LVIS synthesis: complete-object rules, occluder placement, dual annotation, COCO input."""

import dataclasses
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from datasets import build
from datasets.amodal_lvis import synthesis as al
from sameo_jax.boxes import boxes_from_masks, xyxy_to_xywh
from sameo_jax.data import occluders, pipeline, sources
from sameo_jax.data.demo_scenes import DemoSource
from sameo_jax.masks import encode_rle

from .test_datasets_synthetic import _assert_same


def _disk(h, w, cy, cx, r):
    yy, xx = np.mgrid[0:h, 0:w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_place_occluder_lands_in_range_and_respects_avoid():
    rng = np.random.default_rng(0)
    target = _disk(120, 120, 60, 60, 25)
    avoid = _disk(120, 120, 15, 15, 12)
    occluder = _disk(44, 44, 22, 22, 21)
    for lo, hi in [(0.1, 0.2), (0.3, 0.5), (0.6, 0.7)]:
        for _ in range(20):
            top, left, frac = occluders.place_occluder(target, occluder, (lo, hi), rng, avoid=avoid)
            assert lo <= frac <= hi
            assert 0 <= top <= 120 - 44 and 0 <= left <= 120 - 44
            covered = np.zeros_like(target)
            covered[top : top + 44, left : left + 44] = occluder
            assert (covered & target).sum() / target.sum() == pytest.approx(frac)
            assert not (covered & avoid).any()
    # A tiny occluder cannot hide 80 %: no placement, not a wrong one.
    assert occluders.place_occluder(target, occluder[:5, :5], (0.8, 0.9), rng) is None
    with pytest.raises(ValueError, match="occlusion_range"):
        occluders.place_occluder(target, occluder, (0.5, 0.1), rng)


def test_complete_by_geometry_rules():
    h = w = 64
    masks = np.zeros((4, h, w), bool)
    masks[0, 5:15, 5:15] = True  # isolated: complete
    masks[1, 0:10, 40:50] = True  # touches the top border
    masks[2, 30:45, 30:45] = True  # boxes of 2 and 3 overlap
    masks[3, 40:55, 40:55] = True
    np.testing.assert_array_equal(al.complete_by_geometry(masks), [True, False, False, False])
    assert not al.complete_by_geometry(masks, min_area=101)[0]
    # Mask 0 at 5 px from the border fails a 6 px margin.
    assert not al.complete_by_geometry(masks, border_margin=6)[0]


def _oracle(example):
    """A perfect amodal predictor for a demo scene: finds the instance by its modal box."""
    o = example["objects"]

    def predict(image, box):
        k = int(np.flatnonzero((o["visible_bbox"] == box).all(axis=1))[0])
        return o["amodal_mask"][k]

    return predict


def test_complete_by_model_matches_truth():
    src = DemoSource(6, image_size=128, seed=2)
    for i in range(0, 6, 2):  # occluded scenes
        ex = src[i]
        o = ex["objects"]
        flags = al.complete_by_model(ex["image"], o["visible_mask"], _oracle(ex),
                                     iou_threshold=0.9)
        # Demo occlusion rates are >= 0.15 so IoU(amodal, visible) <= 0.85 < 0.9.
        np.testing.assert_array_equal(flags, o["occlusion_rate"] == 0)
    with pytest.raises(ValueError, match="predict_amodal returned shape"):
        al.complete_by_model(ex["image"], o["visible_mask"], lambda im, b: np.zeros((3, 3)))


def _check_examples(examples, config):
    by_id = {int(e["image_id"]): e for e in examples}
    synthetic = [e for e in examples if e["image_id"] >= al.SYNTHETIC_ID_STRIDE]
    assert synthetic
    for ex in examples:
        o = ex["objects"]
        assert ex["source"] == "amodal_lvis"
        assert not np.any(o["visible_mask"] & ~o["amodal_mask"])
        np.testing.assert_array_equal(o["amodal_bbox"], boxes_from_masks(o["amodal_mask"]))
        np.testing.assert_array_equal(o["visible_bbox"], boxes_from_masks(o["visible_mask"]))
    lo, hi = config.occlusion_range
    for ex in synthetic:
        o = ex["objects"]
        rates = o["occlusion_rate"]
        occluded = np.flatnonzero(rates > 0)
        assert len(occluded) == 1  # exactly the target; the occluder avoids other objects
        assert lo - 1e-6 <= rates[occluded[0]] <= hi + 1e-6
        # Dual annotation: the original image holds the same object unoccluded.
        dual = by_id[int(ex["image_id"]) % al.SYNTHETIC_ID_STRIDE]
        d = dual["objects"]
        target = o["amodal_mask"][occluded[0]]
        match = [j for j in range(len(d["category_id"]))
                 if np.array_equal(d["amodal_mask"][j], target)]
        assert len(match) == 1 and d["occlusion_rate"][match[0]] == 0
        # Pixels change only under the pasted occluder (the last instance).
        changed = np.any(ex["image"] != dual["image"], axis=-1)
        assert not np.any(changed & ~o["amodal_mask"][-1])
        assert len(o["category_id"]) == len(d["category_id"]) + 1  # originals + occluder
    return synthetic


def test_synthesize_geometric_is_deterministic_and_valid():
    config = al.SynthesisConfig(occlusion_range=(0.2, 0.4), min_area=200)
    source = al.DemoInstanceSource(12, image_size=128, seed=5)
    stats = al.SynthesisStats()
    run1 = list(al.synthesize(source, seed=3, config=config, stats=stats))
    synthetic = _check_examples(run1, config)
    assert stats.images == 12 and stats.occluded_examples == len(synthetic)
    assert stats.dual_examples + stats.occluded_examples == len(run1)
    assert stats.occluded_examples + stats.placement_failed == stats.complete
    run2 = list(al.synthesize(source, seed=3, config=config))
    assert [int(e["image_id"]) for e in run1] == [int(e["image_id"]) for e in run2]
    for a, b in zip(run1, run2, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["objects"]["visible_mask"], b["objects"]["visible_mask"])
    run3 = list(al.synthesize(source, seed=4, config=config))
    assert any(not np.array_equal(a["image"], b["image"])
               for a, b in zip(run1, run3, strict=False))
    # Without dual annotation only synthesized examples come out.
    no_dual = list(al.synthesize(source, seed=3, config=dataclasses.replace(config, dual=False)))
    assert all(e["image_id"] >= al.SYNTHETIC_ID_STRIDE for e in no_dual)
    assert len(no_dual) == len(synthetic)


def test_synthesize_with_model_uses_the_predictor():
    scenes = DemoSource(4, image_size=128, seed=9)

    class Source:
        def __len__(self):
            return len(scenes)

        def __getitem__(self, i):
            ex = scenes[i]
            o = ex["objects"]
            return al.InstanceImage(ex["image"], i, o["visible_mask"], o["category_id"])

    def predict(image, box):  # oracle keyed by image content
        for i in range(len(scenes)):
            ex = scenes[i]
            if np.array_equal(ex["image"], image):
                return _oracle(ex)(image, box)
        raise AssertionError("unknown image")

    config = al.SynthesisConfig(min_area=1)
    stats = al.SynthesisStats()
    examples = list(al.synthesize(Source(), seed=0, config=config, predict_amodal=predict,
                                  stats=stats))
    expected = sum(int((scenes[i]["objects"]["occlusion_rate"] == 0).sum()) for i in range(4))
    assert stats.complete == expected
    _check_examples(examples, config)


def _write_coco(tmp_path, bad_image=False, bad_rle=False):
    """COCO-format fixture from demo duals: RLE and polygon segmentations, one crowd."""
    scenes = DemoSource(8, image_size=96, seed=4)
    images, annotations = [], []
    (tmp_path / "img").mkdir()
    for n, i in enumerate(range(1, 8, 2)):  # unoccluded duals
        ex = scenes[i]
        name = f"{n:03d}.png"
        Image.fromarray(ex["image"]).save(tmp_path / "img" / name)
        images.append({"id": 100 + n, "file_name": name, "height": 96, "width": 96})
        for k, mask in enumerate(ex["objects"]["visible_mask"]):
            if k % 2 == 0:
                seg = encode_rle(mask)
            else:  # polygon of the mask's box (a rectangle: exact as a polygon)
                x0, y0, x1, y1 = boxes_from_masks(mask[None])[0].tolist()
                seg = [[x0, y0, x1, y0, x1, y1, x0, y1]]
            annotations.append({"id": len(annotations) + 1, "image_id": 100 + n,
                                "category_id": int(ex["objects"]["category_id"][k]),
                                "segmentation": seg, "iscrowd": 0,
                                "bbox": xyxy_to_xywh(boxes_from_masks(mask[None]))[0].tolist()})
    annotations.append({"id": 999, "image_id": 100, "category_id": 1, "iscrowd": 1,
                        "segmentation": encode_rle(np.ones((96, 96), bool))})
    if bad_rle:
        annotations.append({"id": 1000, "image_id": 101, "category_id": 1, "iscrowd": 0,
                            "segmentation": encode_rle(np.ones((50, 50), bool))})
    if bad_image:
        (tmp_path / "img" / "003.png").write_bytes(b"not a png")
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": c} for c in range(1, 9)]}))
    return path, tmp_path / "img"


def test_synthesize_from_coco(tmp_path, caplog):
    ann, img = _write_coco(tmp_path, bad_image=True, bad_rle=True)
    config = al.SynthesisConfig(occlusion_range=(0.15, 0.5), min_area=100)
    stats = al.SynthesisStats()
    with caplog.at_level(logging.WARNING):
        examples = list(al.synthesize_from_coco(ann, img, seed=0, config=config, stats=stats))
    assert stats.images == 3 and stats.images_skipped == 1  # 003.png is corrupt
    assert stats.instances_bad_mask == 1  # the 50 x 50 RLE on a 96 x 96 image
    assert "003.png" in caplog.text and "RLE size" in caplog.text
    _check_examples(examples, config)
    assert {int(e["image_id"]) for e in examples if e["image_id"] < al.SYNTHETIC_ID_STRIDE} <= {
        100, 101, 102}
    # The crowd annotation (whole image) is ignored: no instance covers the full frame.
    assert all(e["objects"]["amodal_mask"].reshape(len(e["objects"]["amodal_mask"]), -1)
               .mean(1).max() < 0.5 for e in examples)


def test_coco_bad_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        al.CocoInstanceSource(tmp_path / "missing.json", tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "height": 4}],
                               "annotations": []}))
    with pytest.raises(ValueError, match=r"bad.json: images\[0\] has no field 'width'"):
        al.CocoInstanceSource(bad, tmp_path)
    bad.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="missing list field 'images'"):
        al.CocoInstanceSource(bad, tmp_path)


def test_preview_cli(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert al.main(["--preview", str(out), "--num", "3", "--seed", "1"]) == 0
    grid = np.asarray(Image.open(out))
    assert grid.ndim == 3 and grid.shape[0] > 3 * 192 and grid.std() > 10
    with pytest.raises(SystemExit):
        al.main(["--preview", str(out)])  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert al.main(["--preview", str(out), "--num", "1", "--overwrite"]) == 0


def test_curriculum_range_and_config_checks():
    assert al.curriculum_range(0.0) == (0.05, 0.3)
    assert al.curriculum_range(1.0) == pytest.approx((0.3, 0.7))
    assert al.curriculum_range(0.5) == pytest.approx((0.175, 0.5))
    with pytest.raises(ValueError, match="occlusion_range"):
        al.SynthesisConfig(occlusion_range=(0.0, 0.5))


# ----------------------------------------------------------------------------- the build


def _write_release(root, num_images, size=160, seed=4):
    """COCO 2017 layout (annotations/instances_val2017.json + val2017/*.jpg) of unoccluded
    demo scenes, modal masks as RLE. Returns (annotation file, image folder)."""
    scenes = DemoSource(2 * num_images, image_size=size, seed=seed)
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    images, annotations = [], []
    for n in range(num_images):
        ex = scenes[2 * n + 1]  # the odd scenes are the unoccluded duals
        name = f"{n + 1:012d}.jpg"
        Image.fromarray(ex["image"]).save(root / "val2017" / name, quality=90)
        images.append({"id": n + 1, "file_name": name, "height": size, "width": size})
        for k, mask in enumerate(ex["objects"]["visible_mask"]):
            annotations.append({"id": len(annotations) + 1, "image_id": n + 1,
                                "category_id": int(ex["objects"]["category_id"][k]),
                                "segmentation": encode_rle(mask), "iscrowd": 0})
    path = root / "annotations" / "instances_val2017.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": c} for c in range(1, 9)]}))
    return path, root / "val2017"


def _build(manual, data, *flags):
    assert build.main(["amodal_lvis/coco", "--manual_dir", str(manual), "--data_dir",
                       str(data), "--split", "validation", *flags]) == 0
    return sources.open_source("amodal_lvis/coco", "validation", str(data))


def _by_id(source):
    return {int(source[i]["image_id"]): source[i] for i in range(len(source))}


def test_build_does_not_depend_on_the_worker_count(tmp_path, capsys):
    """3 shards of 4, 3 and 2 images in one process and in two: the same examples, which are
    those the in-memory synthesis makes with the same shards."""
    ann, img = _write_release(tmp_path / "manual", 10)
    one = _by_id(_build(tmp_path / "manual", tmp_path / "one", "--workers", "1",
                        "--shard_size", "4"))
    two = _by_id(_build(tmp_path / "manual", tmp_path / "two", "--workers", "2",
                        "--shard_size", "4"))
    assert "images read: 10" in capsys.readouterr().out
    assert one.keys() == two.keys()
    for key in one:
        _assert_same(two[key], one[key])
    config = al.SynthesisConfig(shard_size=4)
    expected = list(al.synthesize_from_coco(ann, img, config=config))
    assert sum(int(e["image_id"]) >= al.SYNTHETIC_ID_STRIDE for e in expected) >= 10
    assert sorted(one) == sorted(int(e["image_id"]) for e in expected)
    for ref in expected:
        _assert_same(one[int(ref["image_id"])], ref)
    _check_examples(expected, config)
    # The shards are part of the recipe: one shard of all images draws other occluders.
    whole = list(al.synthesize_from_coco(ann, img, config=al.SynthesisConfig(shard_size=10)))
    assert any(not np.array_equal(a["image"], b["image"])
               for a, b in zip(expected, whole, strict=True))


def _records(data):
    """The serialized records of a built split, in the order the source reads them."""
    from array_record.python.array_record_module import ArrayRecordReader

    out = []
    for path in sorted(data.rglob("*.array_record-*")):
        reader = ArrayRecordReader(str(path))
        out += reader.read_all()
        reader.close()
    return out


def _pooled_bytes_bound(mask: np.ndarray, size: int) -> int:
    """Most bytes a stored pooled mask may take: its header and a bit per cell that the
    mask's pixel box touches."""
    y, x = np.nonzero(mask)
    if not y.size:
        return 0
    (h, w), (y0, y1), (x0, x1) = mask.shape, (y.min(), y.max() + 1), (x.min(), x.max() + 1)
    rows = -(-y1 * size // h) - y0 * size // h
    cols = -(-x1 * size // w) - x0 * size // w
    return 10 + -(-rows * cols // 8)


def test_stored_form_keeps_the_source_file_and_composes_exactly(tmp_path):
    """Each record holds its source JPEG's own bytes; the read-time composition is the
    decoded JPEG with the occluder patch written under the occluder's mask, nothing else; the
    records stay within the JPEG plus masks and one small patch."""
    _, img = _write_release(tmp_path / "manual", 6)
    built = _build(tmp_path / "manual", tmp_path / "data", "--workers", "1")
    records = _records(tmp_path / "data")
    assert len(records) == len(built) > 6
    files = {int(p.stem): p.read_bytes() for p in img.iterdir()}
    patched = 0
    for i, record in enumerate(records):
        example = built[i]
        source_id = int(example["image_id"]) % al.SYNTHETIC_ID_STRIDE
        assert files[source_id] in record  # stored as it was, not re-encoded
        raw = built._source[i]  # the record decoded by TFDS, before composition
        decoded = np.asarray(Image.open(img / f"{source_id:012d}.jpg"))
        np.testing.assert_array_equal(raw["image"], decoded)
        patches = occluders.stored_patches(raw["occluders"])
        o = example["objects"]
        if example["image_id"] < al.SYNTHETIC_ID_STRIDE:
            assert patches == []
            np.testing.assert_array_equal(example["image"], decoded)
            continue
        (patch,) = patches
        occluder = o["amodal_mask"][-1]
        np.testing.assert_array_equal(occluder, patch.full_mask(decoded.shape[:2]))
        np.testing.assert_array_equal(example["image"][~occluder], decoded[~occluder])
        h, w = patch.mask.shape
        region = example["image"][patch.top : patch.top + h, patch.left : patch.left + w]
        np.testing.assert_array_equal(region[patch.mask], patch.pixels[patch.mask])
        assert not patch.pixels[~patch.mask].any()
        patched += 1
        # The stored pooled masks: those of the composed example's masks.
        stored = built.record(i)
        for kind in ("amodal", "visible"):
            full = o[f"{kind}_mask"]
            pooled, _ = stored.pooled_masks(kind, np.arange(len(full)), 256)
            np.testing.assert_array_equal(pooled, pipeline.downsample_masks(full, 256))
        # Bytes: the JPEG, 1-bit PNG masks (< 400 bytes each at 160 x 160: the objects' masks
        # twice, the patch's once), the pooled masks (10 bytes and a bit per cell their box
        # touches, at most), the patch pixels as PNG (at most their raw size + 1 KB) and 1 KB
        # for the other fields.
        cells = sum(_pooled_bytes_bound(m, 256) for kind in ("amodal", "visible")
                    for m in o[f"{kind}_mask"])
        bound = (len(files[source_id]) + 400 * (2 * len(o["amodal_mask"]) + 1) + cells
                 + patch.pixels.size + 1024 + 1024)
        assert len(record) <= bound
    assert patched >= 6


def test_completeness_by_model_checkpoint(tmp_path, capsys):
    """--completeness_checkpoint: the complete objects are those whose predicted amodal mask
    (tiny model, best of three) overlaps their modal mask at IoU >= --completeness_iou."""
    import jax

    from sameo_jax.masks import mask_iou
    from sameo_jax.model_io import save_params
    from sameo_jax.models.config import model_config
    from sameo_jax.models.efficient_sam import param_shapes

    ann, img = _write_release(tmp_path / "manual", 4)
    config = model_config("tiny")
    rng = np.random.default_rng(0)  # random weights: a model whose IoUs spread
    params = jax.tree_util.tree_map(
        lambda s: (0.02 * rng.standard_normal(s.shape)).astype(np.float32), param_shapes(config))
    ckpt = save_params(params, tmp_path / "ckpt", config)
    predict = build.CheckpointCompleteness(ckpt)
    source = al.CocoInstanceSource(ann, img)
    ious = []
    for i in range(len(source)):
        item = source[i]
        ious += [mask_iou(predict(item.image, box), mask)
                 for mask, box in zip(item.masks, boxes_from_masks(item.masks), strict=True)]
    threshold = float(np.median(ious))
    assert min(ious) < threshold <= max(ious)  # the rule keeps some objects, not all
    expected_complete = sum(iou >= threshold for iou in ious)
    config = al.SynthesisConfig(model_iou_threshold=threshold)
    expected = list(al.synthesize(source, config=config, predict_amodal=predict))
    built = _by_id(_build(tmp_path / "manual", tmp_path / "data", "--workers", "1",
                          "--completeness_checkpoint", str(ckpt),
                          "--completeness_iou", repr(threshold)))
    assert f"complete: {expected_complete}," in capsys.readouterr().out
    assert sorted(built) == sorted(int(e["image_id"]) for e in expected)
    for ref in expected:
        _assert_same(built[int(ref["image_id"])], ref)


def test_build_option_errors(tmp_path, capsys):
    _write_release(tmp_path / "manual", 2)
    base = ["--manual_dir", str(tmp_path / "manual"), "--data_dir", str(tmp_path / "data")]
    cases = [
        (["amodal_lvis/coco", *base, "--completeness_checkpoint", str(tmp_path / "none")],
         "none"),
        (["amodal_lvis/coco", *base, "--completeness_iou", "0.5"], "--completeness_checkpoint"),
        (["amodal_lvis/coco", *base, "--completeness_iou", "1.5"], "(0, 1]"),
        (["amodal_lvis/coco", *base, "--workers", "0"], "--workers"),
        (["amodal_lvis/coco", *base, "--beam_options=--x=1"], "--beam_runner"),
        (["demo", "--data_dir", str(tmp_path / "data"), "--workers", "2"],
         "only for amodal_lvis"),
    ]
    for argv, text in cases:
        try:
            code = build.main(argv)
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (argv, err)
        assert text in err, (argv, err)
    assert not (tmp_path / "data" / "amodal_lvis").exists()


def test_read_time_composition_checks_patches():
    image = np.zeros((20, 30, 3), np.uint8)
    patch = occluders.OccluderPatch(np.full((4, 5, 3), 7, np.uint8), np.ones((4, 5), bool), 16, 25)
    out = occluders.paste_occluders(image, [patch])
    assert out[16:, 25:].min() == 7 and out.sum() == 7 * 4 * 5 * 3 and image.sum() == 0
    with pytest.raises(ValueError, match="does not fit the 20x30 image"):
        occluders.paste_occluders(image, [dataclasses.replace(patch, top=17)])
    with pytest.raises(ValueError, match="2 pixel patches, 1 masks"):
        occluders.stored_patches({"pixels": [patch.pixels] * 2, "mask": [patch.mask[..., None]],
                           "top_left": [[0, 0]]})


def test_beam_build_equals_the_local_build(tmp_path):
    """The Apache Beam route (optional dependency) gives the local build's examples."""
    pytest.importorskip("apache_beam")
    _write_release(tmp_path / "manual", 5)
    local = _by_id(_build(tmp_path / "manual", tmp_path / "local", "--workers", "1",
                          "--shard_size", "3"))
    beam = _by_id(_build(tmp_path / "manual", tmp_path / "beam", "--beam_runner",
                         "DirectRunner", "--shard_size", "3"))
    assert local.keys() == beam.keys()
    for key in local:
        _assert_same(beam[key], local[key])


def test_a_dying_worker_is_an_error_not_a_hang():
    from datasets.amodal_lvis import amodal_lvis_dataset_builder as lvis_builder

    with pytest.raises(ChildProcessError, match="worker process ended unexpectedly"):
        list(lvis_builder.run_shards(os._exit, [3, 3, 3], workers=2))


def test_benchmark_row_runs_the_command(benchmark_module):
    """benchmarks/pipeline_rows.py `amodal_lvis_build` on 3 generated images: the command's
    CPU time and the stored bytes per example, which hold the source JPEG."""
    row, = benchmark_module("pipeline_rows").run(["amodal_lvis_build"], images=3, workers=1)
    assert row["name"] == "amodal_lvis_build" and row["examples"] >= 6
    assert row["cpu_ms_per_example"] > 0 and row["seconds"] > 0
    jpeg = row["source_jpeg_bytes_per_image"]
    assert jpeg < row["bytes_per_example"] < jpeg + 16_000
