"""Numerics that parity with well-conditioned goldens cannot see: epsilons, GELU, resizes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sameo_jax import preprocessing as pp
from sameo_jax.models.config import model_config
from sameo_jax.models.efficient_sam import EfficientSam, param_shapes
from sameo_jax.models.layers import LayerNorm, gelu, layer_norm

from .conftest import random_params


def _torch_layer_norm(x, eps):
    x = x.astype(np.float64)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps)


@pytest.fixture(scope="module", params=["reference", "fast"])
def norm_modules(request):
    """Every LayerNorm / GroupNorm the model calls: (module path, type, eps, groups), with
    either mask decoder."""
    config = model_config("tiny", decoder_impl=request.param)
    found = []

    def record(module, method_name):
        if isinstance(module, LayerNorm | nn.GroupNorm):
            # Our LayerNorm always uses the centred (torch) variance.
            found.append(("/".join(module.scope.path), type(module).__name__,
                          module.epsilon, getattr(module, "num_groups", None),
                          getattr(module, "use_fast_variance", False)))
        return False

    images = jnp.zeros((1, 256, 256, 3))
    pts, labels = jnp.zeros((1, 2, 2, 2)), jnp.full((1, 2, 2), 2, jnp.int32)
    jax.eval_shape(lambda p: EfficientSam(config).apply(  # the calls are seen while tracing
        {"params": p}, images, pts, labels, capture_intermediates=record,
        mutable=["intermediates"]), param_shapes(config))
    return found


def test_norm_epsilons_per_part(norm_modules):
    enc = [m for m in norm_modules if m[0].startswith("image_encoder")]
    dec = [m for m in norm_modules if m[0].startswith("mask_decoder")]
    assert len(enc) == 2 * 2 + 2 and len(dec) == 2 * 4 + 1 + 1
    assert all(m[1] == "LayerNorm" and m[2] == 1e-6 for m in enc), enc
    assert all(not m[4] for m in norm_modules), "fast variance differs from torch"
    groups = [m for m in dec if m[1] == "GroupNorm"]
    assert [(g[2], g[3]) for g in groups] == [(1e-5, 1)]
    assert all(m[2] == 1e-5 for m in dec if m[1] == "LayerNorm")


@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_layer_norm_on_near_constant_input(eps):
    """Variance ~1e-6: eps dominates, so 1e-5 vs 1e-6 changes the output by ~2x."""
    rng = np.random.default_rng(0)
    x = (3.0 + 1e-3 * rng.standard_normal((4, 64))).astype(np.float32)
    ln = layer_norm(eps, jnp.float32)
    params = ln.init(jax.random.key(0), x)
    got = np.asarray(ln.apply(params, x))
    np.testing.assert_allclose(got, _torch_layer_norm(x, eps), atol=2e-3, rtol=1e-3)
    other = 1e-5 if eps == 1e-6 else 1e-6
    assert np.abs(got - _torch_layer_norm(x, other)).max() > 0.1


def test_group_norm_one_group_on_near_constant_input(norm_modules):
    rng = np.random.default_rng(1)
    x = (1.0 + 1e-3 * rng.standard_normal((2, 8, 8, 16))).astype(np.float32)
    gn = nn.GroupNorm(num_groups=1, epsilon=1e-5, use_fast_variance=False)
    params = gn.init(jax.random.key(0), x)
    got = np.asarray(gn.apply(params, x))
    flat = x.reshape(2, -1).astype(np.float64)
    ref = ((flat - flat.mean(1, keepdims=True))
           / np.sqrt(flat.var(1, keepdims=True) + 1e-5)).reshape(x.shape)
    np.testing.assert_allclose(got, ref, atol=2e-3, rtol=1e-3)


def test_gelu_is_exact_erf():
    from math import erf, sqrt

    xs = np.linspace(-4, 4, 41).astype(np.float32)
    ref = np.array([0.5 * v * (1 + erf(v / sqrt(2))) for v in xs.astype(np.float64)])
    np.testing.assert_allclose(np.asarray(gelu(jnp.asarray(xs))), ref, atol=1e-6)


def _bicubic_reference(signal, out_size):
    """float64 PyTorch bicubic, written pixel by pixel from the formula."""
    n = len(signal)
    a = -0.75

    def w(d):
        d = abs(d)
        if d <= 1:
            return (a + 2) * d**3 - (a + 3) * d**2 + 1
        if d < 2:
            return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
        return 0.0

    out = np.zeros(out_size)
    for j in range(out_size):
        src = (j + 0.5) * n / out_size - 0.5
        i0 = int(np.floor(src))
        t = src - i0
        for k in range(-1, 3):
            idx = min(max(i0 + k, 0), n - 1)
            out[j] += signal[idx] * w(t - k)
    return out


@pytest.mark.parametrize("n_in,n_out", [(14, 64), (256, 603), (256, 97), (5, 3)])
def test_cubic_matrix_against_float64_formula(n_in, n_out):
    signal = np.random.default_rng(n_in).standard_normal(n_in)
    got = pp.cubic_resize_matrix(n_in, n_out) @ signal
    np.testing.assert_allclose(got, _bicubic_reference(signal, n_out), atol=1e-12)


def test_jax_cubic_would_be_wrong():
    """The trap the reference warns about: jax.image.resize cubic is a different kernel."""
    x = np.random.default_rng(0).standard_normal((14, 14))
    ours = pp.cubic_resize_matrix(14, 64) @ x @ pp.cubic_resize_matrix(14, 64).T
    theirs = np.asarray(jax.image.resize(x, (64, 64), "cubic"))
    assert np.abs(ours - theirs).max() > 1e-2


@pytest.mark.parametrize("shape", [(603, 1072), (344, 485), (1024, 1024), (17, 2000)])
def test_bilinear_resize_matches_jax_without_antialias(shape):
    img = np.random.default_rng(0).integers(0, 256, shape + (3,), dtype=np.uint8)
    ours = pp.resize_image(img, 1024)
    ref = np.asarray(jax.image.resize(img.astype(np.float32), (1024, 1024, 3), "linear",
                                      antialias=False))
    np.testing.assert_allclose(ours, ref, atol=2e-4)
    np.testing.assert_allclose(np.asarray(pp.resize_image(jnp.asarray(img), 1024)), ours,
                               atol=2e-4)


@pytest.mark.parametrize("size", [1024, 100])
def test_device_resize_of_padded_images_equals_host_resize(size):
    """The jitted step's resize (uint8 padded to one shape, resized on the device) against
    resize_image on the host: the same taps and float32 arithmetic, so within a few float32
    ulps of 255 (the host rounds each weight from float64, XLA may fuse multiply-adds)."""
    rng = np.random.default_rng(size)
    shapes = [(480, 640), (37, 1242), (size, size), (1, 3), (1280, 1100)]
    pad = (1280, 1280)
    images = [rng.integers(0, 256, s + (3,), dtype=np.uint8) for s in shapes]
    padded = [pp.pad_image(im, pad, size) for im in images]
    batch = np.stack([p for p, _ in padded])
    hw = np.stack([h for _, h in padded])
    np.testing.assert_array_equal(hw, shapes)
    got = np.asarray(jax.jit(pp.resize_padded, static_argnums=2)(batch, hw, size))
    for image, resized in zip(images, got, strict=True):
        np.testing.assert_allclose(resized, pp.resize_image(image, size), rtol=0, atol=1e-4)
    # An image larger than the pad is resized on the host, rounded to uint8.
    big = rng.integers(0, 256, (1300, 500, 3), dtype=np.uint8)
    out, big_hw = pp.pad_image(big, pad, size)
    assert tuple(big_hw) == (size, size) and not out[size:].any() and not out[:, size:].any()
    np.testing.assert_allclose(out[:size, :size], pp.resize_image(big, size), atol=0.5)
    with pytest.raises(ValueError, match="smaller than the model frame"):
        pp.pad_image(big, (size - 1, size), size)


def test_rescale_points_per_axis_and_negative_to_minus_one():
    pts = np.array([[100.0, 50.0], [-5.0, 30.0], [-1.0, -1.0], [700.0, 400.0]], np.float32)
    got = pp.rescale_points(pts, (400, 700), 1024)
    np.testing.assert_allclose(got, [[100 * 1024 / 700, 50 * 1024 / 400], [-1, 30 * 1024 / 400],
                                     [-1, -1], [1024, 1024]], rtol=1e-6)


def test_pad_prompts_refuses_more_than_six_points():
    with pytest.raises(ValueError, match="7 points"):
        pp.pad_prompts(np.zeros((1, 7, 2)), np.ones((1, 7)), 6)


@pytest.mark.parametrize("decoder_impl", ["reference", "fast"])
def test_bfloat16_compute_tracks_float32(decoder_impl):
    """dtype='bfloat16' computes in bf16 (params stay f32) and returns f32 logits close to
    the f32 model's, relative to their scale."""
    config32 = model_config("tiny", decoder_impl=decoder_impl)
    # numpy-drawn (no init to compile), at twice their std so that the logits have a scale
    params = jax.tree.map(lambda x: 2 * x, random_params(config32, seed=3))
    images = jnp.asarray(np.random.default_rng(0).standard_normal((1, 256, 256, 3)), jnp.float32)
    points = jnp.asarray([[[[20.0, 30.0], [120.0, 200.0]]]])
    labels = jnp.asarray([[[2, 3]]], jnp.int32)
    outs = {}
    for dtype in ("float32", "bfloat16"):
        model = EfficientSam(model_config("tiny", dtype=dtype, decoder_impl=decoder_impl))
        outs[dtype] = jax.jit(model.apply)({"params": params}, images, points, labels)
    (lo32, iou32), (lo16, iou16) = outs["float32"], outs["bfloat16"]
    assert lo16.dtype == jnp.float32 and iou16.dtype == jnp.float32
    scale = float(jnp.abs(lo32).max())
    assert scale > 0.1
    assert float(jnp.abs(lo16 - lo32).max()) < 0.1 * scale
    assert not np.allclose(np.asarray(lo16), np.asarray(lo32), atol=1e-7, rtol=0)
    assert float(jnp.abs(iou16 - iou32).max()) < 0.1 * max(float(jnp.abs(iou32).max()), 1.0)
