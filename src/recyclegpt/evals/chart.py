"""A PNG bar chart of a benchmark report: median tokens/s per strategy, each bar labelled with its speed-up.

`write_chart(report, path)` takes the dict that `bench.run_bench` returns (the JSON line `recyclegpt bench` prints
last). From the shell: `python -m recyclegpt.evals.chart REPORT OUT.png`, where REPORT is a JSON file holding the report
or the saved output of `recyclegpt bench` (a table, then the report as its last line).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def write_chart(report: dict, path: str | Path) -> Path:
    """Draw report["results"] ({"strategy", "median_tokens_per_s"} each) as bars, each labelled with its tokens/s
    and its speed-up report["speedup"][strategy] (standard: 1.00x); title from device, model and batch size."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("the benchmark chart needs matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report.get("results") or []
    if not results:
        raise ValueError("the report has no results to chart")
    names = [r["strategy"] for r in results]
    rates = [float(r["median_tokens_per_s"]) for r in results]
    speedup = report.get("speedup") or {}
    labels = []
    for name, rate in zip(names, rates):
        sp = speedup.get(name, 1.0 if name == "standard" else None)
        labels.append(f"{rate:.1f} tok/s" + (f"\n{sp:.2f}x" if sp is not None else ""))

    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(names) + 2), 4.5), layout="constrained")
    bars = ax.bar(names, rates, color=["#888888" if n == "standard" else "#2a7ab9" for n in names])
    ax.bar_label(bars, labels=labels, padding=3, fontsize=9)
    ax.set_ylim(0, max(rates) * 1.25 or 1.0)
    ax.set_ylabel("median tokens/s (per prompt)")
    ax.set_title(f"{report.get('model', '?')} on {report.get('device', '?')}, batch size {report.get('batch_size', 1)}",
                 fontsize=10)
    ax.tick_params(axis="x", labelrotation=20 if len(names) > 4 else 0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def read_report(path: str | Path) -> dict:
    """A report from a JSON file, or from a text file whose last non-empty line is the JSON report."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        report = json.loads(text)
    except json.JSONDecodeError:
        lines = [line for line in text.splitlines() if line.strip()]
        try:
            report = json.loads(lines[-1]) if lines else None
        except json.JSONDecodeError:
            report = None
    if not isinstance(report, dict) or "results" not in report:
        raise ValueError(f"{path}: no benchmark report found (expected JSON, or text ending in a JSON line)")
    return report


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m recyclegpt.evals.chart REPORT.json OUT.png", file=sys.stderr)
        return 2
    print(write_chart(read_report(args[0]), args[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
