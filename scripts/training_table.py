"""Print the validation curves of a joint run and its baseline as a Markdown table.

usage: python scripts/training_table.py OUT   (the folder scripts/gutenberg_joint.sh wrote)
"""

import json
import sys
from pathlib import Path


def records(path: Path, split: str) -> dict[int, dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in rows if r["split"] == split}


out = Path(sys.argv[1])
joint, base = records(out / "joint" / "metrics.jsonl", "val"), records(out / "baseline" / "metrics.jsonl", "val")
print("| step | baseline val L_lm | joint val L_lm | joint val L_rec | module top-1 | module = base argmax |")
print("|---:|---:|---:|---:|---:|---:|")
for step in sorted(joint):
    j, b = joint[step], base.get(step, {})
    print(f"| {step} | {b.get('val_lm', float('nan')):.3f} | {j['val_lm']:.3f} | {j['val_rec']:.3f} "
          f"| {j['val_rec_acc']:.3f} | {j['val_rec_agree']:.3f} |")
for name in ("joint", "baseline"):
    train = records(out / name / "metrics.jsonl", "train")
    last = train[max(train)]
    print(f"{name}: {max(train)} steps in {last['elapsed_s']:.0f} s")
