"""Benchmark prompt suites: categories and counts, determinism, passage lengths, the retrieval needle (on the
shared data folder when it is present), and the errors for an unknown suite or a missing data folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from recyclegpt.evals import suites
from recyclegpt.evals.suites import SUITES, default_data_dir, load_suite

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

NEEDLE = re.compile(r"^The secret code for the (\w+) is (\d{5})\.$")
QUESTION = re.compile(r"What is the secret code for the (\w+)\? Answer with the number only\.$")
INSTRUCTIONS = {"extraction": suites.EXTRACTION, "translation": suites.TRANSLATION,
                "summarisation": suites.SUMMARISATION}


@pytest.fixture(scope="module")
def data() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"{DATA} not present (the shared data folder sits beside the repository)")
    return DATA


def categories(suite: list[tuple[str, str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for cat, _ in suite:
        counts[cat] = counts.get(cat, 0) + 1
    return counts


def passage_words(category: str, prompt: str) -> int:
    """Words of the passage in a passage prompt, without its instruction, needle or question."""
    if category == "retrieval":
        paragraphs = prompt.split("\n\n")
        assert QUESTION.match(paragraphs[-1])
        paragraphs = [p for p in paragraphs[:-1] if not NEEDLE.match(p)]
    else:
        instruction, _, passage = prompt.partition("\n\n")
        assert instruction == INSTRUCTIONS[category]
        paragraphs = passage.split("\n\n")
    return sum(len(p.split()) for p in paragraphs)


def check_retrieval(prompt: str) -> None:
    paragraphs = prompt.split("\n\n")
    question = QUESTION.match(paragraphs[-1])
    needles = [(i, NEEDLE.match(p)) for i, p in enumerate(paragraphs) if NEEDLE.match(p)]
    assert question and len(needles) == 1, prompt[-300:]
    i, needle = needles[0]
    assert needle.group(1) == question.group(1) and needle.group(1) in suites.ANIMALS
    assert 0 < i < len(paragraphs) - 1  # inside the passage, with text before and after
    before = sum(len(p.split()) for p in paragraphs[:i])
    total = passage_words("retrieval", prompt)
    assert 0.05 <= before / total <= 0.95


# -- with the shared data ---------------------------------------------------------------------------------------


@pytest.mark.shared_data
def test_short_instructions(data):
    suite = load_suite("short-instructions", data)
    assert categories(suite) == {c: 8 for c in ("helpful_base", "koala", "oasst", "selfinstruct", "vicuna")}
    with open(data / suites.ALPACA_EVAL, encoding="utf-8") as f:
        order = [json.loads(line)["instruction"] for line in f if line.strip()]
    for cat in ("koala", "vicuna"):
        picked = [order.index(p) for c, p in suite if c == cat]
        assert picked == sorted(picked)  # a sample in file order
    assert categories(load_suite("short-instructions", data, per_category=2)) == {
        c: 2 for c in ("helpful_base", "koala", "oasst", "selfinstruct", "vicuna")}


@pytest.mark.shared_data
def test_mixed13(data):
    suite = load_suite("mixed-13", data)
    assert list(categories(suite)) == list(suites.MIXED_CATEGORIES)
    assert set(categories(suite).values()) == {3} and len(suite) == 39
    assert all(p.strip() for _, p in suite)
    for cat, prompt in suite:
        if cat in suites.MIXED_WORDS:
            lo, hi = suites.MIXED_WORDS[cat]
            assert lo <= passage_words(cat, prompt) <= hi, (cat, passage_words(cat, prompt))
        if cat == "retrieval":
            check_retrieval(prompt)
    coding = [p for c, p in load_suite("mixed-13", data, per_category=12, seed=1) if c == "coding"]
    assert any("\n\n" in p for p in coding)  # an input appended after a blank line


@pytest.mark.shared_data
def test_mixed13_small_pools_give_all_they_hold(data):
    counts = categories(load_suite("mixed-13", data, per_category=8))
    assert counts["roleplay"] == 6 and counts["multilingual"] == 7 and counts["math"] == 8


@pytest.mark.shared_data
def test_long_context(data):
    suite = load_suite("long-context", data)
    assert categories(suite) == {"summarisation": 10, "retrieval": 10}
    lo, hi = suites.LONG_WORDS
    for cat in ("summarisation", "retrieval"):
        words = [passage_words(c, p) for c, p in suite if c == cat]
        assert all(lo <= w <= hi for w in words), words
        assert min(words) < 1400 and max(words) > 2400  # spread across the range
    for cat, prompt in suite:
        if cat == "retrieval":
            check_retrieval(prompt)
        else:
            assert prompt.startswith(suites.SUMMARISATION + "\n\n")


@pytest.mark.shared_data
@pytest.mark.parametrize("name", list(SUITES))
def test_deterministic(data, name):
    a = load_suite(name, data, per_category=2, seed=3)
    assert a == load_suite(name, data, per_category=2, seed=3)
    assert a != load_suite(name, data, per_category=2, seed=4)


@pytest.mark.shared_data
def test_default_data_dir_finds_shared_beside_the_working_directory(data, monkeypatch):
    monkeypatch.delenv(suites.DATA_ENV, raising=False)
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the repository root, beside shared/
    assert default_data_dir() == data
    assert categories(load_suite("short-instructions", per_category=1)) == {
        c: 1 for c in ("helpful_base", "koala", "oasst", "selfinstruct", "vicuna")}


# -- without data -------------------------------------------------------------------------------------------------


def test_unknown_suite():
    with pytest.raises(ValueError, match="unknown suite 'nope'.*short-instructions, mixed-13, long-context"):
        load_suite("nope", "/nowhere")


def test_no_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv(suites.DATA_ENV, raising=False)
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")
    assert default_data_dir() is None
    with pytest.raises(ValueError, match=r"pass --data DIR or set RECYCLEGPT_DATA"):
        load_suite("mixed-13")


def test_default_data_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv(suites.DATA_ENV, str(tmp_path))
    assert default_data_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match=r"alpaca_eval_instructions\.jsonl.*--data"):
        load_suite("short-instructions")


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"code_alpaca_2k\.json not found.*--data DIR"):
        load_suite("mixed-13", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"gutenberg/manifest\.json not found.*--data DIR"):
        load_suite("long-context", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"does not exist.*--data DIR"):
        load_suite("long-context", tmp_path / "absent")
    with pytest.raises(ValueError, match="per_category must be at least 1"):
        load_suite("long-context", tmp_path, per_category=0)


def test_needle_in_one_long_paragraph():
    paragraph = " ".join(f"Sentence number {i} ends here." for i in range(40))
    out = suites._insert_needle([paragraph], "NEEDLE.", 0.5)
    assert len(out) == 3 and out[1] == "NEEDLE." and out[0].endswith(".")
    assert " ".join(out[0::2]) == paragraph
    assert 0.4 <= len(out[0].split()) / len(paragraph.split()) <= 0.6
