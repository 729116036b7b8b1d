"""What a regularizer is, and the three ways it meets the training step.

A regularizer declares what it needs through class attributes, so that the engine serves it
without knowing its class: a frozen teacher (`uses_teacher`), output distributions
(`compares_distributions`: a teacher over the same vocabulary, no one-outcome output), hidden
features (`uses_features`), the anchor of the weights (`uses_weights`), an importance estimated
at the pre-trained weights (`needs_importance`), and how a batch term is normalized
(`normalization`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from ..deltas import WeightDelta
from .batch import DistillationBatch


class Regularizer:
    """A term toward the pre-trained model, switched on by its weight `<name>_lambda`.

    Args:
        weight: the term's strength, its `<name>_lambda` (> 0 when it is on).
    """

    name: ClassVar[str]
    uses_teacher: ClassVar[bool] = False
    uses_weights: ClassVar[bool] = False
    uses_features: ClassVar[bool] = False
    compares_distributions: ClassVar[bool] = False
    needs_importance: ClassVar[bool] = False
    # Options besides the weight that must be a finite number > 0 when it is on: {field: what it is}
    positive_options: ClassVar[dict[str, str]] = {}

    def __init__(self, weight: float) -> None:
        self.weight = weight

    @classmethod
    def from_args(cls, args: Any) -> Regularizer:
        """The regularizer configured by `args` (a `SpecGenArguments`)."""
        return cls(getattr(args, f"{cls.name}_lambda"))

    @property
    def log_name(self) -> str:
        return f"loss_{self.name}"

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors a checkpoint must keep to resume (e.g. EWC's Fisher)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass

    @property
    def nbytes(self) -> int:
        """Memory the regularizer holds of its own (an importance), in bytes."""
        return 0


class WeightRegularizer(Regularizer):
    """A loss term that depends on the weights alone.

    Its gradient has a closed form, so it is added straight to `.grad` once per optimizer step:
    no autograd graph over every weight, and no second pass over the model.
    """

    uses_weights = True

    def apply_(self, deltas: Sequence[WeightDelta], grad_scale: float) -> torch.Tensor:
        """Returns the term's value and adds `grad_scale` times its gradient to the parameters' `.grad`."""
        raise NotImplementedError


class BatchRegularizer(Regularizer):
    """A loss term comparing the model with the frozen teacher on each micro-batch.

    `normalization`: "tokens", normalized like the task loss (over the accumulated batch's
    supervised tokens when the Trainer counts them), or "batch", a mean over the micro-batch."""

    uses_teacher = True
    normalization: ClassVar[str] = "batch"

    def __call__(self, batch: DistillationBatch) -> torch.Tensor:
        raise NotImplementedError


class StepRegularizer(Regularizer):
    """Not a loss term: changes the weights inside the optimizer step (decoupled decay)."""

    uses_weights = True

    def before_step_(self, lr: float, deltas: Sequence[WeightDelta]) -> torch.Tensor:
        """Applies itself to `deltas` at learning rate `lr`; returns the value to log."""
        raise NotImplementedError
