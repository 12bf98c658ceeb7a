"""The fast mask decoder (models/fast/) is the reference decoder (models/mask_decoder.py).

The contract: both read the same parameter tree, the fast one runs a counterpart of every
reference module, and on every path a user or the train step takes (one box, many boxes in
prompt chunks with the factored upscale, point prompts with and without padding, multimask on
and off, unused tokens skipped) the two give the same outputs and gradients to float32
rounding. The goldens (test_model_parity) hold both to the original.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sameo_jax import preprocessing as pp
from sameo_jax.models import two_way_transformer as reference
from sameo_jax.models.efficient_sam import (
    EfficientSam,
    model_config,
    param_shapes,
    select_masks,
)
from sameo_jax.models.fast import two_way_transformer as fast
from sameo_jax.models.fast.low_rank import LowRankTokens
from sameo_jax.models.fast.mask_decoder import rows_times_kernel

D, C, H, T, S, Q = 32, 16, 4, 3, 64, 8  # H * T < C: carrying tokens is the cheaper order
# 'tiny' with two decoder heads: rank 2 x 2 x 8 < 64 channels, so 4 box prompts per decoder
# call take the factored upscale (with 4 heads the rank equals the width and it never does).
FAST = model_config("tiny", decoder_heads=2)
REFERENCE = dataclasses.replace(FAST, decoder_impl="reference")


def _normal(key, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.key(key), shape)


def _paths(tree) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): tuple(x.shape) for path, x in flat}


def _random_params(config, seed: int, scale: float = 0.2):
    """Parameters of `config` drawn at random (every bias and gain non-trivial; no compile)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype),
                        param_shapes(config))


@pytest.fixture(scope="module")
def params():
    return _random_params(FAST, 1)


@pytest.mark.parametrize("variant", ["tiny", "vitt"])
def test_fast_decoder_reads_every_reference_parameter(variant):
    """Same parameter names and shapes: checkpoints are interchangeable, and a parameter
    added to the reference without a fast counterpart is named here."""
    config = model_config(variant, decoder_impl="reference")
    ref = _paths(param_shapes(config))
    got = _paths(param_shapes(dataclasses.replace(config, decoder_impl="fast")))
    assert not sorted(set(ref) - set(got)), "reference parameters without a fast counterpart"
    assert not sorted(set(got) - set(ref)), "fast parameters the reference does not have"
    assert got == ref


def _called_modules(config, params, points, labels) -> set[str]:
    """'/'-joined paths of every module whose methods the decoder calls."""
    called = set()

    def record(next_fun, args, kwargs, context):
        called.add("/".join(context.module.path))
        return next_fun(*args, **kwargs)

    e = config.embedding_size
    emb = jnp.zeros((1, e, e, config.embed_dim))
    with nn.intercept_methods(record):
        jax.eval_shape(lambda p: EfficientSam(config).apply(
            {"params": p}, emb, points, labels, method=EfficientSam.decode_all), params)
    return {path for path in called if path.startswith("mask_decoder")}


def test_fast_decoder_runs_a_counterpart_of_every_reference_module(params):
    """Every module the reference decoder calls, the fast one calls too (by path): an
    operation added to the reference as a module fails here until fast/ has it."""
    points, labels = jnp.zeros((1, 2, 2, 2)), jnp.full((1, 2, 2), 2, jnp.int32)
    ref = _called_modules(REFERENCE, params, points, labels)
    got = _called_modules(FAST, params, points, labels)
    assert len(ref) > 20
    assert not sorted(ref - got), "reference modules without a fast counterpart"


def _prompts(kind: str, images: int, prompts: int):
    """points [B, Q, P, 2], labels [B, Q, P] of one kind of prompt, in the 256-px frame."""
    rng = np.random.default_rng(prompts)
    xy = rng.uniform(0, 200, (images, prompts, 2)).astype(np.float32)
    if kind == "boxes":
        return pp.boxes_to_prompts(np.concatenate([xy, xy + 50], -1))
    count = {"one-point": 1, "two-points": 2, "five-points": 5}[kind]
    points = rng.uniform(0, 255, (images, prompts, count, 2)).astype(np.float32)
    labels = rng.integers(0, 2, (images, prompts, count)).astype(np.int32)
    labels[..., 0] = 1
    return points, labels


def _assert_close(got, want, tol, what):
    """|got - want| <= tol * (1 + |want|) in the max norm: float32 rounding of the two
    association orders, relative to the scale of each output."""
    jax.tree_util.tree_map_with_path(lambda path, a, b: np.testing.assert_allclose(
        a, b, rtol=tol, atol=tol * float(np.abs(b).max() + 1e-3),
        err_msg=f"{what}{jax.tree_util.keystr(path)}"), got, want)


CASES = {  # name: (prompt kind, images, prompts per image, decode_all keyword arguments)
    "one-box": ("boxes", 1, 1, {}),
    "boxes-in-chunks": ("boxes", 2, 8, {}),  # 2 chunks of 4, factored upscale
    "boxes-multimask": ("boxes", 1, 4, {"prompt_tokens": False, "mask_ids": (1, 2, 3)}),
    "one-point-single-mask": ("one-point", 1, 3, {"prompt_tokens": False, "mask_ids": (0,)}),
    "two-points": ("two-points", 2, 2, {"mask_ids": (0, 2)}),
    "five-points": ("five-points", 1, 4, {"prompt_tokens": False}),  # one padding point
}


@pytest.mark.parametrize("case", list(CASES))
def test_fast_decoder_computes_the_reference_function(params, case):
    """All of decode_all's outputs, and the gradients of a loss on them with respect to the
    mask decoder's parameters."""
    kind, images, prompts, kwargs = CASES[case]
    points, labels = (jnp.asarray(x) for x in _prompts(kind, images, prompts))
    e = FAST.embedding_size
    emb = _normal(images, (images, e, e, FAST.embed_dim))

    def loss(decoder_params, config):
        p = dict(params, mask_decoder=decoder_params)
        out = EfficientSam(config).apply({"params": p}, emb, points, labels,
                                         method=EfficientSam.decode_all, **kwargs)
        return (jnp.mean(jnp.tanh(out["logits"])) + jnp.mean(out["iou"] ** 2)
                + jnp.mean(jnp.sin(out["tokens"]))), out

    (_, got), got_grads = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(
        params["mask_decoder"], FAST)
    (_, want), want_grads = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(
        params["mask_decoder"], REFERENCE)
    k = len(kwargs.get("mask_ids", range(4)))
    assert got["logits"].shape == (images, prompts, k, FAST.low_res_size, FAST.low_res_size)
    assert jax.tree.map(jnp.shape, got) == jax.tree.map(jnp.shape, want)
    _assert_close(got, want, 1e-4, "output ")
    _assert_close(got_grads, want_grads, 1e-3, "gradient ")


def test_decode_returns_the_reference_selection(params):
    """`decode` (which decodes only the mask tokens it returns) gives the official selection
    of the reference decoder's outputs."""
    points, labels = (jnp.asarray(x) for x in _prompts("boxes", 1, 3))
    e = FAST.embedding_size
    emb = _normal(7, (1, e, e, FAST.embed_dim))
    everything = jax.jit(lambda p: EfficientSam(REFERENCE).apply(
        {"params": p}, emb, points, labels, method=EfficientSam.decode_all))(params)
    for multimask in (True, False):
        got = jax.jit(lambda p, m=multimask: EfficientSam(FAST).apply(
            {"params": p}, emb, points, labels, m, method=EfficientSam.decode))(params)
        want = select_masks(everything["logits"], everything["iou"], multimask)
        _assert_close(got, want, 1e-4, f"multimask={multimask} ")


def test_upscale_reads_factored_tokens_with_enough_prompts(params):
    """The factored path is the one that runs for 4 boxes per call (and not for 2, nor with
    `factored_upscale=False`), so the contract above covers it."""

    def factored(config, prompts) -> bool:
        seen = []

        def record(next_fun, args, kwargs, context):
            if context.module.name == "upscale_conv1":
                seen.append(type(args[0]))
            return next_fun(*args, **kwargs)

        points, labels = (jnp.asarray(x) for x in _prompts("boxes", 1, prompts))
        e = config.embedding_size
        with nn.intercept_methods(record):
            jax.eval_shape(lambda p: EfficientSam(config).apply(
                {"params": p}, jnp.zeros((1, e, e, config.embed_dim)), points, labels,
                method=EfficientSam.decode), params)
        assert len(seen) == 1
        return seen[0] is LowRankTokens

    assert factored(FAST, 4)
    assert not factored(FAST, 2)
    assert not factored(dataclasses.replace(FAST, factored_upscale=False), 4)


def test_train_step_is_the_same_on_either_decoder():
    """One SAMEO training step (the path the train step takes: decode with the dense
    upscale, gradients of the loss) gives the same loss and parameters on both decoders."""
    from configs.sameo import get_config
    from sameo_jax.training import optimizer
    from sameo_jax.training.state import TrainState
    from sameo_jax.training.step import make_train_step

    config = get_config("demo")
    b, n = 2, config.instances_per_image
    config.batch_size = b
    params = _random_params(FAST, 2)
    e, low = FAST.embedding_size, FAST.low_res_size
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 150, (b, n, 2)).astype(np.float32)
    batch = {
        "prompt_boxes": np.concatenate([xy, xy + 80], -1),
        "amodal_masks": rng.random((b, n, low, low)) > 0.5,
        "visible_masks": rng.random((b, n, low, low)) > 0.7,
        "valid": np.ones((b, n), bool),
        "embedding": rng.standard_normal((b, e, e, FAST.embed_dim)).astype(np.float32),
    }
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    trainable = optimizer.trainable_labels(params, config.trainable)
    tx = optimizer.make_optimizer(config, trainable)
    schedule = optimizer.learning_rate_schedule(config)
    results = []
    for model_cfg in (FAST, REFERENCE):
        step = make_train_step(EfficientSam(model_cfg), config, trainable, tx, schedule, mesh)
        state = TrainState.create(jax.tree.map(jnp.copy, params), tx, 0)
        results.append(step(state, batch))
    (fast_state, fast_metrics), (ref_state, ref_metrics) = results
    _assert_close(fast_metrics, ref_metrics, 1e-4, "metric ")
    _assert_close(fast_state.params, ref_state.params, 1e-4, "updated parameter ")


@pytest.fixture(scope="module")
def attention_and_params():
    """The reference attention's parameters, with random biases too (they start at zero)."""
    x = jnp.zeros((1, T, D))
    p = reference.Attention(C, H).init(jax.random.key(0), x, x, x)
    leaves, tree = jax.tree_util.tree_flatten(p)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    p = jax.tree_util.tree_unflatten(tree, [
        x + 0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)])
    return fast.Attention(D, C, H), p


@pytest.mark.parametrize("shared", [True, False], ids=["image-shared", "image-per-prompt"])
def test_tokens_to_image_is_reference_attention(attention_and_params, shared):
    attn, params = attention_and_params
    tokens = _normal(1, (2, Q, T, D))
    image = _normal(2, (2, 1 if shared else Q, S, D))
    values = _normal(3, image.shape)
    got = attn.apply(params, tokens, image, values, method=fast.Attention.tokens_to_image)
    want = reference.Attention(C, H).apply(params, tokens, image, values)
    assert got.shape == (2, Q, T, D)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("shared", [True, False], ids=["image-shared", "image-per-prompt"])
def test_image_to_tokens_is_reference_attention_over_copied_keys(attention_and_params, shared):
    """With a logit offset log(n), a token attends like n copies of it."""
    attn, params = attention_and_params
    image = _normal(1, (2, 1 if shared else Q, S, D))
    tokens = _normal(2, (2, Q, T, D))
    values = _normal(3, tokens.shape)
    weighted = attn.apply(params, image, tokens, values, jnp.array([0.0, 0.0, np.log(4.0)]),
                          method=fast.Attention.image_to_tokens)
    copies = [jnp.concatenate([x, jnp.repeat(x[..., -1:, :], 3, axis=-2)], axis=-2)
              for x in (tokens, values)]
    want = reference.Attention(C, H).apply(params, image, *copies)
    assert weighted.shape == (2, Q, S, D)
    np.testing.assert_allclose(weighted, want, rtol=1e-5, atol=2e-5)


def _layer_norm(x, gamma, beta, eps=1e-5):
    centred = x - x.mean(-1, keepdims=True)
    return centred / jnp.sqrt((centred**2).mean(-1, keepdims=True) + eps) * gamma + beta


def test_low_rank_tokens_follow_the_dense_tokens():
    """Two rounds of (low-rank update, LayerNorm) and a linear map on the factored form equal
    the same steps on the dense tokens, values and gradients."""
    base = _normal(1, (2, 1, S, D))  # shared by the Q prompts of each image
    args = {"mix": [_normal(2, (2, Q, S, H * T)), _normal(3, (2, Q, S, H * T))],
            "rows": [_normal(4, (2, Q, H * T, D)), _normal(5, (2, Q, H * T, D))],
            "offset": [_normal(6, (D,)), _normal(7, (D,))],
            "gamma": [1 + _normal(8, (D,), 0.3), 1 + _normal(9, (D,), 0.3)],
            "beta": [_normal(10, (D,)), _normal(11, (D,))],
            "kernel": _normal(12, (D, 3 * D)), "bias": _normal(13, (3 * D,))}

    def dense(a):
        x = base
        for i in range(2):
            x = _layer_norm(x + a["mix"][i] @ a["rows"][i] + a["offset"][i], a["gamma"][i],
                            a["beta"][i])
        return x @ a["kernel"] + a["bias"]

    def factored(a):
        x, f = base, LowRankTokens.of(base)
        for i in range(2):
            x = x + a["mix"][i] @ a["rows"][i] + a["offset"][i]
            rstd = 1 / jnp.sqrt(jnp.var(x, axis=-1) + 1e-5)
            f = f.add(a["mix"][i], a["rows"][i], a["offset"][i]).layer_norm(
                rstd, a["gamma"][i], a["beta"][i])
            x = _layer_norm(x, a["gamma"][i], a["beta"][i])
        return f.linear(a["kernel"], a["bias"]).dense()

    want, got = jax.jit(dense)(args), jax.jit(factored)(args)
    assert got.shape == (2, Q, S, 3 * D)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

    def loss(fn):
        return jax.jit(jax.grad(lambda a: jnp.mean(jnp.sin(fn(a)))))(args)

    jax.tree_util.tree_map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-6),
                           loss(factored), loss(dense))


def test_rows_times_kernel_has_the_gradients_of_the_plain_product():
    """The upscaling's products take their kernel gradient in a hand-written form (custom
    VJP); value and both gradients must be those of `x @ kernel`."""
    kx, kw, kd = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (300, 24))
    kernel = jax.random.normal(kw, (24, 40))
    dy = jax.random.normal(kd, (300, 40))

    def loss(f):
        return lambda x, k: jnp.sum(f(x, k) * dy)

    np.testing.assert_allclose(rows_times_kernel(x, kernel), x @ kernel, rtol=1e-6, atol=1e-5)
    got = jax.grad(loss(rows_times_kernel), argnums=(0, 1))(x, kernel)
    want = jax.grad(loss(jnp.matmul), argnums=(0, 1))(x, kernel)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mask_ids", [(), (4,), (-1,)])
def test_bad_mask_ids_are_named(mask_ids):
    config = model_config("tiny")
    params = jax.tree.map(jnp.zeros_like, param_shapes(config))
    emb = jnp.zeros((1, config.embedding_size, config.embedding_size, config.embed_dim))
    points, labels = jnp.zeros((1, 1, 2, 2)), jnp.full((1, 1, 2), 2, jnp.int32)
    with pytest.raises(ValueError, match="mask_ids"):
        EfficientSam(config).apply({"params": params}, emb, points, labels, mask_ids=mask_ids,
                                   method=EfficientSam.decode_all)


def test_unknown_decoder_impl_is_named():
    with pytest.raises(ValueError, match="decoder_impl='slow'"):
        model_config("tiny", decoder_impl="slow")
