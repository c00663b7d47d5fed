"""PIQA for lm-eval's `custom_dataset`: X.jsonl's {goal, sol1, sol2} with its answers from X-labels.lst beside it."""

from pathlib import Path

import datasets

from recyclegpt.evals.quality import _piqa_labels, read_jsonl


def load(data_dir: str, data_files: dict[str, str], **metadata) -> datasets.DatasetDict:
    """One split per data file (paths relative to data_dir), each record with its 0/1 `label`."""
    splits = {}
    for split, rel in data_files.items():
        path = Path(data_dir).expanduser() / rel
        labels = _piqa_labels(path)  # a clear error for a missing or short labels file
        rows = [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": y}
                for (_, r), y in zip(read_jsonl(path), labels)]
        splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)
