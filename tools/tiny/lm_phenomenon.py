"""Catastrophic forgetting in the tiny LM, measured: the foundation, full fine-tuning on the
MedMCQA-style domain, and WiSE-FT between them, each scored with lm-eval on the general tasks and
on the domain's test split (trained facts, new wordings)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

from hf_specgen.data.medmcqa import tokenize_for_training
from hf_specgen.eval.suites import evaluate_suites
from hf_specgen.tiny.lm_data import medmcqa
from hf_specgen.tiny.paths import lm_path
from hf_specgen.trainer import SpecGenTrainer

from .finetuning import finetuning_arguments, score_with_wise_ft


# Full fine-tuning defaults: 30 epochs over the 384 training questions (720 steps); the domain's
# facts need many passes at this size.
FINETUNE_ARGS: dict[str, Any] = {
    "num_train_epochs": 30,
    "per_device_train_batch_size": 16,
    "learning_rate": 1e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 20,
}


def lm_scores(model_dir: str | Path) -> dict[str, float]:
    """Accuracy on the domain's test split and per general task (exact match for instructions)."""
    scores = evaluate_suites(model_dir, ["tiny_medmcqa", "tiny_general"])
    return {**scores["speciality"], **scores["generality"]}


def finetune_lm(model_dir: str | Path, output_dir: str | Path, seed: int = 0, **args: Any) -> Path:
    """Fine-tunes the causal LM in `model_dir` on the domain's train split (loss on the answer
    only) and saves it with its tokenizer. `args` override `FINETUNE_ARGS` and the other
    `SpecGenTrainingArguments` fields, e.g. a regularizer's weight (`l2_lambda=...`)."""
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    train = medmcqa(seed)["train"]
    train = train.map(lambda doc: tokenize_for_training(doc, tokenizer), remove_columns=train.column_names)
    training_args = finetuning_arguments(Path(output_dir), seed, {"logging_steps": 20, **FINETUNE_ARGS}, args)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    SpecGenTrainer(model=model, args=training_args, train_dataset=train, data_collator=collator).train()
    model_path = Path(output_dir) / "model"
    model.save_pretrained(model_path)
    tokenizer.save_pretrained(model_path)
    return model_path


def lm_phenomenon(
    workdir: str | Path, seed: int = 0, model_dir: str | Path | None = None, **args: Any
) -> dict[str, dict[str, float]]:
    """Scores of the foundation, its full fine-tune and their WiSE-FT merge:
    `{"pre-trained" | "fine-tuned" | "wise-ft-0.5": {task: score}}`."""
    workdir, model_dir = Path(workdir), Path(model_dir or lm_path())
    finetuned = finetune_lm(model_dir, workdir / "finetuned", seed, **args)
    return score_with_wise_ft(model_dir, "pre-trained", finetuned, workdir, lm_scores)
