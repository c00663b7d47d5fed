"""The paper-style quality table (markdown) from the JSON lines that scripts/paper_table.sh collects.

    python scripts/paper_table.py results.jsonl

Rows: the six multiple-choice sets (accuracy and length-normalised accuracy, standard vs recycle scoring, and the
drop in points), their average, perplexity on WikiText-2 and PTB test, and α per held-out prompt file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MC_NAMES = {"piqa/valid.jsonl": "PIQA", "ARC-Easy-Test.jsonl": "ARC-Easy", "ARC-Challenge-Test.jsonl": "ARC-Challenge",
            "openbookqa/test.jsonl": "OpenBookQA", "boolq/dev.jsonl": "BoolQ", "sciq/validation.jsonl": "SciQ"}
PPL_NAMES = {"wikitext2/test.txt": "WikiText-2 test", "ptb.test.txt": "PTB test"}


def _name(path: str, names: dict[str, str]) -> str | None:
    return next((v for k, v in names.items() if path.endswith(k)), None)


def table(records: list[dict]) -> str:
    mc: dict[str, dict[str, dict]] = {}
    ppl: dict[str, dict[str, dict]] = {}
    alpha = []
    for r in records:
        if r["task"] == "mc" and (name := _name(r["data"], MC_NAMES)):
            mc.setdefault(name, {})[r["scoring"]] = r
        elif r["task"] == "ppl" and (name := _name(r["data"], PPL_NAMES)):
            ppl.setdefault(name, {})[r["scoring"]] = r
        elif r["task"] == "agreement":
            alpha.append(r)
    lines = ["| set | n | acc standard | acc recycle | drop (pts) | acc_norm standard | acc_norm recycle | drop (pts) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    sums = {k: [] for k in ("s", "r", "sn", "rn")}
    for name in MC_NAMES.values():
        if {"standard", "recycle"} - set(mc.get(name, {})):
            continue
        s, r = mc[name]["standard"], mc[name]["recycle"]
        vals = (100 * s["accuracy"], 100 * r["accuracy"], 100 * s["accuracy_norm"], 100 * r["accuracy_norm"])
        for k, v in zip(sums, vals):
            sums[k].append(v)
        lines.append(f"| {name} | {s['n']} | {vals[0]:.2f} | {vals[1]:.2f} | {vals[0] - vals[1]:+.2f} | "
                     f"{vals[2]:.2f} | {vals[3]:.2f} | {vals[2] - vals[3]:+.2f} |")
    if sums["s"]:
        avg = {k: sum(v) / len(v) for k, v in sums.items()}
        lines.append(f"| **average ({len(sums['s'])} sets)** | | **{avg['s']:.2f}** | **{avg['r']:.2f}** | "
                     f"**{avg['s'] - avg['r']:+.2f}** | **{avg['sn']:.2f}** | **{avg['rn']:.2f}** | "
                     f"**{avg['sn'] - avg['rn']:+.2f}** |")
    if ppl:
        lines += ["", "| text | tokens | perplexity standard | perplexity recycle | change |", "|---|---:|---:|---:|---:|"]
        for name in PPL_NAMES.values():
            if {"standard", "recycle"} - set(ppl.get(name, {})):
                continue
            s, r = ppl[name]["standard"], ppl[name]["recycle"]
            lines.append(f"| {name} | {s['n_tokens']:,} | {s['perplexity']:.3f} | "
                         f"{r['perplexity']:.3f} | {100 * (r['perplexity'] / s['perplexity'] - 1):+.1f}% |")
    if alpha:
        lines += ["", "| held-out prompts | prompts | module positions | α |", "|---|---:|---:|---:|"]
        for a in alpha:
            lines.append(f"| {Path(a['prompts_file']).name} | {a['prompts']} | {a['n']} | {a['alpha']:.3f} |")
        n = sum(a["n"] for a in alpha)
        lines.append(f"| **all** | {sum(a['prompts'] for a in alpha)} | {n} | "
                     f"**{sum(a['alpha'] * a['n'] for a in alpha) / n:.3f}** |")
    return "\n".join(lines)


def main() -> None:
    records = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines() if line.strip()]
    print(table(records))


if __name__ == "__main__":
    main()
