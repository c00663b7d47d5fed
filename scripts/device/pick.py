"""Which switches to turn on, from profiles.sh's step profiles: a switch is on when neither step (standard, recycle)
is slower than the default's by more than 2 us and the two together are at least 3 us faster. Reads FOLDER/switches.tsv
(name, SET entry or "-", profile flags) and FOLDER/prof_NAME.txt; prints shell lines: SET (for env.sh) and FLAGS (for the
profile) of the winners.

    python3 scripts/device/pick.py /tmp/prof > /tmp/winners.sh
"""
import json
import sys
from pathlib import Path


def steps(path: Path):
    for line in reversed(path.read_text().splitlines()):
        if line.startswith("{"):
            parts = {p["part"]: p["replay_ms"] for p in json.loads(line)["parts"]}
            return parts["standard step"], parts["recycle step"]
    return None


folder = Path(sys.argv[1])
base = steps(folder / "prof_default.txt")
sets, flags = [], []
for line in (folder / "switches.tsv").read_text().splitlines():
    name, entry, flag = line.split("\t")
    path = folder / f"prof_{name}.txt"
    got = steps(path) if path.exists() else None
    if base is None or got is None:
        print(f"# {name}: no result")
        continue
    ds, dr = got[0] - base[0], got[1] - base[1]
    on = ds <= 0.002 and dr <= 0.002 and ds + dr <= -0.003
    print(f"# {name}: standard {got[0]:.3f} ({ds:+.3f}), recycle {got[1]:.3f} ({dr:+.3f}) -> {'on' if on else 'off'}")
    if on:
        if entry != "-":  # "-": a profile flag only, no module constant (e.g. --recycle-vocab draft)
            sets.append(entry)
        flags.append(flag)
print(f"export SET='{' '.join(sets)}'")
print(f"FLAGS='{' '.join(flags)}'")
