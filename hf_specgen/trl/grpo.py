"""`SpecGenGRPOTrainer`: TRL's `GRPOTrainer` with the regularizers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from trl import GRPOTrainer
from trl.data_utils import maybe_apply_chat_template

from .. import compat
from .completions import CompletionDistillation, check_plain_head


class SpecGenGRPOTrainer(CompletionDistillation, GRPOTrainer):
    """`trl.GRPOTrainer` (constructor unchanged) whose loss adds the active regularizers of its config
    (`SpecGenGRPOConfig`); `ref_model=` names the pre-trained model, else GRPO's own reference
    (`beta > 0`), else the model as it is when the trainer is built.

    The weight terms (L1, L2, EWC, MAS) and KD. EWC's Fisher and MAS's importance need no labels:
    they are estimated on `ewc_num_samples` / `mas_num_samples` prompts of the training set with
    completions sampled from the pre-trained policy (GRPO's `max_completion_length` and
    `temperature`), on the completion tokens. KD is the token-level `KL(pi_ref || pi_theta)` over
    all logits on the completion tokens GRPO generated, a mean over the optimizer step's micro-batches.

    GRPO's `beta` is a KL to the reference too, but estimated from the sampled token's
    log-probabilities only (the k3 estimator) and added inside the policy-gradient loss; KD is the
    exact KL over the vocabulary at each completion position, outside the advantage weighting.
    Feature protection is not available: GRPO's forward does not return hidden states.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.specgen.features is not None:
            raise ValueError(
                "feature_lambda is not supported by SpecGenGRPOTrainer: GRPO's forward returns no hidden states"
            )
        if self.specgen.uses_logits:
            check_plain_head(self.model)

    def _specgen_reference(self, ref_model: nn.Module | None) -> nn.Module | None:
        if ref_model is None and getattr(self, "ref_model", None) is not None:
            return self.accelerator.unwrap_model(self.ref_model)  # GRPO's own (beta > 0)
        return ref_model

    def _specgen_positions(self, inputs: dict[str, Any]) -> torch.Tensor:
        prompt, completion = inputs["prompt_mask"], inputs["completion_mask"]
        if "tool_mask" in inputs:
            completion = completion * inputs["tool_mask"]
        # position t predicts token t + 1: the completion's tokens from the prompt's last position on
        return torch.cat([torch.zeros_like(prompt[:, 1:]), completion], dim=1).bool()

    def _specgen_model_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return {
            "input_ids": torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1),
            "attention_mask": torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
        }

    def _specgen_completion_denominator(
        self, positions: torch.Tensor, num_items_in_batch: torch.Tensor | int | None
    ) -> torch.Tensor | float | None:
        # GRPO scales its own loss for accumulation: KD is this micro-batch's token mean over the step's micro-batches
        micro_batches = compat.accumulation_steps(self)
        return positions.sum().clamp(min=1) * micro_batches

    def _specgen_importance_batches(
        self, n: int, group: int, generator: torch.Generator, device: torch.device | None = None
    ) -> Iterator[dict[str, Any]]:
        """`n` prompts of the training set, each with one completion sampled from the model being estimated
        at (the pre-trained policy), the completion's tokens as labels."""
        dataset = self.train_dataset
        if dataset is None or "prompt" not in dataset.column_names:
            raise ValueError("EWC and MAS in SpecGenGRPOTrainer need a train_dataset with a 'prompt' column")
        model = self.specgen.ref_model if self.specgen.ref_model is not None else self.model
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        device = device or next(model.parameters()).device
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        for i in torch.randperm(len(dataset), generator=generator)[:n].tolist():
            text = maybe_apply_chat_template({"prompt": dataset[i]["prompt"]}, tokenizer)["prompt"]
            prompt = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed + i)
                sequence = model.generate(
                    **prompt,
                    max_new_tokens=self.args.max_completion_length,
                    do_sample=True,
                    temperature=self.args.temperature,
                    pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                )
            labels = sequence.clone()
            labels[:, : prompt["input_ids"].shape[1]] = -100
            yield {"input_ids": sequence, "attention_mask": torch.ones_like(sequence), "labels": labels}
