"""Named evaluation suites: which tasks measure speciality and which generality, so that every
method and every alpha is scored the same way (`specgen eval --suite ...`).

LM suites are lm-eval tasks (the registry's for real runs; local task directories for MedMCQA
with the training prompt and for the tiny foundations), each scored on [0, 1] since the report
averages a side's scores: a suite names the metric of a task whose first is not the one wanted,
and the factor that brings a 0-100 score (BLEU, SQuAD's F1) to [0, 1]. A CLIP suite scores a CLIP
directory with its own function (`tiny_clip`: zero-shot on the tiny image domains, the fine-tuning
domain the speciality, the others the shifts).

The suites live in two registries, `LM_SUITES` and `CLIP_SUITES`; `register_suite` adds one. The
tiny foundations register theirs (`hf_specgen.tiny.suites`, a provider the registries import on the
first lookup), so this package does not import them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..registry import Registry
from .lm_tasks import medmcqa_task_dir


if TYPE_CHECKING:  # the CLI reads the suite names without loading the model stack
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .lm import TaskScore

Role = Literal["speciality", "generality"]
Scores = dict[Role, dict[str, float]]
# Modules that register suites when imported (`Registry`'s providers): the tiny foundations'.
SUITE_PROVIDERS = ("hf_specgen.tiny.suites",)


@dataclass(frozen=True)
class LMSuite:
    """lm-eval tasks scored for one side of the trade-off; `task_dir` writes their YAMLs when
    they are not in lm-eval's registry; `metrics` maps a task to the lm-eval metric scored and
    its scale (default: the first metric its YAML lists, scale 1).

    Args:
        name: the suite's name (`--suite NAME`).
        tasks: the lm-eval task names.
        role: the side it scores, `"speciality"` or `"generality"`.
        description: what it measures, for the help and errors.
        task_dir: writes the tasks' YAMLs and returns their directory; None: lm-eval's registry.
        metrics: `{task: (metric, scale)}` for the tasks not scored by their first metric at scale 1.
    """

    name: str
    tasks: tuple[str, ...]
    role: Role
    description: str
    task_dir: Callable[[], Path] | None = None
    metrics: Mapping[str, tuple[str, float]] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.metrics) - set(self.tasks))
        if unknown:
            raise ValueError(f"suite {self.name!r} names metrics for task(s) {unknown} it does not have: {self.tasks}")

    def pick(self, task: str) -> tuple[str | None, float]:
        """The lm-eval metric scored for `task` (None: the first its YAML lists) and its scale."""
        return self.metrics.get(task, (None, 1.0))

    def score(self, task: str, scores: "Mapping[str, TaskScore]") -> float:
        """`task`'s score on [0, 1]: lm-eval's value times the suite's scale."""
        return scores[task].value * self.pick(task)[1]


@dataclass(frozen=True)
class ClipSuite:
    """A CLIP evaluation: `evaluate(model, batch_size=...)` scores a CLIP directory (or Hub id) on
    both sides, `{"speciality": {...}, "generality": {...}}`, each score on [0, 1].

    Args:
        name: the suite's name (`--suite NAME`).
        description: what it measures, for the help and errors.
        evaluate: the scoring function, `evaluate(model, batch_size=...)`.
    """

    name: str
    description: str
    evaluate: Callable[..., Scores]


LM_SUITES: Registry[LMSuite] = Registry(
    "LM suite",
    SUITE_PROVIDERS,
    {
        suite.name: suite
        for suite in (
            LMSuite(
                "commonsense",
                ("arc_easy", "arc_challenge", "race", "boolq", "piqa"),
                "generality",
                "common sense, as in the published study (lm-eval registry; downloads its data)",
            ),
            LMSuite(
                "alignment_tax",
                ("arc_easy", "arc_challenge", "race", "piqa", "squadv2", "drop", "wmt14-fr-en"),
                "generality",
                "what preference alignment costs, as in 'Mitigating the Alignment Tax of RLHF': common "
                "sense (accuracy), SQuAD v2 and DROP (F1), WMT14 fr-en (BLEU / 100) (lm-eval registry; downloads its "
                "data from the Hub)",
                # DROP lists `em` first; SQuAD v2 (a Python task, no metric list) and BLEU report 0-100
                metrics={"squadv2": ("f1", 0.01), "drop": ("f1", 1.0), "wmt14-fr-en": ("bleu", 0.01)},
            ),
            LMSuite(
                "instruction",
                ("ifeval",),
                "generality",
                "instruction following (lm-eval's ifeval; needs `pip install lm-eval[ifeval]`)",
            ),
            LMSuite(
                "medmcqa",
                ("specgen_medmcqa",),
                "speciality",
                "MedMCQA validation split with the training prompt (openlifescienceai/medmcqa)",
                medmcqa_task_dir,
            ),
        )
    },
)
CLIP_SUITES: Registry[ClipSuite] = Registry("CLIP suite", SUITE_PROVIDERS)


def register_suite(suite: LMSuite | ClipSuite) -> LMSuite | ClipSuite:
    """Makes `suite` known to `check_suites`, `evaluate_suites` and `specgen eval --suite`.

    Args:
        suite: an LM suite (lm-eval tasks) or a CLIP suite (a scoring function).

    Returns:
        `suite`.

    Raises:
        ValueError: another suite has its name.
    """
    registry, other = (LM_SUITES, CLIP_SUITES) if isinstance(suite, LMSuite) else (CLIP_SUITES, LM_SUITES)
    if suite.name in other:
        raise ValueError(f"suite {suite.name!r} is registered already as {other.kind}")
    return registry.register(suite.name, suite)


class _Descriptions(Mapping[str, str]):
    """Every suite's description by name, LM suites first (what `specgen eval --help` lists)."""

    def __getitem__(self, name: str) -> str:
        return (LM_SUITES[name] if name in LM_SUITES else CLIP_SUITES[name]).description

    def __iter__(self) -> Iterator[str]:
        return iter([*LM_SUITES, *CLIP_SUITES])

    def __len__(self) -> int:
        return len(LM_SUITES) + len(CLIP_SUITES)


SUITES: Mapping[str, str] = _Descriptions()  # name -> description, every suite


def check_suites(names: Sequence[str], both_sides: bool = False) -> None:
    """Stops on an unknown suite, a mix of LM and CLIP suites or, with `both_sides` (a result
    record needs both), suites that leave speciality or generality unmeasured, before any model
    is loaded.

    Args:
        names: the suites' names.
        both_sides: require speciality and generality both measured.
    """
    unknown = [name for name in names if name not in SUITES]
    if unknown:
        raise ValueError(f"unknown suite(s) {unknown}; known: {sorted(SUITES)}")
    if {name in CLIP_SUITES for name in names} == {True, False}:
        raise ValueError(f"suites {list(names)} mix language-model and CLIP evaluations: score them separately")
    roles = {"speciality", "generality"} if names[0] in CLIP_SUITES else {LM_SUITES[name].role for name in names}
    if both_sides and len(roles) < 2:
        missing = ({"speciality", "generality"} - roles).pop()
        raise ValueError(
            f"suites {list(names)} measure no {missing}: add a {missing} suite, e.g. "
            + ", ".join(n for n, s in LM_SUITES.items() if s.role == missing)
        )


def evaluate_suites(
    model: "PreTrainedModel | str | Path",
    suites: Sequence[str],
    tokenizer: "PreTrainedTokenizerBase | None" = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 32,
    device: str | None = None,
) -> dict[Role, dict[str, float]]:
    """`{"speciality": {metric: score}, "generality": {...}}` of `model` on the named suites
    (lm-eval for LM suites; a CLIP directory for a CLIP suite such as `tiny_clip`, where `limit`
    and `num_fewshot` do not apply).

    Args:
        model: an in-memory model, or a directory or Hub id.
        suites: the suites' names.
        tokenizer: the in-memory model's tokenizer.
        limit: examples per task at most.
        num_fewshot: few-shot examples per prompt.
        batch_size: the evaluation's batch size.
        device: the device a path is loaded on.

    Returns:
        The scores by side and metric.
    """
    from .lm import evaluate_lm

    check_suites(suites)
    if suites[0] in CLIP_SUITES:
        if limit is not None or num_fewshot is not None:
            raise ValueError(f"{suites[0]} scores every test image zero-shot: limit and num_fewshot do not apply")
        return CLIP_SUITES[suites[0]].evaluate(model, batch_size=batch_size)
    chosen = [LM_SUITES[name] for name in suites]
    metrics = task_metrics(chosen)
    include = sorted({str(suite.task_dir()) for suite in chosen if suite.task_dir})
    tasks = list(dict.fromkeys(task for suite in chosen for task in suite.tasks))  # a task shared by two suites once
    scores = evaluate_lm(
        model,
        tasks,
        tokenizer=tokenizer,
        include_path=include or None,
        num_fewshot=num_fewshot,
        limit=limit,
        batch_size=batch_size,
        device=device,
        metrics=metrics or None,
    )
    if not scores:  # not the main process of a multi-process lm-eval run
        return {"speciality": {}, "generality": {}}
    return suite_scores(chosen, scores)


def task_metrics(chosen: Sequence[LMSuite]) -> dict[str, str]:
    """The metric named for each task of `chosen` that names one; stops on a task that two
    suites score differently (one lm-eval run scores it once).

    Args:
        chosen: the LM suites to run.

    Returns:
        `{task: metric}`.
    """
    picks: dict[str, tuple[str | None, float]] = {}
    for suite in chosen:
        for task in suite.tasks:
            if picks.setdefault(task, suite.pick(task)) != suite.pick(task):
                raise ValueError(
                    f"task {task!r} is scored as {picks[task]} by one suite and {suite.pick(task)} "
                    f"by {suite.name!r} (metric, scale): score them separately"
                )
    return {task: metric for task, (metric, _) in picks.items() if metric is not None}


def suite_scores(chosen: Sequence[LMSuite], scores: "Mapping[str, TaskScore]") -> dict[Role, dict[str, float]]:
    """`{"speciality": {task: score}, "generality": {...}}` from lm-eval's `scores`, each on [0, 1].

    Args:
        chosen: the LM suites that were run.
        scores: lm-eval's scores by task (`evaluate_lm`'s result).

    Returns:
        The scores by side and task.
    """
    result: dict[Role, dict[str, float]] = {"speciality": {}, "generality": {}}
    for suite in chosen:
        result[suite.role].update({task: suite.score(task, scores) for task in suite.tasks})
    return result
