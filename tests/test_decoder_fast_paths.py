"""The decoder's fast paths compute the same function as the plain one.

Cross attentions carry the few token-side vectors through the projection kernels instead of
projecting every prompt's copy of the image tokens, identical padding tokens run once with
their count as a logit offset, the first transposed convolution reads the image tokens in
factored form (shared map + per-prompt low-rank sum), and tokens whose output is not used skip
the final attention. All are exact rewrites; these tests hold them to the plain computation
(the goldens in test_model_parity hold the whole decoder to the original).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sameo_jax import preprocessing as pp
from sameo_jax.models.efficient_sam import (
    EfficientSam,
    init_params,
    model_config,
    select_masks,
)
from sameo_jax.models.low_rank import LowRankTokens
from sameo_jax.models.two_way_transformer import Attention

D, C, H, T, S, Q = 32, 16, 4, 3, 64, 8  # H * T < C: carrying tokens is the cheaper order


@pytest.fixture(scope="module")
def attention_and_params():
    attn = Attention(D, C, H)
    x = jnp.zeros((1, T, D))
    params = attn.init(jax.random.key(0), x, x, x)
    # Random biases too (they start at zero), so every bias term is exercised.
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return attn, jax.tree_util.tree_unflatten(
        tree, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)])


def _normal(key, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.key(key), shape)


@pytest.mark.parametrize("shared", [True, False], ids=["image-shared", "image-per-prompt"])
def test_tokens_to_image_equals_plain_attention(attention_and_params, shared):
    attn, params = attention_and_params
    tokens = _normal(1, (2, Q, T, D))
    image = _normal(2, (2, 1 if shared else Q, S, D))
    values = _normal(3, image.shape)
    fast = attn.apply(params, tokens, image, values, method=Attention.tokens_to_image)
    plain = attn.apply(params, tokens, image, values)
    assert fast.shape == (2, Q, T, D)
    np.testing.assert_allclose(fast, plain, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("shared", [True, False], ids=["image-shared", "image-per-prompt"])
def test_image_to_tokens_equals_plain_attention(attention_and_params, shared):
    attn, params = attention_and_params
    image = _normal(1, (2, 1 if shared else Q, S, D))
    tokens = _normal(2, (2, Q, T, D))
    values = _normal(3, tokens.shape)
    bias = jnp.log(jnp.array([1.0, 2.0, 5.0]))
    fast = attn.apply(params, image, tokens, values, bias, method=Attention.image_to_tokens)
    plain = attn.apply(params, image, tokens, values, bias)
    assert fast.shape == (2, Q, S, D)
    np.testing.assert_allclose(fast, plain, rtol=1e-5, atol=2e-5)


def test_log_weight_stands_for_identical_keys(attention_and_params):
    """A key passed once with logit offset log(n) attends like n copies of it."""
    attn, params = attention_and_params
    image = _normal(1, (Q, S, D))
    tokens = _normal(2, (Q, T, D))
    copied = jnp.concatenate([tokens, jnp.repeat(tokens[:, -1:], 3, axis=1)], axis=1)
    weighted = attn.apply(params, image, tokens, tokens, jnp.array([0.0, 0.0, np.log(4.0)]),
                          method=Attention.image_to_tokens)
    plain = attn.apply(params, image, copied, copied)
    np.testing.assert_allclose(weighted, plain, rtol=1e-5, atol=2e-5)


def test_box_prompts_decode_like_fully_padded_prompts():
    """Two box corners run as 3 prompt tokens (the 4 padding points as one, weighted); the
    outputs equal those of the same prompts padded to 6 points by the caller."""
    config = model_config("tiny")
    model = EfficientSam(config)
    params = init_params(config, jax.random.key(0))
    emb = _normal(4, (1, config.embedding_size, config.embedding_size, config.embed_dim))
    boxes = np.array([[[10, 20, 120, 200], [50, 60, 70, 90], [0, 0, 255, 255]]], np.float32)
    points, labels = pp.boxes_to_prompts(boxes)
    padded, padded_labels = pp.pad_prompts(points, labels, config.max_num_points)
    decode = jax.jit(lambda p, e, x, lab: model.apply(
        {"params": p}, e, x, lab, method=EfficientSam.decode_all))
    fast = decode(params, emb, jnp.asarray(points), jnp.asarray(labels))
    plain = decode(params, emb, jnp.asarray(padded), jnp.asarray(padded_labels))
    assert fast["tokens"].shape == plain["tokens"].shape == (1, 3, 11, config.embed_dim)
    for name in ("logits", "iou", "tokens", "sparse"):
        np.testing.assert_allclose(fast[name], plain[name], rtol=1e-4, atol=1e-4, err_msg=name)


def _assert_same_decoder(first, second, params, seed: int, out_tol: float,
                         grad_rtol: float, grad_atol: float) -> None:
    """Two configs of one model decode 2 images x 8 boxes to the same outputs (all of
    decode_all's) and the same mask-decoder gradients."""
    emb = _normal(seed, (2, first.embedding_size, first.embedding_size, first.embed_dim))
    corners = np.random.default_rng(seed).uniform(0, 200, (2, 8, 2)).astype(np.float32)
    points, labels = pp.boxes_to_prompts(np.concatenate([corners, corners + 50], -1))

    def outputs(config, p):
        return EfficientSam(config).apply({"params": p}, emb, jnp.asarray(points),
                                          jnp.asarray(labels), method=EfficientSam.decode_all)

    def loss(config, decoder_params):
        out = outputs(config, dict(params, mask_decoder=decoder_params))
        return jnp.mean(jnp.tanh(out["logits"])) + jnp.mean(out["iou"] ** 2)

    a, b = (jax.jit(outputs, static_argnums=0)(c, params) for c in (first, second))
    assert a["logits"].shape == (2, 8, 4, first.low_res_size, first.low_res_size)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=out_tol, atol=out_tol,
                                   err_msg=name)
    grads = [jax.jit(jax.grad(loss, argnums=1), static_argnums=0)(c, params["mask_decoder"])
             for c in (first, second)]
    jax.tree_util.tree_map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=grad_rtol, atol=grad_atol), *grads)


def test_prompt_chunks_give_the_same_outputs_and_gradients():
    """Decoding 4 prompts of an image at a time (a loop) equals decoding all at once."""
    chunked = model_config("tiny", decoder_prompt_chunk=4)
    whole = model_config("tiny", decoder_prompt_chunk=0)
    _assert_same_decoder(chunked, whole, init_params(chunked, jax.random.key(0)), 5, 1e-5,
                         1e-4, 1e-7)


def _perturbed(params, key, scale=0.1):
    """params + noise, so that LayerNorm gains and every bias differ from their init."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(key), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [
        x + scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)])


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

    want, got = dense(args), factored(args)
    assert got.shape == (2, Q, S, 3 * D)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

    def loss(fn):
        return jax.grad(lambda a: jnp.mean(jnp.sin(fn(a))))(args)

    jax.tree_util.tree_map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-6),
                           loss(factored), loss(dense))


def test_factored_upscale_gives_the_same_outputs_and_gradients():
    """The first transposed convolution on the factored image tokens equals it on the dense
    ones (random LayerNorm gains and biases, so every piece of the factored form counts)."""
    # Width 128 and 2 heads: rank 2 x 2 x 8 = 32, so 4 prompts per call take the factored
    # path and it is clearly less work (with 'tiny' as it is, rank 64 = width, it never is).
    factored = model_config("tiny", embed_dim=128, decoder_heads=2, factored_upscale=True)
    dense = model_config("tiny", embed_dim=128, decoder_heads=2, factored_upscale=False)
    params = _perturbed(init_params(factored, jax.random.key(0)), 1)
    _assert_same_decoder(factored, dense, params, 6, 1e-4, 1e-3, 1e-6)
    emb = jnp.zeros((1, factored.embedding_size, factored.embedding_size, factored.embed_dim))
    points, labels = (jnp.zeros((1, 4, 2, 2)), jnp.full((1, 4, 2), 2, jnp.int32))

    def flops(config):
        fn = jax.jit(lambda p: EfficientSam(config).apply(
            {"params": p}, emb, points, labels, method=EfficientSam.decode))
        cost = fn.lower(params).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list | tuple) else cost)["flops"]

    assert flops(factored) < 0.97 * flops(dense)  # the factored path ran, and is less work


def test_unused_tokens_skip_the_final_attention():
    """Without the prompt tokens' outputs the masks, IoUs and output tokens are unchanged, and
    `decode`, which runs only the mask tokens it returns, gives the official selection."""
    config = model_config("tiny")
    model = EfficientSam(config)
    params = _perturbed(init_params(config, jax.random.key(0)), 2)
    emb = _normal(7, (1, config.embedding_size, config.embedding_size, config.embed_dim))
    points, labels = (jnp.asarray(x) for x in pp.boxes_to_prompts(
        np.array([[[10, 20, 120, 200], [5, 6, 70, 90]]], np.float32)))
    outs = [jax.jit(lambda p, e, x, lab, keep=keep: model.apply(
        {"params": p}, e, x, lab, prompt_tokens=keep, method=EfficientSam.decode_all))(
        params, emb, points, labels) for keep in (True, False)]
    outputs = 1 + config.num_multimask_outputs + 1  # the IoU token and the mask tokens
    assert outs[0]["tokens"].shape[2] == outputs + config.max_num_points
    assert outs[1]["tokens"].shape[2] == outputs
    np.testing.assert_allclose(outs[1]["tokens"], outs[0]["tokens"][:, :, :outputs],
                               rtol=1e-5, atol=1e-5)
    for name in ("logits", "iou", "hyper_in"):
        np.testing.assert_allclose(outs[1][name], outs[0][name], rtol=1e-5, atol=1e-5,
                                   err_msg=name)
    for multimask in (True, False):
        logits, iou = jax.jit(lambda p, e, x, lab, m=multimask: model.apply(
            {"params": p}, e, x, lab, m, method=EfficientSam.decode))(params, emb, points,
                                                                       labels)
        want = select_masks(outs[0]["logits"], outs[0]["iou"], multimask)
        assert logits.shape == want[0].shape and iou.shape == want[1].shape
        np.testing.assert_allclose(logits, want[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(iou, want[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_ids", [(), (4,), (-1,)])
def test_bad_mask_ids_are_named(mask_ids):
    config = model_config("tiny")
    params = init_params(config, jax.random.key(0))
    emb = jnp.zeros((1, config.embedding_size, config.embedding_size, config.embed_dim))
    points, labels = jnp.zeros((1, 1, 2, 2)), jnp.full((1, 1, 2), 2, jnp.int32)
    with pytest.raises(ValueError, match="mask_ids"):
        EfficientSam(config).apply({"params": params}, emb, points, labels, mask_ids=mask_ids,
                                   method=EfficientSam.decode_all)


def test_rows_times_kernel_has_the_gradients_of_the_plain_product():
    """The upscaling's products take their kernel gradient in a hand-written form (custom
    VJP); value and both gradients must be those of `x @ kernel`."""
    from sameo_jax.models.layers import rows_times_kernel

    kx, kw, kd = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (300, 24))
    kernel = jax.random.normal(kw, (24, 40))
    dy = jax.random.normal(kd, (300, 40))

    def loss(f):
        return lambda x, k: jnp.sum(f(x, k) * dy)

    np.testing.assert_array_equal(rows_times_kernel(x, kernel), x @ kernel)
    got = jax.grad(loss(rows_times_kernel), argnums=(0, 1))(x, kernel)
    want = jax.grad(loss(jnp.matmul), argnums=(0, 1))(x, kernel)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)
    # Under jit, on a [B, Q, S, C] map reshaped to rows as the mask decoder does.
    x4 = x.reshape(2, 3, 50, 24)
    got = jax.jit(jax.grad(lambda k: jnp.sum(
        rows_times_kernel(x4.reshape(-1, 24), k).reshape(2, 3, 50, 40) ** 2)))(kernel)
    want = jax.grad(lambda k: jnp.sum((x4 @ k) ** 2))(kernel)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)
