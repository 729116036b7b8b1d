"""L1 and L2-SP: distances between the weights and their pre-trained values."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..deltas import WeightDelta
from .base import Regularizer, StepRegularizer, WeightRegularizer


class L1Distance(WeightRegularizer):
    """`lambda * sum |theta - theta_pre|` (materializes each LoRA delta, one layer at a time)."""

    name = "l1"

    @torch.no_grad()
    def apply_(self, deltas: Sequence[WeightDelta], grad_scale: float) -> torch.Tensor:
        totals = []
        for d in deltas:
            for piece in d.pieces():
                totals.append(torch.linalg.vector_norm(piece.difference, ord=1))
                piece.add_grad_(piece.difference.sign_(), self.weight * grad_scale)  # the subgradient 0 at delta == 0
        return self.weight * _sum(totals)


class L2Distance(WeightRegularizer):
    """L2-SP, `lambda * sum (theta - theta_pre)^2`, in the loss (LoRA deltas through r x r Gram matrices)."""

    name = "l2"

    @classmethod
    def from_args(cls, args) -> Regularizer:
        if args.l2_mode == "decoupled":
            return DecoupledL2(args.l2_lambda)
        return cls(args.l2_lambda)

    @torch.no_grad()
    def apply_(self, deltas: Sequence[WeightDelta], grad_scale: float) -> torch.Tensor:
        return self.weight * _sum([d.squared_norm_and_grad_(self.weight * grad_scale) for d in deltas])


class DecoupledL2(StepRegularizer):
    """Decay toward the pre-trained weights in the optimizer step: `theta -= lr * lambda * (theta - theta_pre)`.

    As AdamW decouples weight decay from the gradient, this is neither clipped nor rescaled by
    the adaptive optimizer; it runs before the optimizer's update, on the pre-update weights.
    Logged as `l2_distance`, the squared distance before the decay.
    """

    name = "l2"

    @property
    def log_name(self) -> str:
        return "l2_distance"

    def before_step_(self, lr: float, deltas: Sequence[WeightDelta]) -> torch.Tensor:
        return sum(d.decay_(lr * self.weight) for d in deltas)


def _sum(values: list[torch.Tensor]) -> torch.Tensor:
    """The sum of per-piece values, in float32, on their device (0 for none)."""
    return torch.stack([v.float() for v in values]).sum() if values else torch.zeros(())
