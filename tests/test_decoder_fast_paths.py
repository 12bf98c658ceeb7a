"""The fast mask decoder (models/fast/) is the reference decoder (models/mask_decoder.py).

The contract: both read the same parameter tree, the fast one runs a counterpart of every
reference module, and on every path a user or the train step takes (prompt chunks and the
direct call, factored and dense upscale, padding points weighted or not, multimask on and off,
unused tokens skipped) the two give the same outputs and gradients to float32 rounding. The
reference runs all cases in one compiled program. The goldens (test_model_parity) hold both
to the original.
"""

import dataclasses
import functools

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
# The contract is about the functions computed: LLVM's optimisations would only cost compile time.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _normal(seed, shape, scale=1.0) -> np.ndarray:
    """Normal float32 values, drawn in numpy (no compile per shape)."""
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


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
    count = {"one-point": 1, "five-points": 5}[kind]
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


# name: (prompt kind, images, prompts per image, EfficientSam method, its keyword arguments,
# fast config overrides). Together they take every fast path: prompt chunks (lax.map) and the
# direct call, factored and dense upscale, padding points weighted (> 1) and not (1), all or
# some mask tokens, all tokens or only the wanted ones, one image or two.
CASES = {
    # 2 chunks of 4 boxes per image, factored upscale, 4 padding points as one.
    "boxes-in-chunks": ("boxes", 2, 8, "decode_all", {}, {}),
    # The train step's path: multimask decode of 4 boxes per image, dense upscale.
    "train-step": ("boxes", 2, 4, "decode", {"multimask_output": True},
                   {"factored_upscale": False}),
    # Single-mask decode, factored upscale with 3 prompts, 5 padding points as one.
    "one-point-single-mask": ("one-point", 1, 3, "decode", {"multimask_output": False}, {}),
    # One padding point (not reweighted), some mask tokens with all tokens, dense upscale.
    "five-points": ("five-points", 1, 2, "decode_all", {"mask_ids": (0, 2)}, {}),
}


def _inputs(case: str):
    """points [B, Q, P, 2], labels [B, Q, P], embeddings [B, E, E, D] of a case."""
    kind, images, prompts = CASES[case][:3]
    points, labels = _prompts(kind, images, prompts)
    e = FAST.embedding_size
    emb = _normal(list(CASES).index(case), (images, e, e, FAST.embed_dim))
    return points, labels, np.asarray(emb)


def _loss(out: dict) -> jax.Array:
    """A nonlinear function of every output a case returns."""
    loss = jnp.mean(jnp.tanh(out["logits"])) + jnp.mean(out["iou"] ** 2)
    if "tokens" in out:
        loss = loss + jnp.mean(jnp.sin(out["tokens"])) + jnp.mean(jnp.cos(out["hyper_in"]))
    return loss


def _reference_selection(case: str, out: dict) -> dict:
    """The reference decoder's outputs for all M mask tokens -> what the case's method returns
    (by indexing: `decode` is the official `select_masks`)."""
    method, kwargs = CASES[case][3:5]
    if method == "decode":
        logits, iou = select_masks(out["logits"], out["iou"], kwargs["multimask_output"])
        return {"logits": logits, "iou": iou}
    ids = np.asarray(kwargs.get("mask_ids", range(4)))
    tokens = out["tokens"]
    if not kwargs.get("prompt_tokens", True):
        tokens = tokens[..., np.asarray([0, *(1 + ids)]), :]
    return {"logits": out["logits"][..., ids, :, :], "iou": out["iou"][..., ids],
            "hyper_in": out["hyper_in"][..., ids, :], "tokens": tokens, "sparse": out["sparse"]}


@pytest.fixture(scope="module")
def reference_outputs(params):
    """Every case's reference outputs and loss gradient from one compiled program: the cases'
    prompts padded to 6 points and run as one prompt per row (prompts never interact), all
    mask tokens decoded, then each case's selection."""
    rows, shapes = [], []
    for case in CASES:
        points, labels, emb = _inputs(case)
        b, q = points.shape[:2]
        points, labels = pp.pad_prompts(points, labels, FAST.max_num_points)
        rows.append((points.reshape(b * q, 1, *points.shape[2:]),
                     labels.reshape(b * q, 1, -1), np.repeat(emb, q, axis=0)))
        shapes.append((b, q))
    points, labels, emb = (np.concatenate(x) for x in zip(*rows, strict=True))

    def losses(decoder_params):
        p = dict(params, mask_decoder=decoder_params)
        out = EfficientSam(REFERENCE).apply({"params": p}, emb, points, labels,
                                            method=EfficientSam.decode_all)
        per_case, start = [], 0
        for case, (b, q) in zip(CASES, shapes, strict=True):
            rows = {k: v[start:start + b * q, 0].reshape(b, q, *v.shape[2:])
                    for k, v in out.items()}
            per_case.append(_reference_selection(case, rows))
            start += b * q
        return jnp.stack([_loss(o) for o in per_case]), per_case

    grads, outs = _jit(jax.jacrev(losses, has_aux=True))(params["mask_decoder"])
    return {case: (outs[i], jax.tree.map(lambda g, i=i: g[i], grads))
            for i, case in enumerate(CASES)}


@pytest.mark.parametrize("case", list(CASES))
def test_fast_decoder_computes_the_reference_function(params, reference_outputs, case):
    """The case's outputs, and the gradients of a loss on them with respect to the mask
    decoder's parameters, equal the reference decoder's."""
    method, kwargs, overrides = CASES[case][3:]
    config = dataclasses.replace(FAST, **overrides)
    points, labels, emb = _inputs(case)

    def loss(decoder_params):
        p = dict(params, mask_decoder=decoder_params)
        out = EfficientSam(config).apply({"params": p}, emb, points, labels,
                                         method=getattr(EfficientSam, method), **kwargs)
        if method == "decode":
            out = dict(zip(("logits", "iou"), out, strict=True))
        return _loss(out), out

    (_, got), got_grads = _jit(jax.value_and_grad(loss, has_aux=True))(params["mask_decoder"])
    want, want_grads = reference_outputs[case]
    assert jax.tree.map(jnp.shape, got) == jax.tree.map(jnp.shape, want)
    _assert_close(got, want, 1e-4, "output ")
    _assert_close(got_grads, want_grads, 1e-3, "gradient ")


def _fast_paths(case: str, **overrides) -> tuple[bool, tuple[int, int]]:
    """(whether the first upscale reads factored tokens, [B, Q] of each decoder pass)."""
    method, kwargs, case_overrides = CASES[case][3:]
    config = dataclasses.replace(FAST, **{**case_overrides, **overrides})
    points, labels, emb = _inputs(case)
    seen = {}

    def record(next_fun, args, kwargs, context):
        if context.module.name == "upscale_conv1":
            seen["factored"] = isinstance(args[0], LowRankTokens)
        if context.method_name == "_decode":
            seen["pass"] = tuple(args[0].shape[:2])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda p: EfficientSam(config).apply(
            {"params": p}, emb, points, labels, method=getattr(EfficientSam, method),
            **kwargs), param_shapes(config))
    return seen["factored"], seen["pass"]


def test_the_cases_take_the_fast_paths_they_name():
    """The contract above covers the factored upscale and the prompt chunks: its cases take
    them (and `factored_upscale=False` turns the factoring off)."""
    assert {case: _fast_paths(case) for case in CASES} == {
        "boxes-in-chunks": (True, (1, 4)),
        "train-step": (False, (2, 4)),
        "one-point-single-mask": (True, (1, 3)),
        "five-points": (False, (1, 2)),
    }
    assert _fast_paths("boxes-in-chunks", factored_upscale=False) == (False, (1, 4))


@pytest.fixture(scope="module")
def attention_and_params():
    """The reference attention's parameters drawn at random, biases included."""
    x = jnp.zeros((1, T, D))
    shapes = jax.eval_shape(lambda: reference.Attention(C, H).init(jax.random.key(0), x, x, x))
    rng = np.random.default_rng(0)
    p = jax.tree.map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), a.dtype), shapes)
    return fast.Attention(D, C, H), p


@pytest.mark.parametrize("shared", [True, False], ids=["image-shared", "image-per-prompt"])
def test_tokens_to_image_is_reference_attention(attention_and_params, shared):
    attn, params = attention_and_params
    tokens = _normal(1, (2, Q, T, D))
    image = _normal(2, (2, 1 if shared else Q, S, D))
    values = _normal(3, image.shape)
    got, want = _jit(lambda *x: (
        attn.apply(params, *x, method=fast.Attention.tokens_to_image),
        reference.Attention(C, H).apply(params, *x)))(tokens, image, values)
    assert got.shape == (2, Q, T, D)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("shared", [True, False], ids=["image-shared", "image-per-prompt"])
def test_image_to_tokens_is_reference_attention_over_copied_keys(attention_and_params, shared):
    """With a logit offset log(n), a token attends like n copies of it."""
    attn, params = attention_and_params
    image = _normal(1, (2, 1 if shared else Q, S, D))
    tokens = _normal(2, (2, Q, T, D))
    values = _normal(3, tokens.shape)
    copies = [jnp.concatenate([x, jnp.repeat(x[..., -1:, :], 3, axis=-2)], axis=-2)
              for x in (tokens, values)]
    weighted, want = _jit(lambda image, tokens, values, copies: (
        attn.apply(params, image, tokens, values, jnp.array([0.0, 0.0, np.log(4.0)]),
                   method=fast.Attention.image_to_tokens),
        reference.Attention(C, H).apply(params, image, *copies)))(image, tokens, values, copies)
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

    def value_and_grad(fn):
        def loss(a):
            y = fn(a)
            return jnp.mean(jnp.sin(y)), y

        return _jit(jax.value_and_grad(loss, has_aux=True))(args)

    (_, got), got_grads = value_and_grad(factored)
    (_, want), want_grads = value_and_grad(dense)
    assert got.shape == (2, Q, S, 3 * D)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    jax.tree_util.tree_map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-6),
                           got_grads, want_grads)


def test_rows_times_kernel_has_the_gradients_of_the_plain_product():
    """The upscaling's products take their kernel gradient in a hand-written form (custom
    VJP); value and both gradients must be those of `x @ kernel`."""
    x, kernel, dy = _normal(1, (300, 24)), _normal(2, (24, 40)), _normal(3, (300, 40))

    def loss(f):
        return lambda x, k: jnp.sum(f(x, k) * dy)

    np.testing.assert_allclose(rows_times_kernel(x, kernel), x @ kernel, rtol=1e-6, atol=1e-5)
    got = _jit(jax.grad(loss(rows_times_kernel), argnums=(0, 1)))(x, kernel)
    want = _jit(jax.grad(loss(jnp.matmul), argnums=(0, 1)))(x, kernel)
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


def test_unknown_decoder_remat_is_named():
    with pytest.raises(ValueError, match="decoder_remat='dots'"):
        model_config("tiny", decoder_remat="dots")
