"""lm-eval task YAMLs that hf_specgen writes: MedMCQA with the training prompt, and the cached
directories `TaskManager(include_path=...)` reads them from.

The MedMCQA task renders its prompt through `hf_specgen.data.medmcqa` (a `!function` module
written next to the YAML), so that evaluation shows the model exactly the prompt it was trained
on, for the Hub data set as for the tiny foundations' local copy.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from ..atomic import atomic_directory
from ..version import __version__


MEDMCQA_HUB_ID = "openlifescienceai/medmcqa"


class _Function(str):
    """A `!function module.name` reference, which lm-eval resolves next to the YAML file."""


class _TaskDumper(yaml.SafeDumper):
    pass


_TaskDumper.add_representer(_Function, lambda dumper, value: dumper.represent_scalar("!function", str(value)))

ACCURACY = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
_MEDMCQA = {
    "output_type": "multiple_choice",
    "doc_to_text": _Function("medmcqa_prompt.doc_to_text"),
    "doc_to_choice": _Function("medmcqa_prompt.doc_to_choice"),
    "doc_to_target": "cop",
    "metric_list": ACCURACY,
}
_PROMPT_MODULE = "from hf_specgen.data.medmcqa import doc_to_choice, doc_to_text  # noqa: F401\n"


def write_task(directory: Path, name: str, dataset: dict[str, Any], spec: dict[str, Any]) -> Path:
    """`<directory>/<name>.yaml`: `dataset` (path, kwargs, splits) followed by the task `spec`."""
    path = directory / f"{name}.yaml"
    path.write_text(yaml.dump({"task": name, **dataset, **spec}, Dumper=_TaskDumper, sort_keys=False))
    return path


def write_medmcqa_task(directory: Path, name: str, dataset: dict[str, Any]) -> Path:
    """A MedMCQA task (log-likelihood of each option's text after the training prompt)."""
    (directory / "medmcqa_prompt.py").write_text(_PROMPT_MODULE)
    return write_task(directory, name, dataset, _MEDMCQA)


def _cache_root() -> Path:
    return Path(os.environ.get("HF_SPECGEN_HOME", Path.home() / ".cache" / "hf_specgen"))


def cached_task_dir(name: str, write: Callable[[Path, Path], Any]) -> Path:
    """A task directory written once per package version under `$HF_SPECGEN_HOME` (default
    `~/.cache/hf_specgen`): `write(staging, final)` fills a staging directory, whose files must
    name `final`, the directory it is then renamed to (`atomic_directory`: DDP ranks may race, the
    first one to finish wins)."""
    target = _cache_root() / f"{name}-{__version__}"
    if not target.is_dir():
        with atomic_directory(target, replace=False, what="the task") as staging:
            write(staging, target)
    return target


def medmcqa_task_dir() -> Path:
    """`specgen_medmcqa` over the Hub's MedMCQA validation split (its test split has no answers)."""
    dataset = {"dataset_path": MEDMCQA_HUB_ID, "validation_split": "validation"}
    return cached_task_dir("medmcqa_task", lambda staging, _: write_medmcqa_task(staging, "specgen_medmcqa", dataset))
