"""After distill streams were stopped mid-batch: keep the whole JSON records of every OUT/*/*.jsonl(.partial) file.

A stopped stream may leave a torn last line in its .partial file; that line is dropped and the file renamed to
.jsonl. Lines are split on "\\n" only (a record's text may hold other line separators, such as U+2028).
    python scripts/keep_whole_records.py OUT_DIR
"""

import json
import pathlib
import sys

for p in sorted(pathlib.Path(sys.argv[1]).glob("*/*.jsonl*")):
    good = []
    for line in p.read_text(encoding="utf-8").split("\n"):
        if not line.strip():
            continue
        try:
            json.loads(line)
            good.append(line)
        except json.JSONDecodeError:
            pass
    p.unlink()
    p.with_name(p.name.removesuffix(".partial")).write_text("".join(line + "\n" for line in good), encoding="utf-8")
    print(f"{p.parent.name}/{p.name.removesuffix('.partial')}: {len(good)} records")
