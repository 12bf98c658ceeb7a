"""The decoder-only train step: the dense convolution's gradient whatever the model's
factored_upscale, and decoder rematerialisation (same loss and gradients, less memory)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.sameo import get_config
from sameo_jax.training import optimizer
from sameo_jax.training.state import TrainState
from tests.test_training import MICRO

# The micro model with the decoder's two layers, on an 8 x 8 embedding grid (32 x 32 masks).
SMALL_DECODER = dict(MICRO, img_size=128, decoder_depth=2)


# Buffers and functions do not depend on LLVM's optimisations; they would only cost compile time.
NO_LLVM_OPT = {"xla_backend_optimization_level": 0}


def _random_model_params(model_cfg, seed: int = 0):
    """Random parameters of `model_cfg`, biases included, drawn in numpy (nothing to compile)."""
    from sameo_jax.models.efficient_sam import param_shapes

    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype),
                        param_shapes(model_cfg))


def _cached_batch(model_cfg, b: int, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A training batch of `b` images x `n` boxes with cached embeddings."""
    e, low = model_cfg.embedding_size, model_cfg.low_res_size
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 0.6 * model_cfg.img_size, (b, n, 2)).astype(np.float32)
    return {
        "prompt_boxes": np.concatenate([xy, xy + 0.3 * model_cfg.img_size], -1),
        "amodal_masks": rng.random((b, n, low, low)) > 0.5,
        "visible_masks": rng.random((b, n, low, low)) > 0.7,
        "valid": np.ones((b, n), bool),
        "embedding": rng.standard_normal((b, e, e, model_cfg.embed_dim)).astype(np.float32),
    }


def test_train_step_differentiates_the_dense_convolution():
    """The train step reads the image tokens densely whatever the model's factored_upscale
    says (its backward is cheaper), so both settings give the very same step; the factored
    decoder itself differs from the dense one by rounding, which is what makes this a test."""
    from sameo_jax.models.efficient_sam import EfficientSam, model_config
    from sameo_jax.preprocessing import boxes_to_prompts
    from sameo_jax.training.step import make_train_step

    config = get_config("demo")  # the tiny model's training config
    b, n = 2, config.instances_per_image
    config.batch_size, config.decoder_remat = b, ""  # remat: tested below
    # One head: rank 1 x 2 x 8 = 16 < 32 channels, so 4 prompts take the factored path.
    factored_cfg = model_config("tiny", **dict(SMALL_DECODER, decoder_heads=1),
                                factored_upscale=True)
    dense_cfg = dataclasses.replace(factored_cfg, factored_upscale=False)
    params = _random_model_params(factored_cfg)
    batch = _cached_batch(factored_cfg, b, n)
    points, labels = boxes_to_prompts(jnp.asarray(batch["prompt_boxes"]))
    decoded = [jax.jit(lambda p, c=c: EfficientSam(c).apply(
        {"params": p}, jnp.asarray(batch["embedding"]), points, labels,
        method=EfficientSam.decode)[0])(params) for c in (factored_cfg, dense_cfg)]
    assert not np.array_equal(decoded[0], decoded[1])  # the two paths round differently
    np.testing.assert_allclose(decoded[0], decoded[1], atol=1e-5)

    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    trainable = optimizer.trainable_labels(params, config.trainable)
    tx = optimizer.make_optimizer(config, trainable)
    schedule = optimizer.learning_rate_schedule(config)
    state = TrainState.create(params, tx, 0)
    programs = [make_train_step(EfficientSam(cfg), config, trainable, tx, schedule, mesh).lower(
        state, batch).as_text() for cfg in (factored_cfg, dense_cfg)]
    assert programs[0] == programs[1]  # one program, so the very same step


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_decoder_remat_keeps_the_loss_and_gradients(impl):
    """The training loss and its decoder gradients under the training config's remat policy
    equal those without remat, to float32 rounding (the recomputed forward pass may be fused
    differently). Fast: a loop over the images, their 4 boxes per step; reference: each
    two-way block rematerialised."""
    from sameo_jax.models.efficient_sam import EfficientSam, model_config
    from sameo_jax.training.step import batch_loss

    config = get_config("demo")
    assert config.decoder_remat
    model_cfg = model_config("tiny", **MICRO, decoder_impl=impl)
    params = _random_model_params(model_cfg)
    batch = jax.tree.map(jnp.asarray, _cached_batch(model_cfg, 2, config.instances_per_image))

    def loss_and_grads(remat):
        model = EfficientSam(dataclasses.replace(model_cfg, decoder_remat=remat))
        return jax.jit(jax.value_and_grad(lambda d: batch_loss(
            model, config, {**params, "mask_decoder": d}, batch).total),
            compiler_options=NO_LLVM_OPT)(params["mask_decoder"])

    (loss, grads), (remat_loss, remat_grads) = (loss_and_grads(r) for r in
                                                ("", config.decoder_remat))
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                 remat_grads, grads)


def test_decoder_remat_cuts_the_step_memory():
    """XLA's memory analysis of a small decoder-only step on 8 images x 4 boxes: under the
    training config's remat policy the backward pass holds one image's per-prompt maps at a
    time, so the step's temporaries are a fraction of those without it."""
    from sameo_jax.models.efficient_sam import EfficientSam, model_config
    from sameo_jax.training.step import make_train_step

    model_cfg = model_config("tiny", **MICRO)
    params = _random_model_params(model_cfg)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    temp = {}
    for remat in ("", get_config("demo").decoder_remat):
        config = get_config("demo")
        config.batch_size, config.decoder_remat = 8, remat
        config.trainable = ("mask_decoder/",)
        labels = optimizer.trainable_labels(params, config.trainable)
        tx = optimizer.make_optimizer(config, labels)
        step = make_train_step(EfficientSam(model_cfg), config, labels, tx,
                               optimizer.learning_rate_schedule(config), mesh)
        state = TrainState.create(params, tx, 0)
        batch = _cached_batch(model_cfg, 8, config.instances_per_image)
        compiled = step.lower(state, batch).compile(NO_LLVM_OPT)
        temp[remat] = compiled.memory_analysis().temp_size_in_bytes
    # Not 1/8: the masks, the loss and the step's other buffers stay (0.37 when written).
    assert temp[config.decoder_remat] < 0.5 * temp[""], temp
