"""The three ways a regularizer meets the training step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import torch

from ..anchor import WeightDelta

if TYPE_CHECKING:
    from ..args import SpecGenTrainingArguments
    from .distill import DistillationBatch


class Regularizer:
    """A term toward the pre-trained model, switched on by its weight `<name>_lambda`."""

    name: ClassVar[str]

    def __init__(self, weight: float) -> None:
        self.weight = weight

    @classmethod
    def from_args(cls, args: SpecGenTrainingArguments) -> Regularizer:
        return cls(getattr(args, f"{cls.name}_lambda"))

    @property
    def log_name(self) -> str:
        return f"loss_{self.name}"

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors a checkpoint must keep to resume (e.g. EWC's Fisher)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


class WeightRegularizer(Regularizer):
    """A loss term that depends on the weights alone.

    Its gradient has a closed form, so it is added straight to `.grad` once per optimizer step:
    no autograd graph over every weight, and no second pass over the model.
    """

    def apply_(self, deltas: Sequence[WeightDelta], grad_scale: float) -> torch.Tensor:
        """Returns the term's value and adds `grad_scale` times its gradient to the parameters' `.grad`."""
        raise NotImplementedError


class BatchRegularizer(Regularizer):
    """A loss term comparing the model with the frozen teacher on each micro-batch."""

    def __call__(self, batch: DistillationBatch) -> torch.Tensor:
        raise NotImplementedError


class StepRegularizer(Regularizer):
    """Not a loss term: changes the weights inside the optimizer step (decoupled decay)."""

    def before_step_(self, lr: float, deltas: Sequence[WeightDelta]) -> torch.Tensor:
        """Applies itself to `deltas` at learning rate `lr`; returns the value to log."""
        raise NotImplementedError
