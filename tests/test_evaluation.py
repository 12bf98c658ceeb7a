"""Tests for sameo_jax.evaluation: COCO results files, COCOeval wrapper, occlusion breakdown,
runner and the evaluate.py entry point."""

import contextlib
import copy
import dataclasses
import io
import json
import math
import os
import pathlib

import numpy as np
import pytest
from pycocotools.cocoeval import COCOeval

from sameo_jax import masks as mask_lib
from sameo_jax.evaluation import coco_eval, coco_results, occlusion, pictures, runner

from .conftest import random_params

# ----------------------------------------------------------------------------- fixtures
#
# Image 1 (20 x 20), category 1:
#   A: amodal rows 2:10, cols 2:10 (64 px); visible cols 2:7 (40 px) -> rate 0.375 (heavy),
#      visible/amodal IoU 0.625.
#   B: amodal rows 12:18, cols 12:18 (36 px); fully visible -> rate 0 (none), IoU 1.
# Image 2 (16 x 12), category 2:
#   C: amodal rows 0:10, cols 0:10 (100 px); visible 78 px -> rate 0.22 (partial), IoU 0.78.


def _example(image_id, h, w, amodal, visible, cats):
    amodal = np.stack(amodal).astype(bool)
    visible = np.stack(visible).astype(bool)
    rates = 1.0 - visible.sum((1, 2)) / amodal.sum((1, 2))
    return {
        "image": np.full((h, w, 3), 90, np.uint8),
        "image_id": np.int64(image_id),
        "source": "test",
        "objects": {
            "amodal_mask": amodal,
            "visible_mask": visible,
            "amodal_bbox": np.zeros((len(cats), 4), np.float32),
            "visible_bbox": np.zeros((len(cats), 4), np.float32),
            "category_id": np.asarray(cats, np.int64),
            "occlusion_rate": rates.astype(np.float32),
        },
    }


def make_examples():
    a = np.zeros((20, 20), bool)
    a[2:10, 2:10] = True
    a_vis = np.zeros_like(a)
    a_vis[2:10, 2:7] = True
    b = np.zeros((20, 20), bool)
    b[12:18, 12:18] = True
    c = np.zeros((16, 12), bool)
    c[0:10, 0:10] = True
    c_vis = np.zeros_like(c)
    c_vis[0:10, 0:7] = True
    c_vis[0:8, 7] = True
    return [
        _example(1, 20, 20, [a, b], [a_vis, b], [1, 1]),
        _example(2, 16, 12, [c], [c_vis], [2]),
    ]


def _results(examples, which, scores=(0.8, 0.9, 0.7), with_instance=False, category=None):
    out = []
    k = 0
    for ex in examples:
        objs = ex["objects"]
        for i in range(len(objs["category_id"])):
            extra = {"gt_instance": i} if with_instance else {}
            cat = int(objs["category_id"][i]) if category is None else category
            out.append(
                coco_results.mask_result(
                    ex["image_id"], cat, objs[which][i], scores[k], **extra
                )
            )
            k += 1
    return out


def _pycocotools_direct(coco_gt, results):
    """Scores results the plain pycocotools way (loadRes + COCOeval), as a reference."""
    plain = [{k: v for k, v in r.items() if k != "bbox"} for r in copy.deepcopy(results)]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(plain)
        ev = COCOeval(coco_gt, coco_dt, iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


# ----------------------------------------------------------------------------- COCO AP


def test_ground_truth_fields():
    gt = coco_eval.ground_truth_from_examples(make_examples())
    assert sorted(gt.getImgIds()) == [1, 2]
    assert gt.getCatIds() == [1, 2]
    anns = gt.loadAnns(gt.getAnnIds())
    assert [a["area"] for a in anns] == [64, 36, 100]
    assert anns[0]["bbox"] == [2.0, 2.0, 8.0, 8.0]
    assert all(a["iscrowd"] == 0 for a in anns)
    assert isinstance(anns[0]["segmentation"]["counts"], str)
    np.testing.assert_allclose([a["occlusion_rate"] for a in anns], [0.375, 0.0, 0.22], atol=1e-6)


def test_gt_amodal_masks_as_predictions_give_ap_one():
    examples = make_examples()
    gt = coco_eval.ground_truth_from_examples(examples)
    metrics = coco_eval.coco_metrics(gt, _results(examples, "amodal_mask"))
    assert metrics["AP"] == pytest.approx(1.0)
    assert metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AP75"] == pytest.approx(1.0)
    assert metrics["APs"] == pytest.approx(1.0)  # every instance is small (< 32^2 px)
    assert metrics["APm"] == -1.0 and metrics["APl"] == -1.0  # no GT in those ranges
    # One detection per image finds one of image 1's two category-1 instances.
    assert metrics["AR1"] == pytest.approx((0.5 + 1.0) / 2)
    assert metrics["AR10"] == pytest.approx(1.0)
    assert metrics["AR100"] == pytest.approx(1.0)


def test_visible_masks_as_predictions_match_pycocotools_and_hand_value():
    examples = make_examples()
    gt = coco_eval.ground_truth_from_examples(examples)
    results = _results(examples, "visible_mask", scores=(0.8, 0.9, 0.7))
    metrics = coco_eval.coco_metrics(gt, results)
    reference = _pycocotools_direct(gt, results)
    np.testing.assert_allclose(
        [metrics[k] for k in coco_eval.METRIC_NAMES], reference[:9], rtol=0, atol=1e-12
    )
    # By hand: category 1 -- B (score 0.9, IoU 1) always matches; A (0.8, IoU 0.625) matches
    # at thresholds 0.50/0.55/0.60; otherwise recall stops at 0.5 (51 of 101 recall points).
    # Category 2 -- C (IoU 0.78) matches at 0.50 ... 0.75 (6 of 10 thresholds).
    cat1 = (3 * 1.0 + 7 * 51 / 101) / 10
    cat2 = 6 / 10
    assert metrics["AP"] == pytest.approx((cat1 + cat2) / 2)
    assert metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AP75"] == pytest.approx((51 / 101 + 1.0) / 2)


def test_results_file_is_not_mutated_and_area_is_mask_area():
    examples = make_examples()
    gt = coco_eval.ground_truth_from_examples(examples)
    results = _results(examples, "visible_mask")
    before = copy.deepcopy(results)
    dt = coco_eval.results_to_coco(gt, results)
    assert results == before
    assert [a["area"] for a in dt.loadAnns(dt.getAnnIds())] == [40.0, 36.0, 78.0]


def test_empty_results_score_zero():
    gt = coco_eval.ground_truth_from_examples(make_examples())
    metrics = coco_eval.coco_metrics(gt, [])
    assert metrics["AP"] == 0.0 and metrics["AR100"] == 0.0


def test_class_agnostic_mode_ignores_categories():
    examples = make_examples()
    # Right masks, wrong categories (every prediction says category 2).
    results = _results(examples, "amodal_mask", category=2)
    gt = coco_eval.ground_truth_from_examples(examples)
    aware = coco_eval.coco_metrics(gt, results)
    # Category 1's two instances are missed; category 2 gets C right plus two FPs of lower
    # or higher score: A (0.8) and B (0.9) rank above C (0.7) -> precision 1/3 at recall 1.
    assert aware["AP"] == pytest.approx((0.0 + 1 / 3) / 2)
    gt_agnostic = coco_eval.ground_truth_from_examples(examples, class_agnostic=True)
    assert gt_agnostic.getCatIds() == [1]
    agnostic = coco_eval.coco_metrics(gt_agnostic, results, class_agnostic=True)
    assert agnostic["AP"] == pytest.approx(1.0)
    # useCats=0 on a GT that keeps its categories pools them too.
    assert coco_eval.coco_metrics(gt, results, class_agnostic=True)["AP"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- occlusion


def test_occlusion_levels():
    assert occlusion.occlusion_level(0.0) == "none"
    assert occlusion.occlusion_level(1e-9) == "none"
    assert occlusion.occlusion_level(0.1) == "partial"
    assert occlusion.occlusion_level(0.25) == "partial"
    assert occlusion.occlusion_level(0.2500001) == "heavy"
    assert occlusion.occlusion_level(0.9) == "heavy"


def test_occlusion_breakdown_of_gt_amodal_predictions():
    examples = make_examples()
    gt = coco_eval.ground_truth_from_examples(examples)
    out = occlusion.occlusion_breakdown(gt, _results(examples, "amodal_mask", with_instance=True))
    for level in ("none", "partial", "heavy"):
        assert out[level]["num_instances"] == 1
        assert out[level]["AP"] == pytest.approx(1.0)
        assert out[level]["mIoU"] == pytest.approx(1.0)
    assert out["none"]["invisible_mIoU"] is None  # nothing hidden
    assert out["heavy"]["invisible_mIoU"] == pytest.approx(1.0)
    assert out["all"]["num_instances"] == 3


def test_occlusion_breakdown_of_visible_predictions_by_hand():
    examples = make_examples()
    gt = coco_eval.ground_truth_from_examples(examples)
    out = occlusion.occlusion_breakdown(gt, _results(examples, "visible_mask"))
    assert out["none"]["mIoU"] == pytest.approx(1.0)
    assert out["partial"]["mIoU"] == pytest.approx(0.78)
    assert out["heavy"]["mIoU"] == pytest.approx(0.625)
    assert out["all"]["mIoU"] == pytest.approx((1.0 + 0.78 + 0.625) / 3)
    # Visible masks predict nothing of the hidden part.
    assert out["heavy"]["invisible_mIoU"] == 0.0
    assert out["all"]["invisible_mIoU"] == 0.0
    # Per-level AP with the other levels' instances ignored: A alone (IoU 0.625) matches at
    # 3 of 10 thresholds; C alone at 6 of 10; B at all.
    assert out["heavy"]["AP"] == pytest.approx(0.3)
    assert out["heavy"]["AP50"] == pytest.approx(1.0)
    assert out["partial"]["AP"] == pytest.approx(0.6)
    assert out["none"]["AP"] == pytest.approx(1.0)


def test_invisible_iou_counts_only_the_hidden_part():
    examples = make_examples()
    gt = coco_eval.ground_truth_from_examples(examples)
    # Prediction for A: visible part plus half of the hidden columns (7:10 hidden, take 7:8
    # ... rows 2:10) -> hidden predicted 8 px of 24 -> invisible IoU 1/3.
    pred = examples[0]["objects"]["visible_mask"][0].copy()
    pred[2:10, 7:8] = True
    results = [coco_results.mask_result(1, 1, pred, 0.9, gt_instance=0)]
    rows = {r["ann_id"]: r for r in occlusion.instance_ious(gt, results)}
    assert rows[1]["invisible_iou"] == pytest.approx(8 / 24)
    assert rows[1]["amodal_iou"] == pytest.approx(48 / 64)
    assert rows[2]["amodal_iou"] == 0.0  # B has no prediction


def test_pairing_prefers_own_prompt_over_best_iou():
    examples = make_examples()
    gt = coco_eval.ground_truth_from_examples(examples)
    objs = examples[0]["objects"]
    # The prediction made from A's prompt is B's mask; a better one for A exists without tag.
    results = [
        coco_results.mask_result(1, 1, objs["amodal_mask"][1], 0.9, gt_instance=0),
        coco_results.mask_result(1, 1, objs["amodal_mask"][0], 0.5),
    ]
    rows = {r["ann_id"]: r for r in occlusion.instance_ious(gt, results)}
    assert rows[1]["amodal_iou"] == 0.0  # paired with its own (wrong) prediction
    assert rows[2]["amodal_iou"] == 0.0  # B: best untagged prediction is A's mask


# ----------------------------------------------------------------------------- files


def _det(image_id=1, category_id=1, bbox=(2, 2, 8, 8), score=0.9, **kw):
    d = {"image_id": image_id, "category_id": category_id, "bbox": list(bbox), "score": score}
    d.update(kw)
    return d


def test_parse_detections_counts_and_reports_bad_entries():
    sizes = {1: (20, 20), 2: (16, 12)}
    entries = [
        _det(),
        _det(image_id=999),
        {"image_id": 1, "bbox": [0, 0, 4, 4], "score": 0.5},
        _det(bbox=(2, 2, -3, 4)),
        _det(bbox=(float("nan"), 2, 3, 4)),
        _det(score=float("nan")),
        _det(bbox=(1, 2, 3)),
        _det(image_id=2, bbox=(0, 0, 5, 5), segmentation={"size": [20, 20], "counts": "00"}),
        "not an object",
        _det(image_id=2, bbox=(0.5, 1.5, 2.0, 3.0), score=1),
    ]
    dets, report = coco_results.parse_detections(entries, "dets.json", sizes)
    assert [d.index for d in dets] == [0, 9]
    np.testing.assert_allclose(dets[1].box, [0.5, 1.5, 2.5, 4.5])
    assert report.total == 10 and report.kept == 2 and report.skipped == 8
    assert report.problems["an unknown image_id"] == 1
    assert report.problems["missing key 'category_id'"] == 1
    assert report.problems["a negative bbox width/height"] == 1
    assert report.problems["a non-finite bbox"] == 1
    assert report.problems["a missing or non-finite score"] == 1
    assert report.problems["a bbox that is not 4 numbers"] == 1
    assert report.problems["a bad segmentation (RLE size disagrees with the image)"] == 1
    assert report.problems["an entry that is not an object"] == 1
    line = report.summary()
    assert line.startswith("dets.json: using 2 of 10 entries; skipped")
    assert "entry 1: image_id 999" in line and "\n" not in line
    assert "RLE size [20, 20] but the image is [16, 12]" in line


def test_parse_detections_with_nothing_usable_is_an_error():
    with pytest.raises(ValueError, match="no usable detections.*unknown image_id"):
        coco_results.parse_detections([_det(image_id=5)], "d.json", {1: (20, 20)})


def test_read_json_list_errors(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match="empty.json: the file contains an empty list"):
        coco_results.read_json_list(empty)
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        coco_results.read_json_list(broken)
    obj = tmp_path / "obj.json"
    obj.write_text('{"a": 1}')
    with pytest.raises(ValueError, match="expected a JSON list"):
        coco_results.read_json_list(obj)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        coco_results.read_json_list(tmp_path / "missing.json")
    nan = tmp_path / "nan.json"
    nan.write_text('[{"image_id": 1, "category_id": 1, "bbox": [NaN, 0, 1, 1], "score": 1}]')
    entries = coco_results.read_json_list(nan)
    with pytest.raises(ValueError, match="non-finite bbox"):
        coco_results.parse_detections(entries, "nan.json", {1: (4, 4)})


def test_parse_results_normalises_and_checks_sizes():
    examples = make_examples()
    gt_builder = coco_eval.GroundTruthBuilder()
    for ex in examples:
        gt_builder.add(ex)
    good = _results(examples, "amodal_mask", with_instance=True)
    poly = {"image_id": 1, "category_id": 1, "segmentation": [[2, 2, 10, 2, 10, 10, 2, 10]],
            "score": 0.3}
    wrong_size = copy.deepcopy(good[2])
    wrong_size["image_id"] = 1  # a 16 x 12 mask on the 20 x 20 image
    entries = [*good, poly, wrong_size, {"image_id": 1, "category_id": 1, "score": 1.0}]
    results, report = coco_results.parse_results(entries, "r.json", gt_builder.image_sizes)
    assert report.kept == 4 and report.skipped == 2
    assert report.problems["a bad segmentation (RLE size disagrees with the image)"] == 1
    assert report.problems["missing key 'segmentation'"] == 1
    assert isinstance(results[3]["segmentation"]["counts"], str)
    assert results[0]["gt_instance"] == 0
    decoded = mask_lib.decode_segmentation(results[3]["segmentation"], 20, 20)
    assert decoded[2:10, 2:10].all() and decoded.sum() == 64


def test_write_json_never_overwrites_without_flag(tmp_path):
    path = tmp_path / "out" / "r.json"
    coco_results.write_json(path, [1])
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        coco_results.write_json(path, [2])
    assert json.loads(path.read_text()) == [1]
    coco_results.write_json(path, [2], overwrite=True)
    assert json.loads(path.read_text()) == [2]


def test_mask_result_is_json_ready():
    m = np.zeros((5, 6), bool)
    m[1:3, 2:5] = True
    r = coco_results.mask_result(np.int64(3), np.int64(2), m, np.float32(0.5), gt_instance=1)
    text = json.dumps(r)
    back = json.loads(text)
    assert back["bbox"] == [2.0, 1.0, 3.0, 2.0]
    assert back["gt_instance"] == 1
    assert math.isclose(back["score"], 0.5)
    np.testing.assert_array_equal(mask_lib.decode_segmentation(back["segmentation"], 5, 6), m)


# ----------------------------------------------------------------------------- runner parts


def test_gt_prompts_use_the_chosen_boxes_and_skip_empty_instances():
    ex = make_examples()[0]
    ex["objects"]["amodal_bbox"] = np.array([[2, 2, 10, 10], [12, 12, 18, 18]], np.float32)
    ex["objects"]["visible_bbox"] = np.array([[2, 2, 7, 10], [12, 12, 18, 18]], np.float32)
    p = runner.gt_prompts(ex, "gt_amodal")
    np.testing.assert_array_equal(p.boxes, ex["objects"]["amodal_bbox"])
    np.testing.assert_array_equal(p.det_scores, [1.0, 1.0])
    np.testing.assert_array_equal(p.gt_instance, [0, 1])
    m = runner.gt_prompts(ex, "gt_modal")
    np.testing.assert_array_equal(m.boxes, ex["objects"]["visible_bbox"])
    ex["objects"]["amodal_mask"][0] = False
    p = runner.gt_prompts(ex, "gt_amodal", class_agnostic=True)
    np.testing.assert_array_equal(p.gt_instance, [1])
    np.testing.assert_array_equal(p.category_ids, [1])
    with pytest.raises(ValueError, match="unknown prompt kind"):
        runner.gt_prompts(ex, "amodal")


def test_refined_score_reranks_and_changes_ap():
    """Det scores rank a bad mask first; predicted IoUs push it last -> AP 2/3 vs 1."""
    examples = make_examples()
    gt = coco_eval.ground_truth_from_examples(examples)
    objs = examples[0]["objects"]
    junk = np.zeros((20, 20), bool)
    junk[0:2, 15:20] = True  # overlaps nothing
    prompts = runner.ImagePrompts(
        boxes=np.zeros((3, 4), np.float32),
        category_ids=np.array([1, 1, 1]),
        det_scores=np.array([0.6, 0.9, 0.5], np.float32),
        gt_instance=np.array([-1, -1, -1]),
    )
    masks = np.stack([objs["amodal_mask"][0], junk, objs["amodal_mask"][1]])
    ious = np.array([0.9, 0.3, 0.9], np.float32)
    out = runner.image_results(1, prompts, masks, ious)
    np.testing.assert_allclose([r["score"] for r in out["refined"]], [0.54, 0.27, 0.45],
                               rtol=1e-6)
    assert [r["segmentation"] for r in out["det"]] == [r["segmentation"] for r in out["refined"]]
    # Category 2 (image 2) has no prediction in either file: AP 0 there, so compare cat 1.
    one = coco_eval.ground_truth_from_examples(examples[:1])
    det = coco_eval.coco_metrics(one, out["det"])
    refined = coco_eval.coco_metrics(one, out["refined"])
    # Det order: junk (FP), A, B -> precision 2/3 at every recall level after interpolation.
    assert det["AP"] == pytest.approx(2 / 3)
    assert refined["AP"] == pytest.approx(1.0)
    assert coco_eval.coco_metrics(gt, out["refined"])["AP"] == pytest.approx(0.5)


def test_refined_scores_clip_the_iou():
    np.testing.assert_allclose(
        runner.refined_scores([0.5, 0.5, 1.0], [1.3, -0.2, 0.25]), [0.5, 0.0, 0.25]
    )


def test_detection_prompts_keep_the_top_scores():
    dets = [
        coco_results.Detection(1, 3, np.array([0, 0, 2, 2], np.float32), s, None, i)
        for i, s in enumerate([0.1, 0.7, 0.4])
    ]
    p = runner.detection_prompts(dets, max_per_image=2)
    np.testing.assert_allclose(p.det_scores, [0.7, 0.4])
    np.testing.assert_array_equal(p.gt_instance, [-1, -1])
    np.testing.assert_array_equal(p.category_ids, [3, 3])


def test_detection_prompts_count_images_never_read(tmp_path):
    path = tmp_path / "dets.json"
    ex = make_examples()
    entries = [_det(image_id=1), _det(image_id=1, score=0.2), _det(image_id=7),
               _det(image_id=2, bbox=(0, 0, 3, 3),
                    segmentation=mask_lib.encode_rle(np.zeros((20, 20), bool)))]
    path.write_text(json.dumps(entries))
    dp = runner.DetectionPrompts(str(path), max_per_image=1)
    p1 = dp(ex[0])
    assert len(p1) == 1 and p1.det_scores[0] == pytest.approx(0.9)
    assert dp(ex[1]) is None  # its only detection has a visible mask of the wrong size
    report = dp.finish()
    assert report.kept == 1 and report.total == 4
    assert report.problems["an unknown image_id"] == 1
    assert report.problems["a bad segmentation (RLE size disagrees with the image)"] == 1
    assert report.problems["a score rank > 1 in its image"] == 1
    only_unknown = tmp_path / "unknown.json"
    only_unknown.write_text(json.dumps([_det(image_id=7)]))
    dp = runner.DetectionPrompts(str(only_unknown))
    dp(ex[0])
    with pytest.raises(ValueError, match="no usable detections.*unknown image_id"):
        dp.finish()


def test_evaluation_panel_shape():
    ex = make_examples()[0]
    results = _results([ex], "amodal_mask", scores=(0.5, 0.9))
    panel = pictures.evaluation_panel(ex, results)
    assert panel.dtype == np.uint8
    side = 20 * pictures.MAX_ENLARGE  # a 20 x 20 image is enlarged 8x (the cap)
    assert panel.shape[1] == 4 * side + 3 * 4
    assert side < panel.shape[0] < side + 40  # the title strip


def test_demo_split_has_the_demo_training_scenes(tmp_path):
    """evaluate.py --split demo scores the demo model on scenes like those it trained on."""
    from configs.sameo import get_config
    from sameo_jax.evaluation import evaluator

    data = get_config("demo").data
    scenes = evaluator.DEMO_SCENES
    assert scenes["image_size"] == data.demo_image_size
    assert scenes["object_size"] == tuple(data.demo_object_size)
    assert scenes["occlusion_range"] == tuple(data.demo_occlusion_range)
    source = evaluator.open_split(_demo_options(tmp_path))
    assert len(source) == 200 and source[0]["image"].shape == (128, 128, 3)
    rates = np.concatenate([source[i]["objects"]["occlusion_rate"] for i in range(0, 20, 2)])
    occluded = rates[rates > 0]
    assert occluded.size and occluded.min() >= 0.3 - 0.02 and occluded.max() <= 0.7 + 0.02
    with pytest.raises(ValueError, match="demo: unknown split 'val'"):
        evaluator.open_split(_demo_options(tmp_path, data_split="val"))


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_predictor():
    from sameo_jax.models.efficient_sam import model_config
    from sameo_jax.predictor import Predictor

    config = model_config("tiny")
    return Predictor(config, random_params(config))


def _demo_options(tmp_path, **kw):
    from sameo_jax.evaluation.evaluator import EvalOptions

    base = dict(split="demo", max_images=3, out_dir=str(tmp_path / "out"), progress=False)
    base.update(kw)
    return EvalOptions(**base)


def _check_metrics(m):
    for name in coco_eval.METRIC_NAMES:
        assert m[name] == -1.0 or 0.0 <= m[name] <= 1.0, (name, m[name])
    for level in ("none", "partial", "heavy", "all"):
        row = m["occlusion"][level]
        for key in ("AP", "AP50", "mIoU", "invisible_mIoU"):
            v = row.get(key)
            assert v is None or v == -1.0 or 0.0 <= v <= 1.0, (level, key, v)


def test_evaluate_demo_end_to_end(tmp_path, tiny_predictor, capsys):
    from sameo_jax.evaluation import evaluator

    source = evaluator.open_split(_demo_options(tmp_path))
    n_instances = sum(len(source[i]["objects"]["category_id"]) for i in range(3))
    o = _demo_options(tmp_path, json=str(tmp_path / "metrics.json"), visualize=2)
    summary = evaluator.evaluate(o, predictor=tiny_predictor)
    printed = capsys.readouterr().out
    assert "AP50" in printed and "refined" in printed and "heavy" in printed

    paths = evaluator.output_paths(o)
    assert set(paths) == {"det", "refined"}
    det = json.loads(open(paths["det"]).read())
    refined = json.loads(open(paths["refined"]).read())
    assert len(det) == len(refined) == n_instances == summary["num_instances"]
    assert all(isinstance(r["segmentation"]["counts"], str) for r in det)
    assert all(r["score"] == 1.0 for r in det)  # GT prompts: detector score 1
    for d, r in zip(det, refined, strict=True):
        assert d["segmentation"] == r["segmentation"]
        assert r["score"] == pytest.approx(min(max(d["predicted_iou"], 0.0), 1.0), abs=1e-5)

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["num_images"] == 3 and metrics["prompts"] == "gt_amodal"
    for kind in ("det", "refined"):
        _check_metrics(metrics["scores"][kind])
    assert metrics["scores"]["det"]["occlusion"]["all"]["num_instances"] == n_instances
    pngs = sorted((tmp_path / "out").glob("*_pictures/*.png"))
    assert len(pngs) == 2

    # Nothing is written over without --overwrite, and the check comes before any model work.
    # (The checkpoint path does not exist: the file check must fail first.)
    o_ckpt = dataclasses.replace(o, checkpoint=str(tmp_path / "no_such_checkpoint"))
    with pytest.raises(FileExistsError, match="_best_det.json exists; pass --overwrite"):
        evaluator.evaluate(o_ckpt)
    os.remove(paths["det"])
    with pytest.raises(FileExistsError, match="_best_refined.json exists; pass --overwrite"):
        evaluator.evaluate(o_ckpt)
    assert not os.path.exists(paths["det"])
    assert json.loads(open(paths["refined"]).read()) == refined

    # --results re-scores the refined file to the same numbers without a model.
    again = evaluator.evaluate(_demo_options(tmp_path, results=paths["refined"]))
    got, want = again["scores"]["results"], summary["scores"]["refined"]
    for name in coco_eval.METRIC_NAMES:
        assert got[name] == pytest.approx(want[name])
    assert got["occlusion"] == want["occlusion"]


def test_evaluate_with_detections_file(tmp_path, tiny_predictor):
    """GT amodal boxes fed as a detector file give the same masks as --prompts gt_amodal;
    bad entries are counted, not fatal."""
    from sameo_jax.boxes import xyxy_to_xywh
    from sameo_jax.evaluation import evaluator

    source = evaluator.open_split(_demo_options(tmp_path))
    entries = []
    for i in range(2):
        ex = source[i]
        for box, cat in zip(ex["objects"]["amodal_bbox"], ex["objects"]["category_id"],
                            strict=True):
            entries.append({"image_id": int(ex["image_id"]), "category_id": int(cat),
                            "bbox": xyxy_to_xywh(box).tolist(), "score": 1.0})
    good = len(entries)
    entries += [
        {"image_id": 123456, "category_id": 1, "bbox": [1, 1, 5, 5], "score": 0.5},
        {"image_id": int(source[0]["image_id"]), "category_id": 1, "bbox": [1, 1, -5, 5],
         "score": 0.5},
        {"image_id": int(source[0]["image_id"]), "bbox": [1, 1, 5, 5], "score": 0.5},
    ]
    det_path = tmp_path / "detector.json"
    det_path.write_text(json.dumps(entries))
    o = _demo_options(tmp_path, detections=str(det_path), max_images=2)
    summary = evaluator.evaluate(o, predictor=tiny_predictor)
    inputs = summary["inputs"]["detections"]
    assert inputs["kept"] == good and inputs["total"] == good + 3
    assert inputs["skipped"] == {"an image outside --max_images": 1,
                                 "a negative bbox width/height": 1,
                                 "missing key 'category_id'": 1}
    from_dets = json.loads(open(evaluator.output_paths(o)["det"]).read())
    gt_run = evaluator.evaluate(_demo_options(tmp_path, max_images=2), predictor=tiny_predictor)
    from_gt = json.loads(open(gt_run["results_files"]["det"]).read())
    assert [r["segmentation"] for r in from_dets] == [r["segmentation"] for r in from_gt]
    _check_metrics(summary["scores"]["refined"])


def test_evaluate_rejects_bad_settings(tmp_path):
    from sameo_jax.evaluation import evaluator

    with pytest.raises(ValueError, match="--checkpoint is required"):
        evaluator.evaluate(_demo_options(tmp_path))
    with pytest.raises(ValueError, match="either --prompts"):
        evaluator.evaluate(_demo_options(tmp_path, prompts="gt_modal", detections="d.json"))
    with pytest.raises(ValueError, match="--split 'lvis'"):
        evaluator.evaluate(_demo_options(tmp_path, split="lvis"))
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match="empty list"):
        evaluator.evaluate(_demo_options(tmp_path, results=str(empty)))


def test_evaluate_command_line_with_saved_checkpoint(tmp_path):
    """evaluate.py as users run it: an orbax checkpoint of a tiny model, the demo split."""
    import subprocess
    import sys

    from sameo_jax.model_io import save_params
    from sameo_jax.models.efficient_sam import model_config

    config = model_config("tiny")
    ckpt = save_params(random_params(config, seed=1), tmp_path / "ckpt", config)
    repo = pathlib.Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    cmd = [sys.executable, str(repo / "evaluate.py"), "--split", "demo", "--checkpoint",
           str(ckpt), "--max_images", "2", "--candidate", "single", "--prompts", "gt_modal",
           "--out_dir", str(out), "--json", str(tmp_path / "m.json")]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "AR100" in run.stdout
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["prompts"] == "gt_modal" and metrics["candidate"] == "single"
    for kind in ("det", "refined"):
        _check_metrics(metrics["scores"][kind])
    assert sorted(p.name for p in out.iterdir()) == [
        "demo_gt_modal_single_det.json", "demo_gt_modal_single_refined.json"]
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env,
                           timeout=300)
    assert again.returncode == 1
    last = again.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "exists; pass --overwrite" in last


def test_results_mode_on_a_data_set_without_classes(tmp_path):
    """COCOA-style ground truth (category_id 0 = no class) is scored class-agnostic; any
    result category counts. Also: --results with a custom source and --max_images."""
    from sameo_jax.evaluation import evaluator

    examples = make_examples()
    for ex in examples:
        ex["objects"]["category_id"][:] = coco_eval.NO_CLASS
    results = _results(examples[:1], "amodal_mask", category=5)
    path = tmp_path / "res.json"
    path.write_text(json.dumps(results + [{**results[0], "image_id": 2}]))
    o = _demo_options(tmp_path, results=str(path), max_images=1, json=str(tmp_path / "m.json"))
    summary = evaluator.evaluate(o, source=examples)
    assert summary["class_agnostic"] is True
    assert summary["inputs"]["results"] == {"total": 3, "kept": 2,
                                            "skipped": {"an image outside --max_images": 1}}
    assert summary["scores"]["results"]["AP"] == pytest.approx(1.0)
    assert summary["scores"]["results"]["occlusion"]["heavy"]["mIoU"] == pytest.approx(1.0)
    assert json.loads((tmp_path / "m.json").read_text())["num_images"] == 1


def test_level_ap_counts_unmatched_predictions_only_in_their_own_level():
    examples = make_examples()
    gt = coco_eval.ground_truth_from_examples(examples)
    # A's visible mask now outranks B: at IoU thresholds > 0.625 it is unmatched, but it lies
    # on A (heavy), so it is no false positive for the 'none' level.
    results = _results(examples, "visible_mask", scores=(0.95, 0.9, 0.7))
    out = occlusion.occlusion_breakdown(gt, results)
    assert out["none"]["AP"] == pytest.approx(1.0)
    assert out["heavy"]["AP"] == pytest.approx(0.3)
    # A prediction that overlaps no instance is a false positive in every level.
    junk = np.zeros((20, 20), bool)
    junk[0:2, 15:20] = True
    results.append(coco_results.mask_result(1, 1, junk, 1.0))
    out = occlusion.occlusion_breakdown(gt, results)
    assert out["none"]["AP"] == pytest.approx(0.5)  # junk first, then B: precision 1/2
    assert out["heavy"]["AP"] == pytest.approx(3 * 0.5 / 10)
    assert out["partial"]["AP"] == pytest.approx(0.6)  # category 2: junk is category 1
