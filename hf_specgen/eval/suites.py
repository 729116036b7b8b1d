"""Named evaluation suites: which tasks measure speciality and which generality, so that every
method and every alpha is scored the same way (`specgen eval --suite ...`).

LM suites are lm-eval tasks (the registry's for real runs; local task directories for MedMCQA
with the training prompt and for the tiny foundations), each scored on [0, 1] since the report
averages a side's scores: a suite names the metric of a task whose first is not the one wanted,
and the factor that brings a 0-100 score (BLEU, SQuAD's F1) to [0, 1]. `tiny_clip` scores a CLIP
zero-shot on the tiny image domains: the fine-tuning domain is the speciality, the others the
shifts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .lm_tasks import medmcqa_task_dir


if TYPE_CHECKING:  # the CLI reads the suite names without loading the model stack
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .lm import TaskScore

Role = Literal["speciality", "generality"]


def _tiny_task_dir() -> Path:
    from ..tiny import task_dir

    return task_dir()


@dataclass(frozen=True)
class LMSuite:
    """lm-eval tasks scored for one side of the trade-off; `task_dir` writes their YAMLs when
    they are not in lm-eval's registry; `metrics` maps a task to the lm-eval metric scored and
    its scale (default: the first metric its YAML lists, scale 1)."""

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


LM_SUITES = {
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
        LMSuite(
            "tiny_general",
            ("tiny_arithmetic", "tiny_instructions", "tiny_world_facts", "tiny_cause_effect"),
            "generality",
            "the tiny LM's four general skills (offline)",
            _tiny_task_dir,
        ),
        LMSuite(
            "tiny_medmcqa",
            ("tiny_medmcqa",),
            "speciality",
            "the tiny LM's MedMCQA-schema domain, test split (offline)",
            _tiny_task_dir,
        ),
    )
}
CLIP_SUITES = {"tiny_clip": "the tiny CLIP zero-shot on each image domain (fine-tuning domain: speciality)"}
SUITES = {**{name: suite.description for name, suite in LM_SUITES.items()}, **CLIP_SUITES}


def check_suites(names: Sequence[str], both_sides: bool = False) -> None:
    """Stops on an unknown suite, a mix of LM and CLIP suites or, with `both_sides` (a result
    record needs both), suites that leave speciality or generality unmeasured, before any model
    is loaded."""
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
    (lm-eval for LM suites; a CLIP directory for `tiny_clip`, where `limit` and `num_fewshot` do
    not apply)."""
    from .lm import evaluate_lm

    check_suites(suites)
    if suites[0] in CLIP_SUITES:
        if limit is not None or num_fewshot is not None:
            raise ValueError("tiny_clip scores every test image zero-shot: limit and num_fewshot do not apply")
        return evaluate_tiny_clip(model, batch_size=batch_size)
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
    suites score differently (one lm-eval run scores it once)."""
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
    """`{"speciality": {task: score}, "generality": {...}}` from lm-eval's `scores`, each on [0, 1]."""
    result: dict[Role, dict[str, float]] = {"speciality": {}, "generality": {}}
    for suite in chosen:
        result[suite.role].update({task: suite.score(task, scores) for task in suite.tasks})
    return result


def evaluate_tiny_clip(
    model: str | Path, seed: int = 0, batch_size: int = 256, domains: "Mapping[str, Dataset] | None" = None
) -> dict[Role, dict[str, float]]:
    """Zero-shot accuracy of a CLIP directory on each tiny image domain's test split (`domains`:
    that split already rendered, when several models are scored on it)."""
    from transformers import CLIPModel, CLIPProcessor

    from ..tiny.images import CLASS_NAMES, FINETUNE_DOMAIN, image_domains, zero_shot_templates
    from .clip import domain_accuracies

    clip, processor = CLIPModel.from_pretrained(model), CLIPProcessor.from_pretrained(model)
    domains = image_domains("test", seed) if domains is None else domains
    scores = domain_accuracies(clip, processor, domains, CLASS_NAMES, zero_shot_templates(), batch_size)
    return {
        "speciality": {FINETUNE_DOMAIN: scores[FINETUNE_DOMAIN]},
        "generality": {domain: score for domain, score in scores.items() if domain != FINETUNE_DOMAIN},
    }
