"""Named evaluation suites: which tasks measure speciality and which generality, so that every
method and every alpha is scored the same way (`specgen eval --suite ...`).

LM suites are lm-eval tasks (the registry's for real runs; local task directories for MedMCQA
with the training prompt and for the tiny foundations). `tiny_clip` scores a CLIP zero-shot on
the tiny image domains: the fine-tuning domain is the speciality, the others the shifts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .lm_tasks import medmcqa_task_dir

if TYPE_CHECKING:  # the CLI reads the suite names without loading the model stack
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Role = Literal["speciality", "generality"]


def _tiny_task_dir() -> Path:
    from ..tiny import task_dir

    return task_dir()


@dataclass(frozen=True)
class LMSuite:
    """lm-eval tasks scored for one side of the trade-off; `task_dir` writes their YAMLs when
    they are not in lm-eval's registry."""

    name: str
    tasks: tuple[str, ...]
    role: Role
    description: str
    task_dir: Callable[[], Path] | None = None


LM_SUITES = {
    suite.name: suite
    for suite in (
        LMSuite("commonsense", ("arc_easy", "arc_challenge", "race", "boolq", "piqa"), "generality",
                "common sense, as in the published study (lm-eval registry; downloads its data)"),
        LMSuite("instruction", ("ifeval",), "generality",
                "instruction following (lm-eval's ifeval; needs `pip install lm-eval[ifeval]`)"),
        LMSuite("medmcqa", ("specgen_medmcqa",), "speciality",
                "MedMCQA validation split with the training prompt (openlifescienceai/medmcqa)", medmcqa_task_dir),
        LMSuite("tiny_general", ("tiny_arithmetic", "tiny_instructions", "tiny_world_facts", "tiny_cause_effect"),
                "generality", "the tiny LM's four general skills (offline)", _tiny_task_dir),
        LMSuite("tiny_medmcqa", ("tiny_medmcqa",), "speciality",
                "the tiny LM's MedMCQA-schema domain, test split (offline)", _tiny_task_dir),
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
        raise ValueError(f"suites {list(names)} measure no {missing}: add a {missing} suite, e.g. "
                         + ", ".join(n for n, s in LM_SUITES.items() if s.role == missing))


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
    include = sorted({str(suite.task_dir()) for suite in chosen if suite.task_dir})
    tasks = [task for suite in chosen for task in suite.tasks]
    scores = evaluate_lm(
        model, tasks, tokenizer=tokenizer, include_path=include or None,
        num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, device=device,
    )
    result: dict[Role, dict[str, float]] = {"speciality": {}, "generality": {}}
    if not scores:  # not the main process of a multi-process lm-eval run
        return result
    for suite in chosen:
        result[suite.role].update({task: scores[task].value for task in suite.tasks})
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
