"""The tiny LM's evaluation forms as an lm-evaluation-harness task directory over local JSONL.

lm-eval reads task YAMLs from `TaskManager(include_path=...)`; their data files must be absolute
paths, so the directory is written on first use (deterministically, from the generators) rather
than shipped. The MedMCQA task renders its prompt through `hf_specgen.data.medmcqa`, the same
code that formats the training examples.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from .. import __version__
from .lm_data import GENERAL_FAMILIES, general_eval, medmcqa

TASK_PREFIX = "tiny_"
GENERAL_TASKS = tuple(TASK_PREFIX + family for family in GENERAL_FAMILIES)
MEDMCQA_TASK = "tiny_medmcqa"

_MULTIPLE_CHOICE = {
    "output_type": "multiple_choice",
    "doc_to_text": "context",
    "doc_to_choice": "choices",
    "doc_to_target": "gold",
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
}
_GENERATION = {
    "output_type": "generate_until",
    "doc_to_text": "prompt",
    "doc_to_target": "target",
    "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": 24},
    "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}],
    "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
}


class _Function(str):
    """A `!function module.name` reference, which lm-eval resolves next to the YAML file."""


class _TaskDumper(yaml.SafeDumper):
    pass


_TaskDumper.add_representer(_Function, lambda dumper, value: dumper.represent_scalar("!function", str(value)))

_MEDMCQA = {
    "output_type": "multiple_choice",
    "doc_to_text": _Function("medmcqa_prompt.doc_to_text"),
    "doc_to_choice": _Function("medmcqa_prompt.doc_to_choice"),
    "doc_to_target": "cop",
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
}
_PROMPT_MODULE = "from hf_specgen.data.medmcqa import doc_to_choice, doc_to_text  # noqa: F401\n"


def _cache_root() -> Path:
    return Path(os.environ.get("HF_SPECGEN_HOME", Path.home() / ".cache" / "hf_specgen"))


def _write_jsonl(path: Path, rows) -> None:
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _write_task(directory: Path, location: Path, name: str, splits: dict[str, str], spec: dict) -> None:
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {split: str(location / file) for split, file in splits.items()}},
        "test_split": "test",
        **({"validation_split": "validation"} if "validation" in splits else {}),
        **spec,
    }
    (directory / f"{name}.yaml").write_text(yaml.dump(config, Dumper=_TaskDumper, sort_keys=False))


def write_tasks(directory: str | Path, seed: int = 0, location: str | Path | None = None) -> Path:
    """Write the general tasks (`tiny_<family>`) and `tiny_medmcqa` (validation and test splits).

    `location` is where the files will be read from, when they are written elsewhere first."""
    directory = Path(directory)
    location = Path(location or directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    for family, rows in general_eval(seed).items():
        name = TASK_PREFIX + family
        _write_jsonl(directory / f"{name}.jsonl", rows)
        spec = _GENERATION if family == "instructions" else _MULTIPLE_CHOICE
        _write_task(directory, location, name, {"test": f"{name}.jsonl"}, spec)
    domain = medmcqa(seed)
    files = {split: f"{MEDMCQA_TASK}_{split}.jsonl" for split in ("validation", "test")}
    for split, file in files.items():
        _write_jsonl(directory / file, domain[split])
    (directory / "medmcqa_prompt.py").write_text(_PROMPT_MODULE)
    _write_task(directory, location, MEDMCQA_TASK, files, _MEDMCQA)
    return directory


def task_dir(directory: str | Path | None = None) -> Path:
    """The task directory for `TaskManager(include_path=...)`, written once per package version
    under `$HF_SPECGEN_HOME` (default `~/.cache/hf_specgen`) unless `directory` is given."""
    if directory is not None:
        return write_tasks(directory)
    target = _cache_root() / f"tiny_tasks-{__version__}"
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tiny_tasks-"))
        write_tasks(staging, location=target)
        try:
            staging.rename(target)
        except OSError:  # another process (e.g. a DDP rank) finished first
            shutil.rmtree(staging)
    return target
