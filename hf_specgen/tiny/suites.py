"""The tiny foundations' evaluation suites, registered into `hf_specgen.eval.suites` (whose registries import
this module on their first lookup): `tiny_general` and `tiny_medmcqa` for the tiny LM (lm-eval tasks over the
local task directory), `tiny_clip` for the tiny CLIP (zero-shot on each image domain).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ..eval.suites import ClipSuite, LMSuite, Scores, register_suite


if TYPE_CHECKING:  # registering reads names only: no data set, image or model stack is loaded
    from datasets import Dataset

# The task names as `tasks.GENERAL_TASKS` and `tasks.MEDMCQA_TASK` spell them (a test checks), written out so
# that listing the suites does not load the data generators.
GENERAL_TASKS = ("tiny_arithmetic", "tiny_instructions", "tiny_world_facts", "tiny_cause_effect")
MEDMCQA_TASK = "tiny_medmcqa"


def tiny_task_dir() -> Path:
    """The tiny LM's lm-eval task directory, written on first use (`tasks.task_dir`).

    Returns:
        The directory to pass to lm-eval as `include_path`.
    """
    from .tasks import task_dir

    return task_dir()


def evaluate_tiny_clip(
    model: str | Path, seed: int = 0, batch_size: int = 256, domains: Mapping[str, Dataset] | None = None
) -> Scores:
    """Zero-shot accuracy of a CLIP on each tiny image domain's test split.

    Args:
        model: a CLIP directory or Hub id (with its processor).
        seed: draws the test images (when `domains` is None).
        batch_size: images per forward pass.
        domains: each domain's test split already rendered, when several models are scored on it.

    Returns:
        `{"speciality": {FINETUNE_DOMAIN: accuracy}, "generality": {other domain: accuracy}}`.
    """
    from transformers import CLIPModel, CLIPProcessor

    from ..eval.clip import domain_accuracies
    from .images import CLASS_NAMES, FINETUNE_DOMAIN, image_domains, zero_shot_templates

    clip, processor = CLIPModel.from_pretrained(model), CLIPProcessor.from_pretrained(model)
    domains = image_domains("test", seed) if domains is None else domains
    scores = domain_accuracies(clip, processor, domains, CLASS_NAMES, zero_shot_templates(), batch_size)
    return {
        "speciality": {FINETUNE_DOMAIN: scores[FINETUNE_DOMAIN]},
        "generality": {domain: score for domain, score in scores.items() if domain != FINETUNE_DOMAIN},
    }


for _suite in (
    LMSuite("tiny_general", GENERAL_TASKS, "generality", "the tiny LM's four general skills (offline)", tiny_task_dir),
    LMSuite(
        MEDMCQA_TASK,
        (MEDMCQA_TASK,),
        "speciality",
        "the tiny LM's MedMCQA-schema domain, test split (offline)",
        tiny_task_dir,
    ),
    ClipSuite(
        "tiny_clip",
        "the tiny CLIP zero-shot on each image domain (fine-tuning domain: speciality)",
        evaluate_tiny_clip,
    ),
):
    register_suite(_suite)
