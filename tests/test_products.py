"""benchmarks/products.py: the products of a compiled call, read from its optimized HLO with
the number of times each runs, and timed on their own."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest


@pytest.fixture(scope="module")
def products(benchmark_module):
    return benchmark_module("products")


def _program(x, w, k, images):
    """A loop of 5 products [64, 96] x [96, 96], one batched product outside it, and a
    strided 3x3 convolution: work known exactly."""
    def body(c, _):
        return jnp.tanh(c @ w), None

    looped, _ = jax.lax.scan(body, x, None, length=5)
    batched = jnp.einsum("bij,bjk->bik", looped.reshape(4, 16, 96), w.reshape(4, 96, 24))
    conv = jax.lax.conv_general_dilated(images, k, (2, 2), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return batched, conv


def test_products_and_their_counts(products):
    args = (jnp.ones((64, 96)), jnp.ones((96, 96)), jnp.ones((3, 3, 8, 16)),
            jnp.ones((2, 32, 32, 8)))
    hlo = jax.jit(_program).lower(*args).compile().as_text()
    found = products.hlo_products(hlo)
    loop = 5 * 2 * 64 * 96 * 96
    batched = 2 * 4 * 16 * 96 * 24
    conv = 2 * (2 * 16 * 16 * 16) * (3 * 3 * 8)
    # XLA may unroll or merge; the work over all products, counted per run, is fixed.
    assert sum(n * p.flops for p, n in found) == loop + batched + conv
    convs = [(p, n) for p, n in found if p.kind == "convolution"]
    assert len(convs) == 1 and convs[0][1] == 1
    assert convs[0][0].lhs == (2, 32, 32, 8) and convs[0][0].out == (2, 16, 16, 16)
    # Every product rebuilt standalone has the shape XLA's has.
    for p, _ in found:
        fn, shapes = p.function()
        out = jax.eval_shape(fn, *(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes))
        assert out.shape == p.out, p.describe()


def test_loop_bodies_count_their_trip_count(products):
    """A loop XLA keeps (too long to unroll) counts its body once per iteration."""
    def f(x, w):
        return jax.lax.fori_loop(0, 1000, lambda i, c: jnp.tanh(c @ w), x)

    hlo = jax.jit(f).lower(jnp.ones((8, 128)), jnp.ones((128, 128))).compile().as_text()
    assert " while(" in hlo
    [(product, count)] = products.hlo_products(hlo)
    assert count == 1000 and product.lhs == (8, 128) and product.rhs == (128, 128)


def test_timer_sums_count_times_standalone_time(products):
    big = products.Product("dot", (256, 512), (512, 256), "f32", (256, 256),
                           (("lhs_contracting_dims", "{1}"), ("rhs_contracting_dims", "{0}")))
    tiny = products.Product("dot", (4, 8), (8, 4), "f32", (4, 4),
                            (("lhs_contracting_dims", "{1}"), ("rhs_contracting_dims", "{0}")))
    timer = products.ProductTimer(peak=1e11, repeats=2)
    one = timer.seconds(big)
    assert one > 0 and timer.seconds(big) == one  # timed once per run
    assert timer.seconds(tiny) == pytest.approx(tiny.flops / 1e11)  # under TINY_FLOPS
    assert timer.floor([(big, 3), (tiny, 2)]) == pytest.approx(3 * one + 2 * tiny.flops / 1e11)
    [(text, count, total, rate)] = timer.breakdown([(big, 3)])
    assert count == 3 and total == pytest.approx(3 * one)
    assert rate == pytest.approx(big.flops / one) and "[256, 512]" in text


def test_no_entry_is_an_error(products):
    with pytest.raises(ValueError, match="ENTRY"):
        products.hlo_products("HloModule empty\n")


def test_rebuilt_product_computes_the_product(products):
    hlo = jax.jit(lambda a, b: jnp.einsum("bij,bkj->bik", a, b)).lower(
        jnp.ones((3, 5, 7)), jnp.ones((3, 4, 7))).compile().as_text()
    [(p, n)] = products.hlo_products(hlo)
    fn, shapes = p.function()
    assert n == 1 and shapes == ((3, 5, 7), (3, 4, 7))
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal(s).astype(np.float32) for s in shapes)
    np.testing.assert_allclose(np.asarray(fn(a, b)), np.einsum("bij,bkj->bik", a, b),
                               rtol=1e-5, atol=1e-5)
