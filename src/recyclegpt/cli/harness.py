"""`recyclegpt lm-eval ARGS...`: lm-evaluation-harness's own command line with the `recyclegpt` model registered.

lm-eval's command finds only the models it ships, so this command imports the adapter (evals/lm_eval_adapter.py,
which registers `recyclegpt`) and runs lm-eval's command line on ARGS, unchanged but for three additions:
`--model recyclegpt` unless ARGS name a model (or a --config), and `--include_path` to a temporary copy of the
packaged recyclegpt_* tasks whose data folder is `--data DIR` (taken out of ARGS; default: $RECYCLEGPT_DATA, else
../shared/data). An --include_path of ARGS is copied into that folder beside them.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

HELP = """\
recyclegpt lm-eval [--data DIR] ARGS...

Runs lm-evaluation-harness's command line (`lm-eval ARGS...`) with the `recyclegpt` model registered and the
offline recyclegpt_* tasks included: recyclegpt_arc_easy, recyclegpt_arc_challenge, recyclegpt_boolq,
recyclegpt_openbookqa, recyclegpt_piqa, recyclegpt_sciq (all six: the tag recyclegpt_mc), read from DIR/eval/
(--data DIR; default: $RECYCLEGPT_DATA, else ../shared/data). --model defaults to recyclegpt, whose --model_args
are model=NAME|PATH, recycle=default|none|PATH|NAME, scoring=standard|recycle|module, batch_size=N, device=D,
dtype=float32|bfloat16|float16, recycle_vocab=full|draft, strategy=NAME (generate_until), max_gen_toks=N.
Example:
  recyclegpt lm-eval --tasks recyclegpt_arc_easy --model_args scoring=recycle --batch_size 16 --limit 20

lm-eval's own help follows.
"""


def cmd_lm_eval(args: argparse.Namespace) -> None:
    """lm-evaluation-harness's command line with the `recyclegpt` model and the offline recyclegpt_* tasks."""
    from .main import UsageError

    argv = list(args.args)
    data, argv = _take_option(argv, "--data")
    want_help = not argv or any(a in ("-h", "--help") for a in argv)
    if want_help:
        print(HELP)
    try:
        from lm_eval.__main__ import cli_evaluate

        from ..evals.lm_eval_adapter import write_tasks
    except ImportError as e:
        raise UsageError(f"lm-eval needs lm-evaluation-harness: pip install 'recyclegpt[lm-eval]' ({e})") from None
    from ..evals.suites import default_data_dir

    if want_help:
        argv = ["run", "-h"] if argv in ([], ["-h"], ["--help"]) else argv
    data_dir = Path(data) if data is not None else default_data_dir() or Path("../shared/data")
    uses_ours = any("recyclegpt_" in a for a in argv)
    if uses_ours and not (data_dir / "eval").is_dir():
        raise UsageError(f"the recyclegpt_* tasks read DIR/eval/ of the shared data folder; {data_dir}/eval is not "
                         f"there: pass --data DIR (or set $RECYCLEGPT_DATA)")
    with tempfile.TemporaryDirectory(prefix="recyclegpt-lm-eval-") as tmp:
        include, argv = _take_option(argv, "--include_path")
        if (data_dir / "eval").is_dir():
            write_tasks(data_dir, tmp)
        if include is not None:  # lm-eval takes one include path: the caller's tasks join ours
            src = Path(include)
            if src.is_dir():
                shutil.copytree(src, Path(tmp) / "include", dirs_exist_ok=True)
            else:
                (Path(tmp) / "include").mkdir()
                shutil.copy(src, Path(tmp) / "include" / src.name)
        first = argv[0] if argv else ""
        if first not in ("ls", "validate") and not want_help and not any(
                a in ("--model", "-M", "--config", "-C") or a.startswith(("--model=", "--config=")) for a in argv):
            argv = ["--model", "recyclegpt", *argv] if first != "run" else ["run", "--model", "recyclegpt", *argv[1:]]
        argv += ["--include_path", tmp]
        saved = sys.argv
        sys.argv = ["lm-eval", *argv]
        try:
            cli_evaluate()
        finally:
            sys.argv = saved


def _take_option(argv: list[str], flag: str) -> tuple[str | None, list[str]]:
    """(the value of `flag VALUE` or `flag=VALUE` in argv, argv without it); the last one counts."""
    value, rest, i = None, [], 0
    while i < len(argv):
        a = argv[i]
        if a == flag and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
            continue
        if a.startswith(flag + "="):
            value = a[len(flag) + 1:]
        else:
            rest.append(a)
        i += 1
    return value, rest


def add_lm_eval_parser(sub) -> argparse.ArgumentParser:
    """Add `lm-eval` to argparse subparsers `sub`: every argument after it is lm-eval's, passed through as given
    (no '-' prefix characters: argparse reads none of them as its own options)."""
    p = sub.add_parser("lm-eval", help=cmd_lm_eval.__doc__, description=HELP, prefix_chars="+", add_help=False,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="*", help="lm-eval's arguments")
    p.set_defaults(func=cmd_lm_eval)
    return p
