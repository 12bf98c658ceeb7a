"""benchmarks/run.py on the tiny model: the rows it promises, in its JSON schema, with work
counted over every prompt and every loop iteration."""

import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rows(tmp_path_factory, benchmark_module):
    run = benchmark_module("run")
    out = tmp_path_factory.mktemp("bench") / "rows.json"
    returned = run.main(["--variant", "tiny", "--repeats", "1", "--json", str(out)])
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(returned))
    return {r["name"]: r for r in written}


def test_rows_and_schema(rows):
    assert set(rows) == {
        "encoder_tiny", "train_step_cached", "train_step_encoder",
        *(f"decoder_boxes_{q}{s}" for q in (1, 16, 64) for s in ("", "_upsampled")),
    }
    for row in rows.values():
        assert {"name", "seconds", "gflops", "floor_seconds", "device"} <= set(row)
        assert row["seconds"] > 0 and row["gflops"] > 0
        assert row["floor_seconds"] == pytest.approx(
            row["gflops"] * 1e9 / (row["matmul_gflops_per_s"] * 1e9))
        assert row["device"].startswith("cpu")
        # The row's dots and convolutions, each timed alone (benchmarks/products.py).
        assert row["products_seconds"] > 0


def test_work_counts_every_prompt(rows):
    """The decoder loops over chunks of 4 prompts; XLA counts a loop body once, so the work
    must come from the unchunked program: 4x the prompts, about 4x the work."""
    ratio = rows["decoder_boxes_64"]["gflops"] / rows["decoder_boxes_16"]["gflops"]
    assert 3.6 < ratio <= 4.0
    assert rows["decoder_boxes_16_upsampled"]["gflops"] > rows["decoder_boxes_16"]["gflops"]
    assert rows["train_step_encoder"]["gflops"] > rows["train_step_cached"]["gflops"]


def test_compare_times_revisions_side_by_side(capsys, benchmark_module):
    """benchmarks/compare.py: one worker per revision, rounds alternating between them, and
    the same outputs from the same code (here the working tree, with train.py's malloc
    settings, against HEAD on malloc's defaults, or against itself without git history)."""
    compare = benchmark_module("compare")
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


def test_compare_names_a_bad_revision(capsys, benchmark_module):
    compare = benchmark_module("compare")
    with pytest.raises(SystemExit, match="no-such-revision"):
        compare.main(["no-such-revision", ".", "--variant", "tiny", "--rows", "encoder"])
    with pytest.raises(SystemExit):
        compare.main([".", ".", "--default-malloc", "3", "--rows", "encoder"])
    assert "--default-malloc [3]: there are 2 revisions" in capsys.readouterr().err


def test_compare_sets_a_model_field_for_one_revision(capsys, benchmark_module):
    """`--set N FIELD=VALUE` times a revision against itself with another config field:
    the label names the setting, and a setting that only reorders work (the decoder's prompt
    chunk) changes no output."""
    compare = benchmark_module("compare")
    times = compare.main([".", ".", "--variant", "tiny", "--rounds", "1",
                          "--rows", "decoder_boxes_4", "--set", "2", "decoder_prompt_chunk=0"])
    labels = list(times["decoder_boxes_4"])
    assert labels == [".", ". [decoder_prompt_chunk=0]"]
    printed = capsys.readouterr().out
    diff = float(printed.split("max |output - .'s| = ")[1].split()[0])
    assert diff < 1e-5


def test_compare_names_a_bad_setting(capsys, benchmark_module):
    compare = benchmark_module("compare")
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
