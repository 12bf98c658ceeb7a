"""Parity of the Flax EfficientSAM ViT-T with the official PyTorch code's goldens.

One jitted encoder call per image and one decoder call per image (all 5 prompts at once), on
the reference decoder (models/mask_decoder.py) and on the fast one (models/fast/).
Tolerances from the reference README: 1e-4 on embeddings and logits, 2e-5 on IoU, at most
1e-4 of the full-resolution mask pixels flipped.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sameo_jax import preprocessing as pp
from sameo_jax.model_io import load_model
from sameo_jax.models.efficient_sam import EfficientSam, select_masks
from sameo_jax.models.image_encoder import resize_pos_embed

IMAGES = (0, 1, 2)


@pytest.fixture(scope="module")
def golden(reference_dir):
    with np.load(reference_dir / "golden_vitt.npz") as g:
        return {k: g[k] for k in g.files}


@pytest.fixture(scope="module")
def model_and_params(reference_dir):
    weights = reference_dir / "synthetic_weights/synthetic_efficient_sam_vitt.npz"
    config, params = load_model(weights, "vitt")
    return EfficientSam(config), params


@pytest.fixture(scope="module")
def encoded(golden, model_and_params):
    """Per image: the preprocessed image, its embeddings and the padded prompts."""
    model, params = model_and_params
    # The full-size encoder runs longer than it compiles: LLVM's optimisations back on here.
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=EfficientSam.encode),
                     compiler_options={"xla_backend_optimization_level": 3})
    results = {}
    for i in IMAGES:
        k = f"img{i}_"
        image = golden[k + "image"]
        x = pp.preprocess_image(image, 1024)
        points = pp.rescale_points(golden[k + "points"], image.shape[:2], 1024)
        padded, labels = pp.pad_prompts(points[0], golden[k + "labels"][0], 6)
        results[i] = dict(preprocessed=x, embeddings=encode(params, jnp.asarray(x)[None]),
                          points=points, padded=padded, padded_labels=labels)
    return results


@pytest.fixture(scope="module", params=["reference", "fast"])
def outputs(request, golden, model_and_params, encoded):
    """Per image: decode_all's outputs for the golden prompts, on each decoder."""
    model, params = model_and_params
    model = model.clone(config=dataclasses.replace(model.config, decoder_impl=request.param))
    decode = jax.jit(lambda p, e, pts, lab: model.apply(
        {"params": p}, e, pts, lab, method=EfficientSam.decode_all))
    return {i: jax.tree_util.tree_map(np.asarray, decode(
        params, encoded[i]["embeddings"], encoded[i]["points"], golden[f"img{i}_labels"]))
        for i in IMAGES}


@pytest.mark.parametrize("i", IMAGES)
def test_preprocessing_and_prompt_inputs(golden, encoded, i):
    k, out = f"img{i}_", encoded[i]
    np.testing.assert_allclose(out["preprocessed"].transpose(2, 0, 1),
                               golden[k + "preprocessed"][0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out["padded"], golden[k + "prompt_encoder_in_coords"],
                               atol=1e-4, rtol=0)
    np.testing.assert_array_equal(out["padded_labels"], golden[k + "prompt_encoder_in_labels"])


@pytest.mark.parametrize("i", IMAGES)
def test_image_embeddings(golden, encoded, i):
    got = np.asarray(encoded[i]["embeddings"][0]).transpose(2, 0, 1)
    np.testing.assert_allclose(got, golden[f"img{i}_image_embeddings"][0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("i", IMAGES)
def test_decoder_internals(golden, outputs, i):
    k, out = f"img{i}_", outputs[i]
    np.testing.assert_allclose(out["sparse"][0], golden[k + "sparse_embeddings"][0],
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose(out["tokens"][0], golden[k + "decoder_tokens_out"],
                               atol=1e-4, rtol=0)
    np.testing.assert_allclose(out["hyper_in"][0], golden[k + "hyper_in"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("i", IMAGES)
@pytest.mark.parametrize("multimask", [True, False])
def test_low_res_logits_and_iou(golden, outputs, i, multimask):
    k, out = f"img{i}_", outputs[i]
    logits, iou = select_masks(out["logits"], out["iou"], multimask)
    name = "multimask" if multimask else "single"
    np.testing.assert_allclose(logits, golden[k + f"low_res_logits_{name}"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(iou, golden[k + f"iou_{name}"], atol=2e-5, rtol=0)


@pytest.mark.parametrize("i", IMAGES)
def test_full_resolution_masks(golden, outputs, i):
    k, out = f"img{i}_", outputs[i]
    h, w = golden[k + "image"].shape[:2]
    logits, _ = select_masks(out["logits"], out["iou"], True)
    full = pp.upsample_logits(logits[0], (h, w))  # [Q, 3, H, W]
    np.testing.assert_allclose(full[0, 0], golden[k + "fullres_logits_q0_m0"], atol=1e-4, rtol=0)
    shape = tuple(golden[k + "fullres_masks_shape"])
    ref = np.unpackbits(golden[k + "fullres_masks_packed"])[: np.prod(shape)].reshape(shape)[0]
    flipped = np.mean((full >= 0) != ref.astype(bool))
    assert flipped <= 1e-4, f"{flipped:.2e} of the full-resolution mask pixels differ"


def test_intermediates(reference_dir, model_and_params):
    """Resized position embedding and dense positional encoding vs the official ones."""
    model, params = model_and_params
    with np.load(reference_dir / "golden_vitt_intermediates.npz") as g:
        pos_ref, pe_ref = g["pos_embed_resized"], g["dense_pe"]
    pos = resize_pos_embed(jnp.asarray(params["image_encoder"]["pos_embed"]), 14, 64)
    np.testing.assert_allclose(np.asarray(pos), pos_ref[0], atol=1e-5, rtol=0)
    pe = model.apply({"params": params}, method=lambda m: m.prompt_encoder.dense_pe())
    np.testing.assert_allclose(np.asarray(pe).transpose(2, 0, 1), pe_ref[0], atol=1e-5, rtol=0)
