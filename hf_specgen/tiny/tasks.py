"""The tiny LM's evaluation forms as an lm-evaluation-harness task directory over local JSONL.

lm-eval reads task YAMLs from `TaskManager(include_path=...)`; their data files must be absolute
paths, so the directory is written on first use (deterministically, from the generators) rather
than shipped. The MedMCQA task renders its prompt through `hf_specgen.data.medmcqa`, the same
code that formats the training examples.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..eval.lm_tasks import ACCURACY, cached_task_dir, write_medmcqa_task, write_task
from .lm_data import GENERAL_FAMILIES, general_eval, medmcqa


TASK_PREFIX = "tiny_"
GENERAL_TASKS = tuple(TASK_PREFIX + family for family in GENERAL_FAMILIES)
MEDMCQA_TASK = "tiny_medmcqa"

_MULTIPLE_CHOICE = {
    "output_type": "multiple_choice",
    "doc_to_text": "context",
    "doc_to_choice": "choices",
    "doc_to_target": "gold",
    "metric_list": ACCURACY,
}
_GENERATION = {
    "output_type": "generate_until",
    "doc_to_text": "prompt",
    "doc_to_target": "target",
    "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": 24},
    "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}],
    "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
}


def _write_jsonl(path: Path, rows) -> None:
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _local(location: Path, files: dict[str, str]) -> dict:
    """lm-eval's dataset fields for local JSONL files (absolute paths), one per split."""
    splits = {"test_split": "test", **({"validation_split": "validation"} if "validation" in files else {})}
    return {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {s: str(location / f) for s, f in files.items()}},
        **splits,
    }


def write_tasks(directory: str | Path, seed: int = 0, location: str | Path | None = None) -> Path:
    """Write the general tasks (`tiny_<family>`) and `tiny_medmcqa` (validation and test splits).

    `location` is where the files will be read from, when they are written elsewhere first.

    Args:
        directory: where to write the task YAMLs and their data.
        seed: the seed of the generated data.
        location: the directory the YAMLs point their data at; None: `directory`.

    Returns:
        `directory`.
    """
    directory = Path(directory)
    location = Path(location or directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    for family, rows in general_eval(seed).items():
        name = TASK_PREFIX + family
        _write_jsonl(directory / f"{name}.jsonl", rows)
        spec = _GENERATION if family == "instructions" else _MULTIPLE_CHOICE
        write_task(directory, name, _local(location, {"test": f"{name}.jsonl"}), spec)
    domain = medmcqa(seed)
    files = {split: f"{MEDMCQA_TASK}_{split}.jsonl" for split in ("validation", "test")}
    for split, file in files.items():
        _write_jsonl(directory / file, domain[split])
    write_medmcqa_task(directory, MEDMCQA_TASK, _local(location, files))
    return directory


def task_dir(directory: str | Path | None = None) -> Path:
    """The task directory for `TaskManager(include_path=...)`, written once per package version
    under `$HF_SPECGEN_HOME` (default `~/.cache/hf_specgen`) unless `directory` is given.

    Args:
        directory: where to write the tasks; None: the cache under `$HF_SPECGEN_HOME`.

    Returns:
        The task directory.
    """
    if directory is not None:
        return write_tasks(directory)
    return cached_task_dir("tiny_tasks", lambda staging, final: write_tasks(staging, location=final))
