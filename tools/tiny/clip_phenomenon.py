"""Catastrophic forgetting under distribution shift, on the tiny CLIP.

The shipped tiny CLIP is fine-tuned fully on one domain (`FINETUNE_DOMAIN`, the "ImageNet") with
`SpecGenTrainer`, then merged back toward the pre-trained weights with WiSE-FT, and every model is
scored by the same zero-shot evaluation on each domain's test split: the fine-tuning domain
measures the speciality, the other domains (the distribution shifts) the generality.

`python -m tools.tiny.phenomenon` prints its table next to the LM's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
from transformers import CLIPModel, CLIPProcessor

from hf_specgen.data.image_classification import ClassPromptCollator, class_prompt_loss, freeze_text_tower
from hf_specgen.tiny.images import CLASS_NAMES, FINETUNE_DOMAIN, image_domains, zero_shot_templates
from hf_specgen.tiny.names import IMAGES_PER_CLASS
from hf_specgen.tiny.paths import clip_path
from hf_specgen.tiny.suites import evaluate_tiny_clip
from hf_specgen.trainer import SpecGenTrainer

from .finetuning import finetuning_arguments, score_with_wise_ft


# Full fine-tuning defaults: 5 epochs over the 3,000 training images (235 steps), under a minute on 1 core.
FINETUNE_ARGS: dict[str, Any] = {
    "num_train_epochs": 5,
    "per_device_train_batch_size": 64,
    "learning_rate": 1e-3,
    "weight_decay": 0.1,
    "warmup_steps": 10,
    "lr_scheduler_type": "cosine",
}


def finetune_clip(
    model_dir: str | Path, train_dataset: datasets.Dataset, output_dir: str | Path, seed: int = 0, **args: Any
) -> Path:
    """Fine-tunes the image tower of the `CLIPModel` in `model_dir` on `train_dataset` and saves it with its processor.

    The classifier is the text tower (frozen) applied to one prompt per class, the first of the
    fine-tuning domain's templates. `args` override `FINETUNE_ARGS` and the other
    `SpecGenTrainingArguments` fields, e.g. a regularizer's weight (`l2_lambda=...`)."""
    output_dir = Path(output_dir)
    model = CLIPModel.from_pretrained(model_dir)
    processor = CLIPProcessor.from_pretrained(model_dir)
    freeze_text_tower(model)
    prompt = zero_shot_templates(FINETUNE_DOMAIN)[0]
    defaults = {"data_seed": seed, "remove_unused_columns": False, "logging_steps": 10, **FINETUNE_ARGS}
    training_args = finetuning_arguments(output_dir, seed, defaults, args)
    trainer = SpecGenTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=ClassPromptCollator(processor, [prompt.format(name) for name in CLASS_NAMES]),
        compute_loss_func=class_prompt_loss,
    )
    trainer.train()
    model_path = output_dir / "model"
    model.save_pretrained(model_path)
    processor.save_pretrained(model_path)
    return model_path


def clip_phenomenon(
    workdir: str | Path, seed: int = 0, model_dir: str | Path | None = None, **args: Any
) -> dict[str, dict[str, float]]:
    """Per-model, per-domain zero-shot accuracies: `{"zero-shot" | "fine-tuned" | "wise-ft-0.5": {domain: accuracy}}`.

    `seed` draws the fine-tuning and test data and the training order; `args` go to `finetune_clip`."""
    workdir, model_dir = Path(workdir), Path(model_dir or clip_path())
    train = image_domains("train", seed, IMAGES_PER_CLASS["train"], domains=[FINETUNE_DOMAIN])[FINETUNE_DOMAIN]
    test = image_domains("test", seed, IMAGES_PER_CLASS["test"])
    finetuned = finetune_clip(model_dir, train, workdir / "finetuned", seed, **args)

    def score(path: Path) -> dict[str, float]:
        scores = evaluate_tiny_clip(path, seed, domains=test)
        return {**scores["speciality"], **scores["generality"]}

    return score_with_wise_ft(model_dir, "zero-shot", finetuned, workdir, score)
