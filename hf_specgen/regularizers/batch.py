"""What a batch regularizer sees of one micro-batch (`DistillationBatch`).

Its own module so that `base` (the `BatchRegularizer` interface) and `distill` (the terms that
read it) both import it, and neither imports the other's dependents.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class DistillationBatch:
    """What a distillation term sees of one micro-batch.

    Args:
        student: The trained model's outputs on the micro-batch.
        teacher: The frozen pre-trained model's outputs on the same micro-batch.
        labels: The micro-batch's labels (-100 where not supervised), or None.
        shifts_labels: Whether the model's loss shifts the labels by one position (causal LMs).
        token_denominator: What the task loss divides its token sum by when it is normalized over the
            whole accumulated batch (`num_items_in_batch`); None when it is a mean over this micro-batch.
        student_features: The trained model's protected features.
        teacher_features: The frozen model's protected features, in the same order.
        feature_masks: Per feature, which of its positions count (tokens: an attention mask), None for all.
    """

    student: Any
    teacher: Any
    labels: torch.Tensor | None
    shifts_labels: bool
    token_denominator: torch.Tensor | float | None = None
    student_features: list[torch.Tensor] = field(default_factory=list)
    teacher_features: list[torch.Tensor] = field(default_factory=list)
    feature_masks: list[torch.Tensor | None] = field(default_factory=list)
