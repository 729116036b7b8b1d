"""`SpecGenSFTTrainer`: TRL's `SFTTrainer` with the regularizers."""

from __future__ import annotations

from typing import Any

import torch
from trl import SFTTrainer

from .completions import CompletionDistillation, check_plain_head


class SpecGenSFTTrainer(CompletionDistillation, SFTTrainer):
    """`trl.SFTTrainer` (constructor unchanged) whose loss adds the active regularizers of its config
    (`SpecGenSFTConfig`); `ref_model=` names the pre-trained model when the model passed is not it.

    Every regularizer. KD and feature protection act on the positions SFT's loss supervises: the
    labels its collator leaves (completion-only and assistant-only masks applied), in padded and in
    padding-free / packed batches (`position_ids`, no attention mask: every position is a token).
    KD is normalized like SFT's loss (by the accumulated batch's supervised tokens).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.specgen.uses_logits:
            check_plain_head(self.model)

    def _specgen_token_denominator(self, num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor | float | None:
        # SFT's loss divides by the accumulated batch's token count whenever it is given
        if num_items_in_batch is None:
            return None
        if self.args.average_tokens_across_devices:
            return num_items_in_batch / (self.accelerator.num_processes // self.get_tp_size())
        return num_items_in_batch
