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
