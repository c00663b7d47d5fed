"""The scripts under scripts/ (data recipes, tables) parse, and the small Python ones work on tiny inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.mark.parametrize("path", sorted(SCRIPTS.glob("*.sh")), ids=lambda p: p.name)
def test_shell_scripts_parse(path):
    subprocess.run(["bash", "-n", str(path)], check=True)


@pytest.mark.parametrize("path", sorted(SCRIPTS.glob("*.py")), ids=lambda p: p.name)
def test_python_scripts_compile(path):
    compile(path.read_text(encoding="utf-8"), str(path), "exec")


def test_book_prompts_and_exclusion(tmp_path):
    books = tmp_path / "gutenberg"
    (books / "books").mkdir(parents=True)
    paras = [f"Paragraph {i} " + "word " * 30 for i in range(40)]
    (books / "books" / "pg1.txt").write_text("\n\n".join(paras))
    (books / "manifest.json").write_text(json.dumps([{"file": "books/pg1.txt", "pg_id": 1}]))
    run = [sys.executable, str(SCRIPTS / "book_prompts.py"), str(books), "--min-chars", "300", "--max-chars", "800"]
    subprocess.run(run + ["--n", "3", "--out", str(tmp_path / "a.jsonl")], check=True, capture_output=True)
    first = [json.loads(line)["prompt"] for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    subprocess.run(run + ["--n", "100", "--seed", "1", "--exclude", str(tmp_path / "a.jsonl"),
                          "--out", str(tmp_path / "b.jsonl")], check=True, capture_output=True)
    second = [json.loads(line)["prompt"] for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert len(first) == 3 and second and not set(first) & set(second)

    def used(prompts):
        return {p for p in paras for q in prompts if p.strip() in q}

    assert not used(first) & used(second)  # no paragraph appears in both rounds


def test_paper_table_formats_results():
    sys.path.insert(0, str(SCRIPTS))
    try:
        from paper_table import table
    finally:
        sys.path.pop(0)
    recs = [{"task": "mc", "scoring": s, "data": "x/eval/piqa/valid.jsonl", "n": 10, "accuracy": a,
             "accuracy_norm": a} for s, a in (("standard", 0.6), ("recycle", 0.5))]
    recs += [{"task": "agreement", "prompts_file": "p/WizardLM_testset.jsonl", "prompts": 2, "n": 40, "alpha": 0.5}]
    out = table(recs)
    assert "| PIQA | 10 | 60.00 | 50.00 | +10.00 |" in out and "**0.500**" in out


def test_self_instruct_meta_prompts_and_extraction():
    sys.path.insert(0, str(SCRIPTS))
    try:
        from self_instruct_prompts import SHOTS, extract, meta_prompts
    finally:
        sys.path.pop(0)
    seeds = [f"Seed task number {i}." for i in range(20)]
    prompts = meta_prompts(seeds, 3, seed=0)
    assert prompts == meta_prompts(seeds, 3, seed=0) and len(set(prompts)) == 3
    assert all(p.endswith(f"\n{SHOTS + 1}.") and p.count("Seed task") == SHOTS for p in prompts)
    made = [" Write a poem about the sea.\n8. Something else", "Write a poem about the sea.", " Seed task number 3.",
            " short", " 9. Explain how rain forms, step by step."]
    assert extract(made, seeds) == ["Write a poem about the sea.", "Explain how rain forms, step by step."]


@pytest.mark.slow
def test_gpu_step_profile_runs_every_part():
    """The GPU profile's parts (steps, verified rounds) run on a tiny model; on the CPU it times them without graphs."""
    out = subprocess.run([sys.executable, str(SCRIPTS / "gpu_step_profile.py"), "--preset", "tiny", "--recycle-layers",
                          "1", "--reps", "2", "--prompt-len", "40"], check=True, capture_output=True, text=True).stdout
    report = json.loads(out.strip().splitlines()[-1])
    parts = [p["part"] for p in report["parts"]]
    assert parts[:5] == ["full, 1 token", "full, 2 tokens", "module, 2 slots", "standard step", "recycle step"]
    assert any(p.startswith("tree round") for p in parts) and report["recycle_step_bound"] > 0
    assert all(p["replay_ms"] > 0 and p["kernels"] > 0 for p in report["parts"])  # CPU: operators, not kernels


def test_truncate_module_keeps_the_first_layers(tmp_path):
    import safetensors.torch
    import torch

    from recyclegpt.config import PRESETS, RecycleConfig
    from recyclegpt.loading.checkpoint import load_module, save_checkpoint
    from recyclegpt.models import RecycleModel

    torch.manual_seed(0)
    model = RecycleModel.build(PRESETS["tiny"], RecycleConfig(n_layer=3)).eval()
    src = save_checkpoint(tmp_path / "l3", model, base_ref="tiny-base")
    run = [sys.executable, str(SCRIPTS / "truncate_module.py"), str(src), str(tmp_path / "l1")]
    subprocess.run(run + ["--layers", "1"], check=True, capture_output=True)
    cut = load_module(tmp_path / "l1", model.base)
    assert cut.cfg.n_layer == 1 and len(cut.layers) == 1
    want = {k: v for k, v in safetensors.torch.load_file(str(src / "module.safetensors")).items()
            if not k.startswith(("layers.1.", "layers.2."))}
    got = safetensors.torch.load_file(str(tmp_path / "l1" / "module.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    bad = subprocess.run(run + ["--layers", "3"], capture_output=True, text=True)
    assert bad.returncode != 0 and "between 1 and 2" in bad.stderr


def test_benchmarks_md_is_what_its_records_render():
    """BENCHMARKS.md is generated: every table comes from a record in benchmarks/records (date, commit, hardware,
    command, report), and the file matches what scripts/render_benchmarks.py makes of them."""
    done = subprocess.run([sys.executable, str(SCRIPTS / "render_benchmarks.py"), "--check"], check=False)
    assert done.returncode == 0


def test_render_benchmarks_names_a_record_without_its_command(tmp_path):
    sys.path.insert(0, str(SCRIPTS))
    try:
        import render_benchmarks
    finally:
        sys.path.remove(str(SCRIPTS))
    (tmp_path / "a.json").write_text(json.dumps({"title": "t", "date": "d", "commit": "c", "hardware": "h",
                                                 "kind": "bench", "report": {}}))
    with pytest.raises(ValueError, match="a.json: record lacks command"):
        render_benchmarks.load(tmp_path)


def test_render_benchmarks_folds_an_engine_whose_strategies_all_agree():
    sys.path.insert(0, str(SCRIPTS))
    try:
        import render_benchmarks
    finally:
        sys.path.remove(str(SCRIPTS))

    def row(engine, strategy, identical, mismatched=0):
        return {"engine": engine, "strategy": strategy, "requests": 4, "identical": identical, "tokens": 10,
                "mismatched_rows": mismatched, "near_ties": mismatched, "first_difference": 3 if mismatched else None,
                "largest_margin": 0.125 if mismatched else None}

    names = ("standard", "recycle", "recycle-verified", "speculative", "tree")
    rep = {"rows": [row("graphs", s, 4) for s in names] + [row("static", s, 3 if s == "tree" else 4, int(s == "tree"))
                                                           for s in names], "check": "exact", "dtype": "float32",
           "device": "cuda", "prompt_lengths": [2, 5, 9]}
    graphs, static = render_benchmarks.differential_cells(rep)
    assert graphs == ["graphs", "all five", "4", "4 each", "50", "0", "-", "-", "-"]
    assert static == ["static", "standard, recycle, recycle-verified, speculative / tree", "4", "4 each / 3",
                      "40 / 10", "0 / 1", "- / 1", "- / 3", "- / 0.1250"]
    # one table row per record and engine; a column that is "-" in every row is left out
    rec = {"title": "t", "date": "d", "commit": "c", "hardware": "h", "command": "cmd", "kind": "differential",
           "report": {**rep, "rows": rep["rows"][:5]}}
    lines = render_benchmarks.render_differential([rec])
    table = [line for line in lines if line.startswith("| ")]
    assert table[0] == "| run | device, dtype | engine | strategy | requests | identical | tokens | rows that differ |"
    assert table[1:] == ["| A | cuda, float32 | graphs | all five | 4 | 4 each | 50 | 0 |"]
    assert "cmd" in lines and any(line.startswith("A: d, h") for line in lines)
