"""The benchmark chart: a PNG from a report dict, and the `python -m recyclegpt.evals.chart` entry on bench output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")

from recyclegpt.evals.chart import read_report, write_chart  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPORT = {
    "device": "cpu (x86_64, 2 threads)", "model": "tiny", "batch_size": 1,
    "results": [{"strategy": "standard", "median_tokens_per_s": 22.0},
                {"strategy": "recycle", "median_tokens_per_s": 30.1},
                {"strategy": "hf_eager", "median_tokens_per_s": 18.5}],
    "speedup": {"recycle": 1.37, "hf_eager": 0.84},
}


def test_write_chart_makes_a_png(tmp_path):
    out = write_chart(REPORT, tmp_path / "sub" / "chart.png")
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 5000  # a real picture with bars and text, not an empty canvas


def test_write_chart_rejects_an_empty_report(tmp_path):
    with pytest.raises(ValueError, match="no results"):
        write_chart({"results": []}, tmp_path / "x.png")


def test_read_report_from_json_or_bench_output(tmp_path):
    as_json = tmp_path / "r.json"
    as_json.write_text(json.dumps(REPORT))
    bench_out = tmp_path / "bench.txt"
    bench_out.write_text("device: cpu\nstrategy tok/s\n--------\nstandard 22.0\n" + json.dumps(REPORT) + "\n\n")
    assert read_report(as_json) == REPORT == read_report(bench_out)
    bad = tmp_path / "bad.txt"
    bad.write_text("no json here\n")
    with pytest.raises(ValueError, match="no benchmark report"):
        read_report(bad)


def test_module_entry_point(tmp_path):
    src = tmp_path / "bench.txt"
    src.write_text("a table line\n" + json.dumps(REPORT) + "\n")
    out = tmp_path / "out.png"
    res = subprocess.run([sys.executable, "-m", "recyclegpt.evals.chart", str(src), str(out)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes().startswith(PNG_SIGNATURE)
