"""Predictor (batched prompts, buckets, original-size masks) and predict.py."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from sameo_jax.inference import parse_prompts, predict_files
from sameo_jax.model_io import load_model, save_params
from sameo_jax.models.config import model_config
from sameo_jax.models.efficient_sam import init_params
from sameo_jax.predictor import Predictor, bucket_size

from .conftest import REPO_ROOT, xla_flags


@pytest.fixture(scope="module")
def golden(reference_dir):
    with np.load(reference_dir / "golden_vitt.npz") as g:
        return {k: g[k] for k in g.files if k.startswith("img1_")}


@pytest.fixture(scope="module")
def vitt_predictor(reference_dir, golden):
    config, params = load_model(
        reference_dir / "synthetic_weights/synthetic_efficient_sam_vitt.npz")
    predictor = Predictor(config, params)
    embedding = golden["img1_image_embeddings"][0].transpose(1, 2, 0)
    predictor.set_image(golden["img1_image"], embedding)  # the golden embedding: no encoder run
    return predictor


def test_predict_matches_official_forward(vitt_predictor, golden):
    out = vitt_predictor.predict(points=golden["img1_points"][0],
                                 point_labels=golden["img1_labels"][0])
    np.testing.assert_allclose(out.low_res_logits, golden["img1_low_res_logits_multimask"][0],
                               atol=1e-4, rtol=0)
    np.testing.assert_allclose(out.iou, golden["img1_iou_multimask"][0], atol=2e-5, rtol=0)
    shape = tuple(golden["img1_fullres_masks_shape"])
    ref = np.unpackbits(golden["img1_fullres_masks_packed"])[: np.prod(shape)].reshape(shape)[0]
    assert out.masks.shape == ref.shape and out.masks.dtype == bool
    assert np.mean(out.masks != ref.astype(bool)) <= 1e-4


def test_boxes_best_only_single_and_query_independence(vitt_predictor, golden):
    boxes = golden["img1_points"][0, :3].reshape(3, 4)
    full = vitt_predictor.predict(boxes=boxes)
    np.testing.assert_allclose(full.low_res_logits, golden["img1_low_res_logits_multimask"][0, :3],
                               atol=1e-4, rtol=0)
    best = vitt_predictor.predict(boxes=boxes, best_only=True)
    pick = np.argmax(full.iou, axis=1)
    np.testing.assert_allclose(best.iou[:, 0], full.iou[np.arange(3), pick], atol=1e-6)
    np.testing.assert_array_equal(best.masks[:, 0], full.masks[np.arange(3), pick])
    single = vitt_predictor.predict(boxes=boxes, multimask=False)
    np.testing.assert_allclose(single.iou, golden["img1_iou_single"][0, :3], atol=2e-5, rtol=0)
    one = vitt_predictor.predict(boxes=boxes[1:2])  # bucket 1 vs bucket 4: same answer
    np.testing.assert_allclose(one.low_res_logits[0], full.low_res_logits[1], atol=1e-5)


def test_prompt_counts_share_compiled_buckets(vitt_predictor):
    box = np.array([[50, 40, 200, 180]], np.float32)
    before = vitt_predictor._decode._cache_size()
    for q in (5, 7, 11, 16):  # all in the 16 bucket
        out = vitt_predictor.predict(boxes=np.repeat(box, q, 0), best_only=True)
        assert out.masks.shape == (q, 1, 344, 485)
    assert vitt_predictor._decode._cache_size() - before <= 1
    assert [bucket_size(n, (1, 4, 16)) for n in (1, 2, 4, 5, 16, 17, 40)] == [1, 4, 4, 16, 16,
                                                                              32, 48]


@pytest.mark.parametrize("kwargs,match", [
    (dict(boxes=[[10, 10, 5, 20]]), r"x0 <= x1"),
    (dict(boxes=[[10, np.nan, 20, 20]]), "finite"),
    (dict(points=[[[1.0, 2.0]]], point_labels=[[5]]), "labels must be"),
    (dict(boxes=np.zeros((0, 4))), "empty prompt list"),
    (dict(), "no prompts"),
])
def test_bad_prompts_are_named(vitt_predictor, kwargs, match):
    with pytest.raises(ValueError, match=match):
        vitt_predictor.predict(**kwargs)


def test_bad_images_and_no_image():
    config = model_config("tiny")
    predictor = Predictor(config, init_params(config, jax.random.key(0)))
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict(boxes=[[0, 0, 5, 5]])
    with pytest.raises(ValueError, match="uint8"):
        predictor.set_image(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        predictor.set_image(np.zeros((10, 10), np.uint8))


def test_parse_prompts_mixed_queries_and_errors():
    points, labels = parse_prompts([{"box": [1, 2, 30, 40]},
                                    {"points": [[5, 6], [7, 8]], "labels": [1, 0]},
                                    {"box": [0, 0, 9, 9], "points": [[3, 3]], "labels": [1]}])
    assert points.shape == (3, 3, 2)
    np.testing.assert_array_equal(labels, [[2, 3, -1], [1, 0, -1], [2, 3, 1]])
    for bad, match in [([], "empty"), ([{"box": [3, 0, 1, 5]}], "x0 <= x1"),
                       ([{"box": [0, 0, float("nan"), 5]}], "finite"),
                       ([{"points": [[1, 1]], "labels": [7]}], "not in"),
                       ([{"boxx": [0, 0, 1, 1]}], "needs a 'box'"),
                       ({"box": [0, 0, 1, 1]}, "JSON list")]:
        with pytest.raises(ValueError, match=match):
            parse_prompts(bad)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    config = model_config("tiny")
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_params(init_params(config, jax.random.key(0)), path, config)
    return path


def test_predict_files_writes_outputs(tmp_path, tiny_checkpoint):
    image = np.random.default_rng(0).integers(0, 256, (120, 90, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "img.png")
    (tmp_path / "p.json").write_text(json.dumps([{"box": [5, 5, 60, 100]},
                                                 {"points": [[40, 40]], "labels": [1]}]))
    predictor = Predictor.from_checkpoint(tiny_checkpoint)
    out = predict_files(predictor, tmp_path / "img.png", tmp_path / "p.json",
                        tmp_path / "out.npz", tmp_path / "overlay.png")
    with np.load(tmp_path / "out.npz") as z:
        assert z["low_res_logits"].shape == (2, 3, 64, 64)
        assert z["iou"].shape == (2, 3)
        assert z["masks"].shape == (2, 3, 120, 90) and z["masks"].dtype == bool
        assert z["image_embeddings"].shape == (64, 16, 16)
        np.testing.assert_array_equal(z["masks"], out.masks)
    assert Image.open(tmp_path / "overlay.png").size == (90, 120)
    with pytest.raises(ValueError, match="--overwrite"):
        predict_files(predictor, tmp_path / "img.png", tmp_path / "p.json", tmp_path / "out.npz")


def test_predict_cli_one_line_errors(tmp_path, tiny_checkpoint):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "p.json").write_text(json.dumps([{"box": [5, 5, 60, 100]}]))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "predict.py", f"--checkpoint={tiny_checkpoint}",
         f"--image={tmp_path / 'bad.png'}", f"--prompts={tmp_path / 'p.json'}"],
        cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1
    assert "not an image file" in result.stderr
    assert "Traceback" not in result.stderr


def test_encode_shards_over_eight_devices(tmp_path, tiny_checkpoint):
    """The same embeddings from 8 (fake CPU) devices as from one."""
    script = f"""
import numpy as np, jax
from sameo_jax.predictor import Predictor
p = Predictor.from_checkpoint({str(tiny_checkpoint)!r})
rng = np.random.default_rng(0)
imgs = [rng.integers(0, 256, (50 + i, 70, 3), dtype=np.uint8) for i in range(3)]
many = np.asarray(p.encode(imgs))
one = np.asarray(Predictor(p.config, p.params, devices=jax.devices()[:1]).encode(imgs))
assert len(jax.devices()) == 8, jax.devices()
print(np.abs(many - one).max())
"""
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"),
               JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.strip().splitlines()[-1]) < 1e-5
