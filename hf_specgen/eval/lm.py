"""Language-model evaluation through lm-evaluation-harness, on an in-memory model or a path.

lm-eval does the scoring (log-likelihood multiple choice, generation with filters); this module
only builds its model wrapper and task manager and turns its nested results into one tidy
`TaskScore` per task.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager


@dataclass(frozen=True)
class TaskScore:
    """One task's primary metric (the one asked for, else the first its YAML lists), as lm-eval reports it.

    Args:
        task: the lm-eval task name.
        metric: the metric's name, e.g. `"acc"`.
        value: the metric's value.
        stderr: its standard error, when lm-eval reports one.
        n: the number of examples scored.
    """

    task: str
    metric: str
    value: float
    stderr: float | None
    n: int


@functools.lru_cache(maxsize=8)
def _task_manager(include_path: tuple[str, ...]) -> TaskManager:
    """One task index per set of task directories: indexing lm-eval's registry takes seconds, and a
    sweep evaluates many models on the same tasks."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_path) or None, verbosity="ERROR")


def _primary_score(task: str, output: dict, metric: str | None = None) -> TaskScore:
    """`task`'s `metric` in lm-eval's `output` (by default the first its configuration lists: a
    Python task may list none)."""
    if metric is None:
        metric_list = output["configs"][task].get("metric_list")
        if not metric_list:
            raise ValueError(f"task {task!r} lists no metrics in its configuration: name the metric to score")
        metric = metric_list[0]["metric"]
    metrics = output["results"][task]
    for key, value in metrics.items():
        name, _, filter_name = key.partition(",")
        if name == metric:
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            n = int(output["n-samples"][task]["effective"])
            return TaskScore(
                task, metric, float(value), float(stderr) if isinstance(stderr, (int, float)) else None, n
            )
    raise ValueError(f"lm-eval returned no {metric!r} for task {task!r}: {sorted(metrics)}")


def evaluate_lm(
    model: PreTrainedModel | str | Path,
    tasks: Sequence[str],
    tokenizer: PreTrainedTokenizerBase | None = None,
    include_path: str | Path | Sequence[str | Path] | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int | str = 32,
    device: str | None = None,
    metrics: Mapping[str, str] | None = None,
) -> dict[str, TaskScore]:
    """Score `model` on `tasks` (lm-eval registry names, or tasks found under `include_path`,
    one directory or several); `metrics` names the metric scored for some tasks (e.g. DROP's
    `f1`), the others report the first their YAML lists.

    An in-memory model is evaluated as it is (no save and reload), e.g. a WiSE-FT merge from
    `iter_wise_ft`; a path or Hub id is loaded by lm-eval itself (which also splits the data
    across the processes of an `accelerate launch`: then the other processes get `{}`).

    Args:
        model: an in-memory model, or a directory or Hub id.
        tasks: the task names.
        tokenizer: the in-memory model's tokenizer (required for one; a path loads its own).
        include_path: directories of task YAMLs beside lm-eval's registry.
        num_fewshot: few-shot examples per prompt (default: each task's own).
        limit: examples per task at most (lm-eval's `limit`: a float below 1 is a share of each task).
        batch_size: lm-eval's batch size (`"auto"` too).
        device: the device a path or Hub id is loaded on (default: lm-eval's).
        metrics: `{task: metric}` for tasks not scored by their first metric.

    Returns:
        Each task's `TaskScore`, by task name.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    unknown = sorted(set(metrics or ()) - set(tasks))
    if unknown:
        raise ValueError(f"evaluate_lm: metrics named for task(s) {unknown} that are not evaluated: {list(tasks)}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(model, PreTrainedModel):
        if tokenizer is None:
            raise ValueError("evaluate_lm: an in-memory model needs its `tokenizer`")
        model = model.to(device)
    lm = HFLM(
        pretrained=model if isinstance(model, PreTrainedModel) else str(model),
        tokenizer=tokenizer,
        batch_size=batch_size,
        device=device,
    )
    if isinstance(include_path, (str, Path)):
        include_path = [include_path]
    manager = _task_manager(tuple(str(p) for p in include_path or ()))
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    output = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        verbosity="ERROR",
    )
    if output is None:  # lm-eval reports on the main process only of a multi-process run
        return {}
    return {task: _primary_score(task, output, (metrics or {}).get(task)) for task in tasks}
