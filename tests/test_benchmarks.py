"""benchmarks/run.py on the tiny model: the rows asked for, in the JSON schema it promises.
The whole table and its work counts are checked with the tools (tests/test_tools.py)."""

import json

import pytest


def test_rows_and_schema(tmp_path, benchmark_module):
    run = benchmark_module("run")
    out = tmp_path / "rows.json"
    returned = run.main(["--variant", "tiny", "--repeats", "1", "--json", str(out),
                         "--rows", "encoder_tiny", "decoder_boxes_1", "decoder_boxes_1_u*"])
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(returned))
    rows = {r["name"]: r for r in written}
    assert set(rows) == {"encoder_tiny", "decoder_boxes_1", "decoder_boxes_1_upsampled"}
    for row in rows.values():
        assert {"name", "seconds", "gflops", "floor_seconds", "device"} <= set(row)
        assert row["seconds"] > 0 and row["gflops"] > 0
        assert row["floor_seconds"] == pytest.approx(
            row["gflops"] * 1e9 / (row["matmul_gflops_per_s"] * 1e9))
        assert row["device"].startswith("cpu")
        assert "products_seconds" not in row  # timed only with --products (tools/)


def test_pipeline_loader_rows_and_schema(tmp_path, benchmark_module):
    """The two loader rows of `run.py --pipeline` on 8 generated images, no workers."""
    rows = benchmark_module("pipeline_rows")
    out = tmp_path / "rows.json"
    returned = rows.main(["--rows", "pipeline_encoder_path", "--rows", "pipeline_cached_path",
                          "--images", "8", "--workers", "0", "--json", str(out)])
    written = {r["name"]: r for r in json.loads(out.read_text())}
    assert list(written) == ["pipeline_encoder_path", "pipeline_cached_path"]
    assert json.loads(json.dumps(returned)) == list(written.values())
    for row in written.values():
        assert row["images"] == 8 and row["workers"] == 0 and row["device"] == "cpu"
        assert row["images_per_second_per_core"] == pytest.approx(8 / row["cpu_seconds"])
        assert row["images_per_second"] == pytest.approx(8 / row["seconds"])
