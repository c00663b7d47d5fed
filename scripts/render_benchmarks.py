"""Render BENCHMARKS.md from the machine-readable records in benchmarks/records/*.json.

Each record is one measurement: what it is ("title"), when and where it ran ("date", "commit", "hardware",
"versions"), the exact command, and the JSON line that command printed ("report": a `recyclegpt bench --json`
report, or a `scripts/differential.py` report). Records are listed in the order of their "order" field; a bench
record with "per_category": false leaves out its per-category table (the record keeps it).

    python scripts/render_benchmarks.py            # writes BENCHMARKS.md
    python scripts/render_benchmarks.py --check    # exits 1 if BENCHMARKS.md is not what the records render
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "benchmarks" / "records"
OUT = ROOT / "BENCHMARKS.md"

HEADER = """# Benchmarks

Every table below is rendered from a record in `benchmarks/records/` by `python scripts/render_benchmarks.py`;
each names the date, commit, hardware, versions and the exact command. Speeds are tokens per second over all new
tokens and all time, the prompt's forward included, greedy, one process, strategies interleaved prompt by prompt.
Every bench run decoded a sample of its prompts again with the eager reference loop and compared `standard`'s
tokens ("checked"): all of them in fp32; in bf16 the first 32, where a difference passes only at a near-tie, listed
with its logit margin (the engine's token among the reference's five most likely there; in runs before commit
`5732f56`, within four bf16 ulps of the top logit). The prompt suites are built from the shared data folder (`recyclegpt suite`, README).
Quality under recycle scoring (multiple choice, perplexity) is in each shipped module's model card.
"""


def ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def render_bench(rep: dict, per_category: bool = True) -> list[str]:
    lines = ["| strategy | tok/s | vs standard | τ | α | tokens per full call | prompts equal to standard "
             "(share of tokens) | first token ms |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in rep["results"]:
        same = "-"
        if r.get("same_as_standard") is not None:
            same = f"{r['same_as_standard']}/{rep['prompts']} ({r['same_token_share']:.1%})"
        lines.append(f"| {r['strategy']} | {r['tokens_per_s']:,.1f} | {ratio(rep['speedup'].get(r['strategy']))} | "
                     f"{num(r.get('tau'), '.2f')} | {num(r.get('alpha'), '.3f')} | "
                     f"{r['tokens_per_full_call']:.2f} | {same} | {r['ttft_ms']:.1f} |")
    check = rep.get("check")
    if check:
        ties = check.get("near_ties") or []
        lines += ["", f"Checked {check['checked']}/{check['of']}: `{check['strategy']}`'s tokens ({check['tokens']}) "
                      f"equal {check['against']}" + (", but for near-ties: " + "; ".join(
                          f"prompt {t['prompt']} ({t['prompt_tokens']} tokens), new token {t['new_token']}, logit "
                          f"margin {t['margin']:.4f}" + (f" (rank {t['rank']})" if t.get("rank") is not None else "")
                          for t in ties) if ties else "") + "."]
    cats = [r for r in rep["results"] if r.get("per_category")] if per_category else []
    if cats:
        names = [r["strategy"] for r in cats]
        lines += ["", "Per category (tok/s, speed-up over `standard`; τ, α or share of `standard`'s tokens where they "
                      "apply):", "", "| category | " + " | ".join(names) + " |",
                  "|---|" + "---:|" * len(names)]
        for c in cats[0]["per_category"]:
            cells = []
            for r in cats:
                part = r["per_category"][c]
                extra = []
                if part.get("tau") is not None:
                    extra.append(f"τ {part['tau']:.2f}")
                if part.get("alpha") is not None:
                    extra.append(f"α {part['alpha']:.3f}")
                if part.get("same_token_share") is not None:
                    extra.append(f"same {part['same_token_share']:.0%}")
                sp = part.get("speedup")
                cells.append(f"{part['tokens_per_s']:,.0f}" + (f" ({sp:.2f}x)" if sp is not None else "")
                             + (f", {', '.join(extra)}" if extra else ""))
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return lines


def render_differential(rep: dict) -> list[str]:
    """One row per engine whose strategies all gave the reference's tokens on every request, else one per strategy."""
    lines = ["| engine | strategy | requests | identical | tokens | rows that differ | of them near-ties | "
             "first difference | largest logit margin there |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    engines = list(dict.fromkeys(r["engine"] for r in rep["rows"]))
    for engine in engines:
        rows = [r for r in rep["rows"] if r["engine"] == engine]
        if all(r["identical"] == r["requests"] for r in rows) and len({r["requests"] for r in rows}) == 1:
            names = "all five" if len(rows) == 5 else ", ".join(r["strategy"] for r in rows)
            lines.append(f"| {engine} | {names} | {rows[0]['requests']} | {rows[0]['identical']} each | "
                         f"{sum(r['tokens'] for r in rows):,} | 0 | - | - | - |")
            continue
        for r in rows:
            lines.append(f"| {engine} | {r['strategy']} | {r['requests']} | {r['identical']} | {r['tokens']:,} | "
                         f"{r['mismatched_rows']} | {num(r.get('near_ties'), 'd')} | "
                         f"{num(r['first_difference'], 'd')} | {num(r['largest_margin'], '.4f')} |")
    lengths = rep.get("prompt_lengths")
    if lengths:
        lines += ["", f"Prompt lengths {min(lengths)}–{max(lengths)} tokens (median "
                      f"{lengths[len(lengths) // 2]}), check `{rep['check']}`, {rep['dtype']}."]
    return lines


def render(records: list[dict]) -> str:
    out = [HEADER]
    for rec in sorted(records, key=lambda r: (r.get("order", 0), r["title"])):
        versions = ", ".join(f"{k} {v}" for k, v in rec.get("versions", {}).items())
        out += [f"## {rec['title']}", ""]
        if rec.get("note"):
            out += [rec["note"], ""]
        out += [f"{rec['date']}, commit `{rec['commit']}`, {rec['hardware']}" + (f" ({versions})" if versions else "")
                + ".", "", "```bash", rec["command"], "```", ""]
        body = (render_differential(rec["report"]) if rec["kind"] == "differential"
                else render_bench(rec["report"], per_category=rec.get("per_category", True)))
        out += body + [""]
    return "\n".join(out).rstrip() + "\n"


def load(folder: Path = RECORDS) -> list[dict]:
    records = []
    for path in sorted(folder.glob("*.json")):
        rec = json.loads(path.read_text(encoding="utf-8"))
        missing = {"title", "date", "commit", "hardware", "command", "kind", "report"} - set(rec)
        if missing:
            raise ValueError(f"{path}: record lacks {', '.join(sorted(missing))}")
        records.append(rec)
    return records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with BENCHMARKS.md instead of writing it")
    args = ap.parse_args(argv)
    text = render(load())
    if args.check:
        if OUT.read_text(encoding="utf-8") != text:
            print("BENCHMARKS.md is not what benchmarks/records render: run scripts/render_benchmarks.py",
                  file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT} from {len(list(RECORDS.glob('*.json')))} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
