"""Named benchmark prompt suites, built at run time from the shared data folder.

The data folder is never part of the repository: `load_suite` takes its path (the CLI's `--data DIR`), or finds
it through `default_data_dir`. A suite is a list of (category, prompt) pairs with the categories in a fixed order.
Every choice (which records, which book, where a passage starts, the retrieval needle) comes from
`random.Random` generators seeded from the suite name, the category and `seed`, so a given seed always gives the
same list, and one category's sample does not change when another category's count does.

Passages come from the Project Gutenberg novels in `corpora/gutenberg`: a seeded book, a start at a paragraph
boundary after the first 10% of the book (past the front matter), then whole paragraphs (each joined onto one
line) until the target word count, the last one cut at a sentence end, else at a word, when it would run past
the suite's upper bound.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

DATA_ENV = "RECYCLEGPT_DATA"

SUITES: dict[str, str] = {
    "short-instructions": "AlpacaEval instructions, a seeded sample per source set (helpful_base, koala, oasst, "
                          "selfinstruct, vicuna); 8 per set by default",
    "mixed-13": "13 task kinds (coding, math, reasoning, roleplay, writing, stem, humanities, multilingual, qa, "
                "extraction, translation, summarisation, retrieval) from several prompt sets and Gutenberg "
                "passages; 3 per kind by default",
    "long-context": "summarisation and needle-retrieval prompts over Gutenberg passages of 800-3,000 words "
                    "(about 1k-4k tokens); 10 per kind by default",
}

ALPACA_EVAL = "prompts/alpaca_eval/alpaca_eval_instructions.jsonl"
WIZARDLM = "prompts/wizardlm/WizardLM_testset.jsonl"
GSM8K = "prompts/gsm8k/train.jsonl"
CODE_ALPACA = "prompts/code_alpaca/code_alpaca_2k.json"
OPEN_ASSISTANT = "prompts/open_assistant/prompt_lottery_en_250_text.jsonl"
GUTENBERG = "corpora/gutenberg/manifest.json"

EXTRACTION = "List every person and place named in the following passage."
TRANSLATION = "Translate the following passage into French."
SUMMARISATION = "Summarise the following passage in three sentences."
NEEDLE = "The secret code for the {animal} is {code}."
QUESTION = "What is the secret code for the {animal}? Answer with the number only."
ANIMALS = ("otter", "falcon", "badger", "heron", "lynx", "walrus", "gecko", "bison", "panda", "raven", "ibex",
           "marmot")

# mixed-13: WizardLM test-set categories and the Skill values each draws from ("Writting" is the file's spelling)
WIZARDLM_SKILLS = {
    "reasoning": ("Reasoning",),
    "roleplay": ("Roleplay",),
    "writing": ("Writting", "Writing"),
    "stem": ("Physics", "Biology", "Chemistry"),
    "humanities": ("History", "Philosophy", "Literature"),
    "multilingual": ("Multilingual",),
}
MIXED_CATEGORIES = ("coding", "math", "reasoning", "roleplay", "writing", "stem", "humanities", "multilingual",
                    "qa", "extraction", "translation", "summarisation", "retrieval")
# mixed-13 passage lengths in words: (lowest target, upper bound)
MIXED_WORDS = {"extraction": (150, 300), "translation": (60, 120), "summarisation": (600, 1200),
               "retrieval": (1500, 2500)}
LONG_CATEGORIES = ("summarisation", "retrieval")
LONG_WORDS = (800, 3000)

DEFAULT_PER_CATEGORY = {"short-instructions": 8, "mixed-13": 3, "long-context": 10}

SENTENCE_END = re.compile(r"[.!?][\"'’”)\]_]*$")
ABBREVIATION = re.compile(r"^[\"'‘“(_]*(Mr|Mrs|Ms|Dr|St|Jr|Sr|Capt|Col|Gen|Rev|Prof)\.$")


def default_data_dir() -> Path | None:
    """The data folder: $RECYCLEGPT_DATA when set, else ../shared/data seen from the working directory when it
    exists, else None."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    beside = Path.cwd().parent / "shared" / "data"
    return beside if beside.is_dir() else None


def load_suite(name: str, data_dir: str | Path | None = None, *, per_category: int | None = None,
               seed: int = 0) -> list[tuple[str, str]]:
    """(category, prompt) pairs of the suite `name` (a key of SUITES), categories in a fixed order.

    data_dir is the shared data folder (default: `default_data_dir()`). per_category is how many prompts each
    category holds (default: 8, 3 or 10 by suite); a category whose source has fewer records gives them all.
    Sampled records keep their file order within a category. The same seed always gives the same list.
    """
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; known suites: {', '.join(SUITES)}")
    if per_category is None:
        per_category = DEFAULT_PER_CATEGORY[name]
    if per_category < 1:
        raise ValueError(f"per_category must be at least 1, got {per_category}")
    if data_dir is None:
        data_dir = default_data_dir()
        if data_dir is None:
            raise ValueError(f"no data folder for suite {name!r}: pass --data DIR or set {DATA_ENV}")
    data = Path(data_dir)
    if not data.is_dir():
        raise FileNotFoundError(f"data folder {str(data)!r} does not exist (the data folder is given with "
                                f"--data DIR or {DATA_ENV})")
    builder = {"short-instructions": _short_instructions, "mixed-13": _mixed13, "long-context": _long_context}
    return builder[name](data, per_category, lambda category: random.Random(f"{name}/{category}/{seed}"))


# -- suites -------------------------------------------------------------------------------------------------------

Rngs = Callable[[str], random.Random]


def _short_instructions(data: Path, n: int, rng: Rngs) -> list[tuple[str, str]]:
    by_set: dict[str, list[str]] = {}
    for rec in _jsonl(data, ALPACA_EVAL):
        by_set.setdefault(rec["dataset"], []).append(rec["instruction"])
    return [(cat, p) for cat, pool in by_set.items() for p in _sample(pool, n, rng(cat))]


def _mixed13(data: Path, n: int, rng: Rngs) -> list[tuple[str, str]]:
    pools: dict[str, list[str]] = {
        "coding": [r["instruction"] + (f"\n\n{r['input']}" if r["input"].strip() else "")
                   for r in _json(data, CODE_ALPACA)],
        "math": [r["question"] for r in _jsonl(data, GSM8K)],
        "qa": list(_jsonl(data, OPEN_ASSISTANT)),
    }
    wizardlm = list(_jsonl(data, WIZARDLM))
    for cat, skills in WIZARDLM_SKILLS.items():
        pools[cat] = [r["Instruction"] for r in wizardlm if r["Skill"] in skills]
    books = _Books(data)
    out = []
    for cat in MIXED_CATEGORIES:
        r = rng(cat)
        if cat in pools:
            prompts = _sample(pools[cat], n, r)
        else:
            lo, hi = MIXED_WORDS[cat]
            prompts = [_passage_prompt(cat, books, r, r.randint(lo, (lo + hi) // 2), hi) for _ in range(n)]
        out += [(cat, p) for p in prompts]
    return out


def _long_context(data: Path, n: int, rng: Rngs) -> list[tuple[str, str]]:
    books = _Books(data)
    lo, hi = LONG_WORDS
    span = 0.9 * (hi - lo)
    out = []
    for cat in LONG_CATEGORIES:
        r = rng(cat)
        # one target in each of n equal slices of the range's lower 90%; whole paragraphs may run over it
        targets = [int(lo + span * (i + r.random()) / n) for i in range(n)]
        out += [(cat, _passage_prompt(cat, books, r, t, hi)) for t in targets]
    return out


def _passage_prompt(category: str, books: _Books, rng: random.Random, target: int, limit: int) -> str:
    paragraphs = books.passage(rng, target, limit)
    if category == "retrieval":
        animal, code = rng.choice(ANIMALS), rng.randint(10000, 99999)
        paragraphs = _insert_needle(paragraphs, NEEDLE.format(animal=animal, code=code), rng.uniform(0.1, 0.9))
        return "\n\n".join(paragraphs) + "\n\n" + QUESTION.format(animal=animal)
    instruction = {"extraction": EXTRACTION, "translation": TRANSLATION, "summarisation": SUMMARISATION}[category]
    return instruction + "\n\n" + "\n\n".join(paragraphs)


# -- passages -----------------------------------------------------------------------------------------------------


class _Books:
    """The Gutenberg manifest and, once read, each book as a list of one-line paragraphs."""

    def __init__(self, data: Path):
        self.data = data
        self.manifest = _json(data, GUTENBERG)
        self.root = _path(data, GUTENBERG).parent
        self.cache: dict[str, list[str]] = {}

    def paragraphs(self, entry: dict[str, Any]) -> list[str]:
        file = entry["file"]
        if file not in self.cache:
            path = self.root / file
            if not path.is_file():
                raise _missing(path)
            text = path.read_text(encoding="utf-8")
            self.cache[file] = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]
        return self.cache[file]

    def passage(self, rng: random.Random, target: int, limit: int) -> list[str]:
        """Paragraphs of a seeded book from a seeded start after its first 10%: at least `target` words and at
        most `limit`, the last paragraph cut at a sentence end (else a word) when whole it runs past `limit`."""
        for _ in range(20):
            paragraphs = self.paragraphs(rng.choice(self.manifest))
            counts = [len(p.split()) for p in paragraphs]
            total = sum(counts)
            starts, seen = [], 0
            for i, c in enumerate(counts):
                if total * 0.1 <= seen <= total - limit:
                    starts.append(i)
                seen += c
            if starts:
                break
        else:
            raise ValueError(f"the Gutenberg books under {self.root} are too short for {limit}-word passages")
        i = rng.choice(starts)
        out: list[str] = []
        words = 0
        while words < target:
            para, c = paragraphs[i], counts[i]
            if words + c > limit:
                para = _cut(para.split(), target - words, limit - words)
                c = len(para.split())
            out.append(para)
            words += c
            i += 1
        return out


def _cut(words: list[str], least: int, most: int) -> str:
    """The first `most` words, shortened to the last sentence end that keeps at least `least` words."""
    for k in range(most, max(least, 1) - 1, -1):
        if _ends_sentence(words[k - 1]):
            return " ".join(words[:k])
    return " ".join(words[:most])


def _insert_needle(paragraphs: list[str], needle: str, depth: float) -> list[str]:
    """The passage with `needle` as a paragraph of its own at the paragraph boundary nearest `depth` (a fraction
    of its words) among those 10%-90% deep; with none there, a paragraph is split at the nearest sentence end
    (else word) in that band."""
    counts = [len(p.split()) for p in paragraphs]
    total = sum(counts)
    bounds = [(sum(counts[:i]) / total, i) for i in range(1, len(paragraphs))]
    inside = [b for b in bounds if 0.1 <= b[0] <= 0.9]
    if inside:
        i = min(inside, key=lambda b: abs(b[0] - depth))[1]
        return paragraphs[:i] + [needle] + paragraphs[i:]
    for at_sentence_end in (True, False):
        cuts = []  # (depth, paragraph, words before the cut)
        seen = 0
        for i, p in enumerate(paragraphs):
            words = p.split()
            cuts += [((seen + k) / total, i, k) for k in range(1, len(words))
                     if 0.1 <= (seen + k) / total <= 0.9 and (_ends_sentence(words[k - 1]) or not at_sentence_end)]
            seen += len(words)
        if cuts:
            _, i, k = min(cuts, key=lambda c: abs(c[0] - depth))
            words = paragraphs[i].split()
            return paragraphs[:i] + [" ".join(words[:k]), needle, " ".join(words[k:])] + paragraphs[i + 1:]
    return paragraphs + [needle]  # a passage too short to hold a word 10%-90% deep


def _ends_sentence(word: str) -> bool:
    return bool(SENTENCE_END.search(word)) and not ABBREVIATION.match(word)


# -- files --------------------------------------------------------------------------------------------------------


def _sample(pool: list[str], n: int, rng: random.Random) -> list[str]:
    """n records of pool (all of them when it holds fewer), a seeded choice kept in file order."""
    if n >= len(pool):
        return list(pool)
    return [pool[i] for i in sorted(rng.sample(range(len(pool)), n))]


def _missing(path: Path) -> FileNotFoundError:
    return FileNotFoundError(f"{path} not found: the data folder (given with --data DIR or {DATA_ENV}) lacks it")


def _path(data: Path, rel: str) -> Path:
    path = data / rel
    if not path.is_file():
        raise _missing(path)
    return path


def _json(data: Path, rel: str) -> Any:
    return json.loads(_path(data, rel).read_text(encoding="utf-8"))


def _jsonl(data: Path, rel: str) -> list[Any]:
    with open(_path(data, rel), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
