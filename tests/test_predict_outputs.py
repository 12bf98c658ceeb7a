"""predict.py's outputs: no file replaced without --overwrite, atomic writes, one error line,
and large prompt counts in bounded memory (chunks) or refused up front with the limit."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from sameo_jax import inference
from sameo_jax import predictor as predictor_lib
from sameo_jax.model_io import save_params
from sameo_jax.models.config import model_config
from sameo_jax.models.efficient_sam import param_shapes
from sameo_jax.predictor import Predictor

from .test_hostile_checkpoints import assert_one_error_line, run_limited


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """Random tiny-model weights (drawn from the shapes: no init to compile)."""
    config = model_config("tiny")
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), param_shapes(config))
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_params(params, path, config)
    return path


@pytest.fixture()
def inputs(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "img.png")
    (tmp_path / "p.json").write_text(json.dumps([{"box": [5, 5, 60, 50]}]))
    return tmp_path / "img.png", tmp_path / "p.json"


def run_predict(*args, memory_limit=3 << 30):
    return run_limited(["predict.py", *map(str, args)], memory_limit, timeout=300)


def test_implicit_npz_suffix_is_checked(tmp_path, inputs):
    (tmp_path / "out.npz").write_bytes(b"the user's arrays")
    with pytest.raises(ValueError, match=r"out.npz exists; pass --overwrite"):
        inference.check_outputs(tmp_path / "out", None, False, inputs)
    assert inference.check_outputs(tmp_path / "out", None, True, inputs) == {
        "--save_npz": tmp_path / "out.npz"}
    assert (tmp_path / "out.npz").read_bytes() == b"the user's arrays"


@pytest.mark.parametrize("npz,overlay,match", [
    ("same", "same.npz", r"--overlay .*same.npz is also the path of --save_npz"),
    ("img.png", None, r"--save_npz .*img.png.npz"),  # not an input: numpy adds .npz
    ("x.npz", "img.png", r"--overlay .*img.png is an input of this run"),
    ("x.npz", "p.json", r"--overlay .*p.json is an input of this run"),
    ("missing/x.npz", None, r"folder .*missing does not exist"),
    ("x.npz", ".", r"--overlay .* is a directory"),
], ids=["same-path", "implicit-suffix", "overlay-is-image", "overlay-is-prompts",
        "missing-folder", "directory"])
def test_outputs_that_would_lose_data_are_refused(tmp_path, inputs, npz, overlay, match):
    if npz == "img.png":  # img.png.npz exists: refused without --overwrite
        (tmp_path / "img.png.npz").write_bytes(b"x")
        match = r"img.png.npz exists"
    with pytest.raises(ValueError, match=match):
        inference.check_outputs(tmp_path / npz, overlay and tmp_path / overlay, npz == "same",
                                inputs)


def test_write_atomic_leaves_nothing_half_written(tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"old")

    def fail_midway(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(ValueError, match=r"out.png: cannot write \(No space left on device\)"):
        inference.write_atomic(target, fail_midway, overwrite=True)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]  # no temporary file left
    with pytest.raises(ValueError, match="out.png exists; pass --overwrite"):
        inference.write_atomic(target, lambda f: f.write(b"new"), overwrite=False)
    assert target.read_bytes() == b"old"
    inference.write_atomic(tmp_path / "new.png", lambda f: f.write(b"new"))
    inference.write_atomic(target, lambda f: f.write(b"new"), overwrite=True)
    assert target.read_bytes() == b"new" and (tmp_path / "new.png").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.png", "out.png"]


def test_output_size_refused_with_numbers_and_remedies():
    sizes = inference.output_bytes(10_000, 3, (603, 1072), 256)
    assert sizes == {"masks": 10_000 * 3 * 603 * 1072,
                     "low-res logits": 10_000 * 3 * (256 * 256 + 1) * 4}
    with pytest.raises(ValueError) as err:
        inference.check_output_size(10_000, 3, (603, 1072), 256, True, 4e9)
    message = str(err.value)
    for part in ("10000 prompts x 3 candidates on a 603x1072 image need 33.7 GB",
                 "masks 19.4 GB", "low-res logits 7.9 GB", "overlay masks 6.5 GB",
                 "limit of 4 GB (--max_output_gb)", "--best_only", "fewer prompts"):
        assert part in message, message
    inference.check_output_size(1000, 1, (603, 1072), 256, True, 4e9)  # 2.3 GB: runs


@pytest.mark.parametrize("content,match", [
    (b"\xff\xfe{not utf-8", r"not UTF-8 text"),
    (b"[" * 100_000 + b"]" * 100_000, r"nested too deeply"),
    (json.dumps([{"points": [[1, 1]] * 7, "labels": [1] * 7}]).encode(),
     r"query 0: 7 points; the model takes at most 6"),
    (json.dumps([{"box": [0, 0, 1, 1], "points": [[1, 1]] * 5, "labels": [1] * 5}]).encode(),
     r"query 0: 7 points \(a box counts as 2\)"),
], ids=["not-utf8", "deep-json", "too-many-points", "box-and-points"])
def test_hostile_prompt_files_are_named(tmp_path, content, match):
    (tmp_path / "p.json").write_bytes(content)
    with pytest.raises(ValueError, match=match):
        inference.read_prompts(tmp_path / "p.json")


def test_chunked_prediction_matches_one_call(tiny_checkpoint, monkeypatch):
    """37 prompts through buckets (1, 4) and small upsampling calls give the same outputs
    as one bucket of 64."""
    image = np.random.default_rng(1).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    rng = np.random.default_rng(2)
    xy = rng.uniform(0, 60, (37, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 30, (37, 2))], axis=1)
    whole = Predictor.from_checkpoint(tiny_checkpoint, prompt_buckets=(1, 4, 16, 64))
    config = whole.config
    embedding = np.random.default_rng(3).normal(
        size=(config.embedding_size, config.embedding_size, config.embed_dim))
    whole.set_image(image, embedding.astype(np.float32))
    want = whole.predict(boxes=boxes)
    monkeypatch.setattr(predictor_lib, "UPSAMPLE_BYTES", 3 * 70 * 90 * 5 * 2)  # 2 rows a call
    chunked = Predictor(config, whole.params, prompt_buckets=(1, 4))
    chunked.set_image(image, embedding.astype(np.float32))
    got = chunked.predict(boxes=boxes)
    assert got.masks.shape == (37, 3, 70, 90) and got.low_res_logits.shape == (37, 3, 64, 64)
    np.testing.assert_allclose(got.low_res_logits, want.low_res_logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got.iou, want.iou, atol=1e-5, rtol=0)
    assert np.mean(got.masks != want.masks) < 1e-4  # flips only where a logit is ~0
    assert chunked._decode._cache_size() == 2  # buckets 1 and 4, nothing larger


def test_cli_refuses_huge_output_before_work(tmp_path, tiny_checkpoint):
    Image.fromarray(np.zeros((603, 1072, 3), np.uint8)).save(tmp_path / "img.png")
    boxes = [{"box": [i % 1000, i % 500, i % 1000 + 60, i % 500 + 90]} for i in range(10_000)]
    (tmp_path / "p.json").write_text(json.dumps(boxes))
    result = run_predict(f"--checkpoint={tiny_checkpoint}", f"--image={tmp_path / 'img.png'}",
                         f"--prompts={tmp_path / 'p.json'}")
    assert_one_error_line(result, "10000 prompts x 3 candidates on a 603x1072 image need "
                          "19.9 GB", "limit of 4 GB (--max_output_gb)")


def test_cli_many_prompts_run_in_bounded_memory(tmp_path, tiny_checkpoint):
    """500 boxes on 480 x 640: 0.46 GB of masks. Upsampling them in one call took 2.3 GB
    more; in chunks the run fits a 3.5 GiB address-space limit."""
    Image.fromarray(np.zeros((480, 640, 3), np.uint8)).save(tmp_path / "img.png")
    boxes = [{"box": [i % 600, i % 400, i % 600 + 40, i % 400 + 80]} for i in range(500)]
    (tmp_path / "p.json").write_text(json.dumps(boxes))
    result = run_predict(f"--checkpoint={tiny_checkpoint}", f"--image={tmp_path / 'img.png'}",
                         f"--prompts={tmp_path / 'p.json'}", memory_limit=int(3.5 * 2**30))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("query ") == 500 and "query 499:" in result.stdout


def test_cli_output_errors_are_one_line(tmp_path, tiny_checkpoint, inputs):
    image, prompts = inputs
    (tmp_path / "out.npz").write_bytes(b"the user's arrays")
    common = [f"--checkpoint={tiny_checkpoint}", f"--image={image}", f"--prompts={prompts}"]
    result = run_predict(*common, f"--save_npz={tmp_path / 'out'}")
    assert_one_error_line(result, "out.npz exists; pass --overwrite")
    assert (tmp_path / "out.npz").read_bytes() == b"the user's arrays"
    result = run_predict(*common, "--variant=vitx")
    assert_one_error_line(result, "--variant")
    result = run_predict(*common, f"--save_npz={tmp_path / 'new'}", f"--overlay={tmp_path}/o.png",
                         "--best_only")
    assert result.returncode == 0, result.stderr[-2000:]
    with np.load(tmp_path / "new.npz") as z:
        assert z["masks"].shape == (1, 1, 60, 80) and z["iou"].shape == (1, 1)
    assert Image.open(tmp_path / "o.png").size == (80, 60)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "img.png", "new.npz", "o.png", "out.npz", "p.json"]
