"""tools/: the revision comparison (compare.py) and the product floor (products.py). Outside
the default run: `python -m pytest -q -m tools tests/test_tools.py`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.tools

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def products(tool_module):
    return tool_module("products")


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


def test_compare_times_revisions_side_by_side(capsys, tool_module):
    """tools/compare.py: one worker per revision, rounds alternating between them, and
    the same outputs from the same code (here the working tree, with train.py's malloc
    settings, against HEAD on malloc's defaults, or against itself without git history)."""
    compare = tool_module("compare")
    import subprocess

    has_git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                             capture_output=True).returncode == 0
    revs = [".", "HEAD" if has_git else "."]
    labels = [".", f"{revs[1]} (malloc defaults)"]
    times = compare.main([*revs, "--variant", "tiny", "--rounds", "2", "--default-malloc", "2",
                          "--rows", "decoder_boxes_4", "train_step_cached"])
    assert set(times) == {"decoder_boxes_4", "train_step_cached"}
    for row in times.values():
        assert list(row) == labels
        assert all(len(t) == 2 and min(t) > 0 for t in row.values())
    printed = capsys.readouterr().out
    assert "min ratio" in printed and printed.count(f"max |output - {labels[0]}'s|") == 2
    same_code = not has_git or subprocess.run(
        ["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--", "sameo_jax", "configs"],
    ).returncode == 0
    if same_code:  # neither the revision nor the malloc settings change a result
        assert printed.count(f"max |output - {labels[0]}'s| = 0\n") == 2


def test_compare_names_a_bad_revision(capsys, tool_module):
    compare = tool_module("compare")
    with pytest.raises(SystemExit, match="no-such-revision"):
        compare.main(["no-such-revision", ".", "--variant", "tiny", "--rows", "encoder"])
    with pytest.raises(SystemExit):
        compare.main([".", ".", "--default-malloc", "3", "--rows", "encoder"])
    assert "--default-malloc [3]: there are 2 revisions" in capsys.readouterr().err


def test_compare_sets_a_model_field_for_one_revision(capsys, tool_module):
    """`--set N FIELD=VALUE` times a revision against itself with another config field:
    the label names the setting, and a setting that only reorders work (the decoder's prompt
    chunk) changes no output."""
    compare = tool_module("compare")
    times = compare.main([".", ".", "--variant", "tiny", "--rounds", "1",
                          "--rows", "decoder_boxes_4", "--set", "2", "decoder_prompt_chunk=0"])
    labels = list(times["decoder_boxes_4"])
    assert labels == [".", ". [decoder_prompt_chunk=0]"]
    printed = capsys.readouterr().out
    diff = float(printed.split("max |output - .'s| = ")[1].split()[0])
    assert diff < 1e-5


def test_compare_names_a_bad_setting(capsys, tool_module):
    compare = tool_module("compare")
    assert compare.parse_setting("encoder_attention_chunk=1024") == (
        "encoder_attention_chunk", 1024)
    assert compare.parse_setting("dtype=bfloat16") == ("dtype", "bfloat16")
    assert compare.parse_setting(" factored_upscale = False") == ("factored_upscale", False)
    for argv, message in [
        (["--set", "2", "no_such_field=1"], "the model config has no field 'no_such_field'"),
        (["--set", "3", "decoder_prompt_chunk=1"], "N must be a revision's position, 1 to 2"),
        (["--set", "1", "decoder_prompt_chunk"], "expected FIELD=VALUE"),
    ]:
        with pytest.raises(SystemExit):
            compare.main([".", ".", "--rows", "encoder", *argv])
        assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def all_rows(benchmark_module):
    rows = benchmark_module("run").main(["--variant", "tiny", "--repeats", "1", "--products"])
    return {r["name"]: r for r in rows}


def test_benchmark_rows_time_their_products_on_request(all_rows):
    assert set(all_rows) == {
        "encoder_tiny", "train_step_cached", "train_step_encoder",
        *(f"decoder_boxes_{q}{s}" for q in (1, 16, 64) for s in ("", "_upsampled")),
    }
    assert all(r["products_seconds"] > 0 for r in all_rows.values())


def test_work_counts_every_prompt(all_rows):
    """The decoder loops over chunks of 4 prompts; XLA counts a loop body once, so the work
    must come from the unchunked program: 4x the prompts, about 4x the work."""
    ratio = all_rows["decoder_boxes_64"]["gflops"] / all_rows["decoder_boxes_16"]["gflops"]
    assert 3.6 < ratio <= 4.0
    assert (all_rows["decoder_boxes_16_upsampled"]["gflops"]
            > all_rows["decoder_boxes_16"]["gflops"])
    assert all_rows["train_step_encoder"]["gflops"] > all_rows["train_step_cached"]["gflops"]
