"""benchmarks/run.py on the tiny model: the rows it promises, in its JSON schema, with work
counted over every prompt and every loop iteration."""

import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import run
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
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


def test_work_counts_every_prompt(rows):
    """The decoder loops over chunks of 4 prompts; XLA counts a loop body once, so the work
    must come from the unchunked program: 4x the prompts, about 4x the work."""
    ratio = rows["decoder_boxes_64"]["gflops"] / rows["decoder_boxes_16"]["gflops"]
    assert 3.6 < ratio <= 4.0
    assert rows["decoder_boxes_16_upsampled"]["gflops"] > rows["decoder_boxes_16"]["gflops"]
    assert rows["train_step_encoder"]["gflops"] > rows["train_step_cached"]["gflops"]
