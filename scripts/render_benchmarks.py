"""Render BENCHMARKS.md from the machine-readable records in benchmarks/records/*.json.

Each record is one measurement: what it is ("title"), when and where it ran ("date", "commit", "hardware",
"versions"), the exact command, and the JSON line that command printed ("report": a `recyclegpt bench --json`
report, or a `scripts/differential.py` report). Presentational fields: "order" (records are listed by it), "note"
(rendered with the record), "near_tie_rule" (how the record's bench check told a near-tie, where it differs from
the rule the header states) and "per_category": false (a bench record leaves its per-category table to the record).

The differential records make one table, a row per record and engine, their commands one code block; the bench
records a section each. Records sharing date, hardware and versions name them in one line, a column that is "-" in
every row is left out.

    python scripts/render_benchmarks.py            # writes BENCHMARKS.md
    python scripts/render_benchmarks.py --check    # exits 1 if BENCHMARKS.md is not what the records render
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "benchmarks" / "records"
OUT = ROOT / "BENCHMARKS.md"

HEADER = """# Benchmarks

Rendered by `python scripts/render_benchmarks.py` from the records in `benchmarks/records/`, each naming its date, commit, hardware, versions and exact command.
Speeds are tokens per second over all new tokens and all time, the prompt's forward included: greedy, one process, strategies interleaved prompt by prompt.
Each bench record also decodes a sample of its prompts with the eager reference loop and compares `standard`'s tokens ("checked"): all of them in fp32; in bf16 the first 32, where a difference passes only at a near-tie (the engine's token among the reference's five most likely there), listed with its logit margin.
Prompt suites are built from the shared data folder (`recyclegpt suite`, README); quality under recycle scoring (multiple choice, perplexity) is in each shipped module's model card.
"""

DIFFERENTIAL_INTRO = (
    "`scripts/differential.py` runs, in one process, a random sequence of requests on SmolLM2-135M-Instruct with its "
    "shipped module (unless the run names another), interleaving the eager reference with each engine and strategy. "
    "Prompts are slices of book text in batches of 1 to 4 mixed lengths; the sequence starts long, short, long and "
    "crosses every 64-token prefill and 256-slot KV bucket boundary; budgets run from 1 to `--max-new-tokens` new "
    "tokens, with early and late stops and a quarter seeded sampling. A row is one run and engine: strategies that "
    "gave the reference's tokens on every request share a cell (their tokens summed), the others follow it after "
    "\" / \", in the same order in every column.")

BENCH_INTRO = ("Per-category tables give tok/s and speed-up over `standard`, with τ, α or the share of `standard`'s "
               "tokens where they apply.")


def ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def table(head: list[str], align: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table without the columns that are "-" in every row."""
    keep = [i for i in range(len(head)) if not rows or any(r[i] != "-" for r in rows)]
    return (["| " + " | ".join(head[i] for i in keep) + " |", "|" + "|".join(align[i] for i in keep) + "|"]
            + ["| " + " | ".join(r[i] for i in keep) + " |" for r in rows])


def metadata(rec: dict, commit: bool = True) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in rec.get("versions", {}).items())
    return (f"{rec['date']}, " + (f"commit `{rec['commit']}`, " if commit else "") + rec["hardware"]
            + (f" ({versions})" if versions else ""))


def groups(records: list[dict]) -> list[tuple[str, list[dict]]]:
    """Records by shared date, hardware and versions, in order of first appearance."""
    out: dict[str, list[dict]] = {}
    for rec in records:
        out.setdefault(metadata(rec, commit=False), []).append(rec)
    return list(out.items())


def check_line(check: dict, rule: str | None = None) -> str:
    ties = check.get("near_ties") or []
    text = f"Checked {check['checked']}/{check['of']}: `{check['strategy']}`'s tokens ({check['tokens']}) equal " \
           f"{check['against']}"
    if ties:
        text += (f", but for {len(ties)} near-tie{'s' if len(ties) != 1 else ''}" + (f" ({rule})" if rule else "")
                 + ": " + "; ".join(f"prompt {t['prompt']} ({t['prompt_tokens']} tokens), new token {t['new_token']}, "
                                    f"logit margin {t['margin']:.4f}"
                                    + (f", rank {t['rank']}" if t.get("rank") is not None else "") for t in ties))
    return text + "."


def render_bench(rep: dict, per_category: bool = True, rule: str | None = None) -> list[str]:
    rows = []
    for r in rep["results"]:
        same = "-"
        if r.get("same_as_standard") is not None:
            same = f"{r['same_as_standard']}/{rep['prompts']} ({r['same_token_share']:.1%})"
        rows.append([r["strategy"], f"{r['tokens_per_s']:,.1f}", ratio(rep["speedup"].get(r["strategy"])),
                     num(r.get("tau"), ".2f"), num(r.get("alpha"), ".3f"), f"{r['tokens_per_full_call']:.2f}", same,
                     f"{r['ttft_ms']:.1f}"])
    lines = table(["strategy", "tok/s", "vs standard", "τ", "α", "tokens per full call",
                   "prompts equal to standard (share of tokens)", "first token ms"],
                  ["---", "---:", "---:", "---:", "---:", "---:", "---", "---:"], rows)
    if rep.get("check"):
        lines += ["", check_line(rep["check"], rule)]
    cats = [r for r in rep["results"] if r.get("per_category")] if per_category else []
    if cats:
        cat_rows = []
        for c in cats[0]["per_category"]:
            cells = [c]
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
            cat_rows.append(cells)
        lines += [""] + table(["category"] + [r["strategy"] for r in cats], ["---"] + ["---:"] * len(cats), cat_rows)
    return lines


def _join(cells: list[str], fold: bool = False) -> str:
    """Cells separated by " / "; `fold`: one cell where they are all the same."""
    return cells[0] if fold and len(set(cells)) == 1 else " / ".join(cells)


def engine_cells(engine: str, rows: list[dict]) -> list[str]:
    """engine, strategy, requests, identical, tokens, rows that differ, near-ties, first difference, largest margin
    for one engine's rows of a differential report. The strategies that gave the reference's tokens on every request
    share one cell ("all five" when they are all five; tokens summed), the others follow it one by one."""
    agree = [r for r in rows if r["identical"] == r["requests"] and not r["mismatched_rows"]]
    parts = ([agree] if agree else []) + [[r] for r in rows if r not in agree]
    shared = bool(agree) and len(agree) > 1  # parts[0] is the agreeing strategies' shared cell

    def name(i: int, p: list[dict]) -> str:
        if not (shared and i == 0):
            return p[0]["strategy"]
        return "all five" if len(p) == len(rows) == 5 else ", ".join(r["strategy"] for r in p)

    def diff(key: str, fmt: str) -> str:  # "-" for the agreeing strategies; one "-" where no strategy has a value
        return _join(["-" if p is agree else num(p[0].get(key), fmt) for p in parts], fold=True)

    return [engine, _join([name(i, p) for i, p in enumerate(parts)]),
            _join([" / ".join(dict.fromkeys(str(r["requests"]) for r in p)) for p in parts], fold=True),
            _join([f"{p[0]['identical']} each" if shared and i == 0 else str(p[0]["identical"])
                   for i, p in enumerate(parts)]),
            _join([f"{sum(r['tokens'] for r in p):,}" for p in parts]),
            _join([str(sum(r["mismatched_rows"] for r in p)) for p in parts]),
            diff("near_ties", "d"), diff("first_difference", "d"), diff("largest_margin", ".4f")]


def differential_cells(rep: dict) -> list[list[str]]:
    """One row of cells per engine of a differential report (engine_cells)."""
    engines = dict.fromkeys(r["engine"] for r in rep["rows"])
    return [engine_cells(e, [r for r in rep["rows"] if r["engine"] == e]) for e in engines]


def exact_totals(records: list[dict]) -> str:
    """One line summing the exact-check runs per device and engine: requests run, and the fewest that a strategy
    gave the reference's tokens on."""
    totals: dict[tuple[str, str], list[int]] = {}
    for rec in records:
        rep = rec["report"]
        if rep["check"] != "exact":
            continue
        for engine in dict.fromkeys(r["engine"] for r in rep["rows"]):
            rows = [r for r in rep["rows"] if r["engine"] == engine]
            t = totals.setdefault((rep["device"], engine), [0, 0])
            t[0] += rows[0]["requests"]
            t[1] += min(r["identical"] for r in rows)
    return ("Exact-check runs together: " + "; ".join(
        f"{engine} on {device} {run:,} requests, " + ("every one identical on every strategy" if same == run else
                                                      f"each strategy identical on at least {same:,}")
        for (device, engine), (run, same) in totals.items()) + ".") if totals else ""


def render_differential(records: list[dict]) -> list[str]:
    labels = dict(zip((id(r) for r in records), string.ascii_uppercase))
    rows = []
    for rec in records:
        rep = rec["report"]
        for cells in differential_cells(rep):
            rows.append([labels[id(rec)], f"{rep['device']}, {rep['dtype']}"] + cells)
    lines = ["## Engines against the eager reference (differential harness)", "", DIFFERENTIAL_INTRO, ""]
    lines += table(["run", "device, dtype", "engine", "strategy", "requests", "identical", "tokens", "rows that differ",
                    "of them near-ties", "first difference", "largest logit margin there"],
                   ["---", "---", "---", "---", "---:", "---:", "---:", "---:", "---:", "---:", "---:"], rows) + [""]
    for rec in records:
        rep, lengths = rec["report"], rec["report"].get("prompt_lengths")
        lines.append(f"- **{labels[id(rec)]}** {rec['title']}: commit `{rec['commit']}`, check `{rep['check']}`"
                     + (f", prompts {min(lengths)}–{max(lengths)} tokens (median {lengths[len(lengths) // 2]})"
                        if lengths else "") + "." + (f" {rec['note']}" if rec.get("note") else ""))
    totals = exact_totals(records)
    lines += ["", totals] if totals else []
    lines += ["", "; ".join(f"{', '.join(labels[id(r)] for r in recs)}: {meta}" for meta, recs in groups(records))
              + ".", "", "```bash"]
    for rec in records:
        lines += [f"# {labels[id(rec)]}", rec["command"]]
    return lines + ["```", ""]


def render(records: list[dict]) -> str:
    records = sorted(records, key=lambda r: (r.get("order", 0), r["title"]))
    out = [HEADER]
    harness = [r for r in records if r["kind"] == "differential"]
    if harness:
        out += render_differential(harness)
    bench = [r for r in records if r["kind"] != "differential"]
    if bench:
        metas = groups(bench)
        where = (f"Every table in this section: {metas[0][0]}; its commit is in its heading." if len(metas) == 1 else
                 " ".join(f"{meta}: {'; '.join(r['title'] for r in recs)}." for meta, recs in metas))
        out += ["## Decoding speed (`recyclegpt bench`)", "", where + " " + BENCH_INTRO, ""]
    for rec in bench:
        out += [f"### {rec['title']} (commit `{rec['commit']}`)", ""]
        if rec.get("note"):
            out += [rec["note"], ""]
        out += ["```bash", rec["command"], "```", ""]
        out += render_bench(rec["report"], per_category=rec.get("per_category", True),
                            rule=rec.get("near_tie_rule")) + [""]
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
