"""Amodal-LVIS synthesis: complete-object rules, occluder placement, dual annotation, COCO input."""

import dataclasses
import json
import logging

import numpy as np
import pytest
from PIL import Image

from sameo_jax.boxes import boxes_from_masks, xyxy_to_xywh
from sameo_jax.data import amodal_lvis as al
from sameo_jax.data.demo_scenes import DemoSource
from sameo_jax.masks import encode_rle


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
            top, left, frac = al.place_occluder(target, occluder, (lo, hi), rng, avoid=avoid)
            assert lo <= frac <= hi
            assert 0 <= top <= 120 - 44 and 0 <= left <= 120 - 44
            covered = np.zeros_like(target)
            covered[top : top + 44, left : left + 44] = occluder
            assert (covered & target).sum() / target.sum() == pytest.approx(frac)
            assert not (covered & avoid).any()
    # A tiny occluder cannot hide 80 %: no placement, not a wrong one.
    assert al.place_occluder(target, occluder[:5, :5], (0.8, 0.9), rng) is None
    with pytest.raises(ValueError, match="occlusion_range"):
        al.place_occluder(target, occluder, (0.5, 0.1), rng)


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
