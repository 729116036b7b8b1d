"""`SpecGenDPOTrainer`: TRL's `DPOTrainer` with the regularizers, anchored to DPO's own reference."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from trl import DPOTrainer

from ..anchor import is_peft_model
from .completions import CompletionDistillation, check_plain_head


# DPO's batch keys that are not model inputs
_NOT_MODEL_INPUTS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")


class SpecGenDPOTrainer(CompletionDistillation, DPOTrainer):
    """`trl.DPOTrainer` (constructor unchanged, `ref_model` included) whose loss adds the active
    regularizers of its config (`SpecGenDPOConfig`).

    The reference policy DPO holds is the anchor of the weights and the teacher: its `ref_model`
    (given, or the copy DPO builds), or for a peft model the model with its adapters disabled; no
    second copy. Only where DPO keeps no reference (`precompute_ref_log_probs=True` without peft)
    does the engine make its own copy. KD is the token-level `KL(pi_ref || pi_theta)` on the chosen
    and rejected completion tokens (a mean over the micro-batch's completion tokens), read off the
    same forwards DPO runs; feature protection compares the hidden states of the same forwards.
    EWC's Fisher and MAS's importance are estimated at the reference on the chosen completions.

    DPO's `beta` constrains the reward margin, a difference of sequence log-ratios between the
    chosen and rejected answers: the policy may move far from the reference on both as long as
    the margin grows. The anchors constrain the weights (L1, L2, EWC, MAS) and the per-token
    distribution (KD) directly.
    """

    _specgen_base_takes_ref_model = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.specgen.uses_logits:
            check_plain_head(self.model)

    def _specgen_reference(self, ref_model: nn.Module | None) -> nn.Module | None:
        if self.ref_model is None and is_peft_model(self.model) and "ref" in self.model.peft_config:
            raise ValueError(
                "a peft model with a 'ref' adapter (DPO re-training an existing adapter) is not supported by the "
                "regularizers yet: the model with its adapters disabled is not DPO's reference"
            )
        return self.accelerator.unwrap_model(self.ref_model) if self.ref_model is not None else None

    def _specgen_positions(self, inputs: dict[str, Any]) -> torch.Tensor:
        return inputs["completion_mask"][:, 1:].bool()

    def _specgen_model_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in inputs.items() if k not in _NOT_MODEL_INPUTS}

    def _specgen_importance_batches(
        self, n: int, group: int, generator: torch.Generator, device: torch.device | None = None
    ) -> Iterator[dict[str, Any]]:
        """Pairs collated by DPO's collator, their chosen halves with the completion tokens as labels."""
        for batch in super()._specgen_importance_batches(n, group, generator, device):
            chosen = batch["input_ids"].shape[0] // 2  # the batch is [chosen, rejected]
            input_ids, completion = batch["input_ids"][:chosen], batch["completion_mask"][:chosen]
            yield {
                "input_ids": input_ids,
                "attention_mask": batch["attention_mask"][:chosen],
                "labels": input_ids.masked_fill(completion == 0, -100),
            }
