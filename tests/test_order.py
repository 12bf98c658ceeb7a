"""Occlusion order and depth layers (sameo_jax.order), the visible + amodal predictor, the
order evaluation (evaluate.py --order) and the `order` field of the data."""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from sameo_jax import order as order_lib
from sameo_jax.data.demo_scenes import DemoSource
from sameo_jax.evaluation import order_accuracy

from .conftest import REPO_ROOT, random_params


def _cli(cwd, script, *args):
    """Runs one of the entry scripts as a user would, on the CPU."""
    cmd = [sys.executable, str(REPO_ROOT / script), *map(str, args)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def _rect(y0, y1, x0, x1, h=40, w=40):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def _painted(amodal):
    """Visible masks of amodal masks painted bottom to top (the last one is in front)."""
    amodal = np.stack(amodal)
    visible = amodal.copy()
    above = np.zeros(amodal.shape[1:], bool)
    for k in range(len(amodal) - 1, -1, -1):
        visible[k] &= ~above
        above |= amodal[k]
    return visible, amodal


# ----------------------------------------------------------------------------- order


def test_order_from_gt_masks_of_procedural_scenes_is_their_true_order():
    source = DemoSource(24, image_size=96, seed=5, object_size=(0.3, 0.45))
    checked = 0
    for i in range(len(source)):
        obj = source[i]["objects"]
        amodal, visible, rank = obj["amodal_mask"], obj["visible_mask"], obj["order"]
        assert sorted(rank.tolist()) == list(range(1, len(rank) + 1))
        occ = order_lib.occlusion_order(visible, amodal)
        flat = amodal.reshape(len(amodal), -1).astype(int)
        overlap = (flat @ flat.T) > 0
        truth = np.sign(rank[None, :] - rank[:, None])  # +1: row has the smaller rank (front)
        np.testing.assert_array_equal(occ.matrix, np.where(overlap, truth, 0))
        checked += int(np.triu(overlap, 1).sum())
        # Occluded targets are one layer below their occluders; nothing else is hidden.
        hidden = obj["occlusion_rate"] > 0
        np.testing.assert_array_equal(occ.layers, hidden.astype(int))
    assert checked >= 10


def test_layers_of_a_known_arrangement():
    table, plate, cup = _rect(20, 40, 0, 40), _rect(15, 25, 5, 25), _rect(10, 18, 10, 18)
    side, box = _rect(0, 5, 30, 38), _rect(22, 30, 28, 36)
    visible, amodal = _painted([table, plate, cup, side, box])
    occ = order_lib.occlusion_order(visible, amodal)
    assert occ.layers.tolist() == [2, 1, 0, 0, 0]
    expected = np.zeros((5, 5), np.int8)
    for front, back in [(1, 0), (2, 1), (4, 0)]:
        expected[front, back], expected[back, front] = 1, -1
    np.testing.assert_array_equal(occ.matrix, expected)
    assert occ.dropped == ()
    assert occ.covered[1, 0] == (table & plate).sum()

    # A sliver of overlap below min_fraction of the hidden object's area is no relation.
    visible, amodal = _painted([_rect(0, 20, 0, 20), _rect(0, 1, 19, 30)])  # 1 px of 400
    assert not order_lib.occlusion_order(visible, amodal).matrix.any()
    assert order_lib.occlusion_order(visible, amodal, min_fraction=0.0).matrix[1, 0] == 1


def _cycle_masks():
    """Three objects whose masks say A over B (30 px), B over C (20 px), C over A (10 px)."""
    z = np.zeros((3, 40), bool)

    def m(cells):
        out = z.copy()
        for row, width in cells:
            out[row, :width] = True
        return out

    amodal = [m([(0, 30), (2, 10)]), m([(0, 30), (1, 20)]), m([(1, 20), (2, 10)])]
    visible = [m([(0, 30)]), m([(1, 20)]), m([(2, 10)])]
    return np.stack(visible), np.stack(amodal)


@pytest.mark.parametrize("perm", [(0, 1, 2), (2, 0, 1), (1, 2, 0), (2, 1, 0)])
def test_a_cycle_is_broken_at_its_weakest_relation(perm):
    visible, amodal = _cycle_masks()
    perm = list(perm)
    occ = order_lib.occlusion_order(visible[perm], amodal[perm])
    where = {obj: k for k, obj in enumerate(perm)}  # object -> its index after permuting
    a, b, c = where[0], where[1], where[2]
    assert occ.matrix[a, b] == occ.matrix[b, c] == occ.matrix[c, a] == 1
    assert occ.dropped == ((c, a),)
    assert [occ.layers[a], occ.layers[b], occ.layers[c]] == [0, 1, 2]


def test_equal_cycles_break_by_index_and_every_run_agrees():
    matrix = np.zeros((3, 3), np.int8)
    for i, j in [(0, 1), (1, 2), (2, 0)]:
        matrix[i, j], matrix[j, i] = 1, -1
    strength = np.where(matrix > 0, 7, 0)
    runs = [order_lib.depth_layers(matrix, strength) for _ in range(3)]
    for layers, dropped in runs:
        assert dropped == ((2, 0),)
        assert layers.tolist() == [0, 1, 2]


def test_mutual_cover_goes_to_the_larger_side():
    visible, amodal = _cycle_masks()
    # B's visible mask now also covers 15 px of A's hidden region: A over B (30) wins.
    amodal[0, 1, :15] = True
    occ = order_lib.occlusion_order(visible[:2], amodal[:2])
    assert occ.covered[1, 0] == 15 and occ.covered[0, 1] == 30
    assert occ.matrix[0, 1] == 1


def test_order_rejects_bad_masks():
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        order_lib.occlusion_order(np.zeros((4, 4), bool), np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="differ in shape"):
        order_lib.occlusion_order(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 5), bool))


def test_heuristic_baselines():
    low_small = _rect(30, 36, 0, 6)  # 36 px, bottom row 35
    high_big = _rect(0, 20, 0, 20)  # 400 px, bottom row 19
    same_bottom = _rect(10, 20, 30, 32)  # bottom row 19, centroid row 14.5 (vs 9.5)
    masks = np.stack([low_small, high_big, same_bottom])
    area = order_accuracy.area_order(masks)
    assert area[0, 1] == 1 and area[1, 0] == -1  # the larger one is behind
    y = order_accuracy.y_axis_order(masks)
    assert y[0, 1] == 1 and y[1, 0] == -1  # the lower bottom edge is in front
    assert y[2, 1] == 1  # same bottom row: the lower centroid is in front


# ----------------------------------------------------------------------------- predictor


@pytest.fixture(scope="module")
def two_models():
    """Tiny config, an 'amodal' model and a 'visible' model sharing the image encoder."""
    from sameo_jax.models.config import model_config

    config = model_config("tiny", img_size=128)
    amodal = random_params(config, 0)
    visible = {**random_params(config, 1), "image_encoder": amodal["image_encoder"]}
    return config, amodal, visible


@pytest.fixture(scope="module")
def both_predictor(two_models):
    from sameo_jax.predictor import Predictor

    config, amodal_params, visible_params = two_models
    return Predictor(config, amodal_params, visible_params=visible_params)


class _Counting:
    """Wraps a jitted encoder call and counts calls and images."""

    def __init__(self, fn):
        self.fn, self.calls, self.images = fn, 0, 0

    def __call__(self, params, x):
        self.calls += 1
        self.images += int(x.shape[0])
        return self.fn(params, x)


@pytest.fixture
def counted(both_predictor):
    """The module's predictor with its encoder calls counted."""
    counter = both_predictor._encode = _Counting(both_predictor._encode)
    yield both_predictor, counter
    both_predictor._encode = counter.fn


def test_one_encoder_call_gives_amodal_and_visible_masks(two_models, counted):
    from sameo_jax.predictor import Predictor

    config, _, visible_params = two_models
    both, counter = counted
    image = DemoSource(1, image_size=64, seed=1)[0]["image"]
    boxes = np.array([[4, 6, 40, 50], [20, 10, 60, 44]], np.float32)
    both.set_image(image)
    out = both.predict_amodal_visible(boxes=boxes)
    assert counter.calls == 1 and counter.images == 1
    assert out.amodal.shape == out.visible.shape == (2, 64, 64)
    np.testing.assert_array_equal(out.hidden, out.amodal & ~out.visible)
    amodal = both.predict(boxes=boxes, best_only=True)
    np.testing.assert_array_equal(amodal.masks[:, 0], out.amodal)
    assert counter.calls == 1

    # The visible masks are the visible model's own (given the same embedding).
    alone = Predictor(config, visible_params)
    alone.set_image(image, embedding=both._embedding)
    ref = alone.predict(boxes=boxes, best_only=True)
    np.testing.assert_array_equal(ref.masks[:, 0], out.visible)
    np.testing.assert_allclose(ref.iou[:, 0], out.visible_iou, atol=1e-6)
    assert not np.array_equal(out.amodal, out.visible)  # two different decoders ran


def test_visible_decoder_must_share_the_image_encoder(two_models):
    from sameo_jax.predictor import Predictor

    config, amodal_params, _ = two_models
    other = random_params(config, 2)
    with pytest.raises(ValueError, match="image encoders differ"):
        Predictor(config, amodal_params, visible_params=other)
    alone = Predictor(config, amodal_params)
    e, d = config.embedding_size, config.embed_dim
    alone.set_image(np.zeros((32, 32, 3), np.uint8), embedding=np.zeros((e, e, d), np.float32))
    with pytest.raises(ValueError, match="needs visible masks: no visible decoder"):
        alone.predict_amodal_visible(boxes=[[1, 1, 9, 9]])


def _training_workdir(path, config, params, init_checkpoint):
    """An orbax checkpoint with the items a training step saves that matter here."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(path / "checkpoints") as manager:
        manager.save(5, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            model_config=ocp.args.JsonSave(config.to_dict()),
            config=ocp.args.JsonSave({"init_checkpoint": str(init_checkpoint)}),
        ))
        manager.wait_until_finished()
    return path


def test_workdir_finds_its_visible_decoder_and_predict_writes_the_scene(tmp_path, two_models):
    """predict.py as users run it: a workdir fine-tuned from another checkpoint gives
    visible masks, order and layers with no extra flag; a missing one is a clean error."""
    from sameo_jax.model_io import save_params

    config, amodal_params, visible_params = two_models
    init = save_params(visible_params, tmp_path / "init", config)
    workdir = _training_workdir(tmp_path / "work", config, amodal_params, init)
    source = DemoSource(1, image_size=64, seed=4)[0]
    Image.fromarray(source["image"]).save(tmp_path / "scene.png")
    boxes = source["objects"]["amodal_bbox"]
    (tmp_path / "prompts.json").write_text(json.dumps([{"box": b.tolist()} for b in boxes]))
    run = _cli(tmp_path, "predict.py", "--checkpoint", workdir, "--image",
               tmp_path / "scene.png", "--prompts", tmp_path / "prompts.json", "--layers",
               tmp_path / "layers.png", "--save_json", tmp_path / "s.json", "--save_npz",
               tmp_path / "s.npz")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "layer" in run.stdout
    q = len(boxes)
    with np.load(tmp_path / "s.npz") as npz:
        assert npz["visible_masks"].shape == npz["hidden_masks"].shape == (q, 64, 64)
        assert npz["order_matrix"].shape == (q, q) and npz["layers"].shape == (q,)
        best = npz["masks"][np.arange(q), npz["iou"].argmax(1)]
        np.testing.assert_array_equal(npz["hidden_masks"], best & ~npz["visible_masks"])
        occ = order_lib.occlusion_order(npz["visible_masks"], best)
        np.testing.assert_array_equal(npz["order_matrix"], occ.matrix)
        np.testing.assert_array_equal(npz["layers"], occ.layers)
        layers, visible = npz["layers"], npz["visible_masks"]
    scene = json.loads((tmp_path / "s.json").read_text())
    assert [o["layer"] for o in scene["objects"]] == layers.tolist()
    assert np.array_equal(np.asarray(scene["order_matrix"]), occ.matrix)
    hidden = mask_utils.decode({**scene["objects"][0]["hidden"],
                                "counts": scene["objects"][0]["hidden"]["counts"].encode()})
    np.testing.assert_array_equal(hidden.astype(bool), best[0] & ~visible[0])
    with Image.open(tmp_path / "layers.png") as im:
        assert im.size == (64, 64)

    # The init checkpoint is gone: masks alone still load, --layers says what is missing.
    import shutil

    from sameo_jax.inference import predict_files
    from sameo_jax.predictor import Predictor

    shutil.rmtree(init)
    predictor = Predictor.from_checkpoint(workdir, visible_checkpoint="auto")
    assert not predictor.has_visible
    with pytest.raises(ValueError, match=r"--layers needs visible masks: .* started from "
                                         r"init_checkpoint .*init, which does not exist"):
        predict_files(predictor, tmp_path / "scene.png", tmp_path / "prompts.json",
                      layers=tmp_path / "layers2.png")
    assert not (tmp_path / "layers2.png").exists()


# ----------------------------------------------------------------------------- data


H, W = 30, 40


def _poly(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _poly_mask(poly):
    rle = mask_utils.merge(mask_utils.frPyObjects([poly], H, W))
    return mask_utils.decode(rle).astype(bool)


def _rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _regions(spec):
    """COCOA regions from (polygon, rank, stuff) front to back: each region's visible mask
    is its polygon minus the polygons of smaller rank."""
    regions = []
    for poly, rank, stuff in spec:
        amodal = _poly_mask(poly)
        hidden = np.zeros_like(amodal)
        for other, other_rank, _ in spec:
            if other_rank < rank:
                hidden |= amodal & _poly_mask(other)
        r = {"segmentation": poly, "name": "wall" if stuff else "thing", "isStuff": stuff,
             "order": rank, "area": float(amodal.sum()),
             "occlude_rate": float(hidden.sum() / amodal.sum())}
        if hidden.any():
            r["visible_mask"] = _rle(amodal & ~hidden)
            r["invisible_mask"] = _rle(hidden)
        regions.append(r)
    return regions


# Image 1: a chain front (1) > middle (2) > back (3); image 2: one pair and a stuff region
# (removed by the build); image 3: a single object.
COCOA_SCENES = {
    1: [(_poly(2, 2, 20, 15), 1, 0), (_poly(10, 5, 35, 25), 2, 0),
        (_poly(25, 10, 40, 30), 3, 0)],
    2: [(_poly(5, 5, 25, 25), 2, 0), (_poly(15, 0, 30, 12), 1, 0),
        (_poly(0, 0, 40, 30), 3, 1)],
    3: [(_poly(4, 4, 30, 20), 1, 0)],
}


def write_cocoa_with_order(manual):
    folder = manual / "val2014"
    folder.mkdir(parents=True)
    images, anns = [], []
    for image_id, spec in COCOA_SCENES.items():
        name = f"COCO_val2014_{image_id:012d}.jpg"
        pixels = np.random.default_rng(image_id).integers(0, 255, (H, W, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name, format="PNG")
        images.append({"id": image_id, "file_name": name, "height": H, "width": W})
        anns.append({"id": 10 + image_id, "image_id": image_id, "regions": _regions(spec)})
    (manual / "COCO_amodal_val2014.json").write_text(
        json.dumps({"images": images, "annotations": anns}))


@pytest.fixture(scope="module")
def cocoa_build(tmp_path_factory):
    from datasets import build

    root = tmp_path_factory.mktemp("cocoa")
    write_cocoa_with_order(root / "manual")
    rc = build.main(["cocoa", "--manual_dir", str(root / "manual"), "--data_dir",
                     str(root / "data"), "--split", "validation"])
    assert rc == 0
    return root / "data"


def test_cocoa_build_keeps_the_release_order(cocoa_build):
    from sameo_jax.data import sources

    source = sources.open_source("cocoa", "validation", str(cocoa_build))
    got = {int(source[i]["image_id"]): source[i]["objects"]["order"].tolist()
           for i in range(len(source))}
    assert got == {k: [rank for _, rank, stuff in spec if not stuff]
                   for k, spec in COCOA_SCENES.items()}


def test_a_bad_release_order_is_skipped_and_counted(tmp_path, capsys):
    """A region whose `order` is not a positive integer is skipped and counted by reason, as
    every malformed release entry is; the other regions keep their ranks."""
    from datasets import build

    write_cocoa_with_order(tmp_path / "manual")
    path = tmp_path / "manual" / "COCO_amodal_val2014.json"
    data = json.loads(path.read_text())
    data["annotations"][1]["regions"][0]["order"] = "front"
    path.write_text(json.dumps(data))
    rc = build.main(["cocoa", "--manual_dir", str(tmp_path / "manual"), "--data_dir",
                     str(tmp_path / "data"), "--split", "validation"])
    out = capsys.readouterr().out
    assert rc == 0
    assert re.search(r"skipped \(bad_order\):\s*1\b", out), out
    from sameo_jax.data import sources

    source = sources.open_source("cocoa", "validation", str(tmp_path / "data"))
    ranks = {int(source[i]["image_id"]): source[i]["objects"]["order"].tolist()
             for i in range(len(source))}
    expected = {k: [rank for _, rank, stuff in spec if not stuff]
                for k, spec in COCOA_SCENES.items()}
    expected[2] = expected[2][1:]
    assert ranks == expected


# ----------------------------------------------------------------------------- evaluation


def _gt_results(source, visible=True):
    """A results file of the ground truth: amodal masks, visible masks beside them."""
    out = []
    for i in range(len(source)):
        ex = source[i]
        obj = ex["objects"]
        for k in range(len(obj["amodal_mask"])):
            r = {"image_id": int(ex["image_id"]), "category_id": 1, "score": 1.0,
                 "segmentation": _rle(obj["amodal_mask"][k])}
            if visible:
                r["visible_segmentation"] = _rle(obj["visible_mask"][k])
            out.append(r)
    return out


def test_results_file_of_gt_masks_orders_every_pair(cocoa_build, tmp_path):
    """The must-show command on the COCOA-layout fixture: accuracy 1.0 on its 3 pairs, and
    the baselines' answers worked out by hand."""
    from sameo_jax.data import sources

    source = sources.open_source("cocoa", "validation", str(cocoa_build))
    results = _gt_results(source)
    results[0]["visible_segmentation"] = {"size": [H + 1, W], "counts": "bad"}  # skipped
    (tmp_path / "R.json").write_text(json.dumps(results))
    args = ["--split", "cocoa", "--data_dir", cocoa_build, "--results", "R.json", "--order",
            "--class_agnostic", "--json", "M.json"]
    run = _cli(tmp_path, "evaluate.py", *args)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "occlusion order" in run.stdout
    metrics = json.loads((tmp_path / "M.json").read_text())
    assert metrics["inputs"]["results"]["skipped"] == {"a bad visible_segmentation": 1}
    # Without entry 0, image 1's front object is paired (by IoU) with the middle one's
    # prediction: that pair has no answer and counts as wrong.
    order = metrics["order"]
    assert order["unanswered"] == 1 and order["pairs"] == 3
    assert order["accuracy"] == pytest.approx(2 / 3)

    results[0]["visible_segmentation"] = _rle(source[0]["objects"]["visible_mask"][0])
    (tmp_path / "R.json").write_text(json.dumps(results))
    run = _cli(tmp_path, "evaluate.py", *args, "--overwrite")
    assert run.returncode == 0, run.stderr[-2000:]
    metrics = json.loads((tmp_path / "M.json").read_text())
    order = metrics["order"]
    assert order["pairs"] == 3 and order["accuracy"] == 1.0 and order["unanswered"] == 0
    # Larger visible area behind: right for front/middle and for image 2's pair, wrong for
    # middle/back (the middle one is larger). Lower bottom edge in front: wrong on all three.
    assert order["baselines"] == {"area": pytest.approx(2 / 3), "y_axis": 0.0}
    assert {k: v["pairs"] for k, v in order["levels"].items()} == {"partial": 2, "heavy": 1}
    assert order["release_order"] == {"pairs": 3, "agreement": 1.0}
    assert order["overlapping_without_order"] == 0
    assert metrics["scores"]["results"]["AP"] == pytest.approx(1.0)


def test_order_needs_visible_masks_in_the_results(cocoa_build, tmp_path):
    from sameo_jax.data import sources
    from sameo_jax.evaluation.evaluator import EvalOptions, evaluate

    source = sources.open_source("cocoa", "validation", str(cocoa_build))
    (tmp_path / "R.json").write_text(json.dumps(_gt_results(source, visible=False)))
    o = EvalOptions(split="cocoa", data_dir=str(cocoa_build), results=str(tmp_path / "R.json"),
                    order=True, progress=False)
    with pytest.raises(ValueError, match="R.json: --order needs the visible masks"):
        evaluate(o)
    with pytest.raises(ValueError, match="--visible_checkpoint gives"):
        evaluate(EvalOptions(split="demo", checkpoint="x", visible_checkpoint="y"))


def test_model_run_order_and_its_results_file_agree(tmp_path, counted):
    """evaluate --order with a model: one encoder call per image for both decoders, results
    files that carry the visible masks, and --results on them gives the same order."""
    from sameo_jax.evaluation.evaluator import EvalOptions, evaluate, output_paths

    both, counter = counted
    o = EvalOptions(split="demo", max_images=6, batch_size=1, order=True, progress=False,
                    out_dir=str(tmp_path / "out"))
    summary = evaluate(o, predictor=both)
    assert counter.calls == counter.images == 6
    order = summary["order"]
    assert order["pairs"] > 0 and order["results_without_visible"] == 0
    assert order["unanswered"] == 0  # GT prompts: every instance has its own prediction
    assert order["release_order"]["agreement"] == 1.0  # the demo's ranks match its masks
    results = json.loads(pathlib.Path(output_paths(o)["refined"]).read_text())
    assert all("visible_segmentation" in r for r in results)
    again = evaluate(EvalOptions(split="demo", max_images=6, order=True, progress=False,
                                 results=output_paths(o)["refined"]))
    assert again["order"] == order


def test_order_modules_import_no_model_or_training_code():
    import ast

    for rel in ("sameo_jax/order.py", "sameo_jax/evaluation/order_accuracy.py"):
        tree = ast.parse((REPO_ROOT / rel).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                    node.module or ""]
                for name in names:
                    assert not name.startswith(("sameo_jax.models", "sameo_jax.training",
                                                "jax")), f"{rel} imports {name}"
