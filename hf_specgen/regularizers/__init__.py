"""The anti-forgetting regularizers and their registry (`<name>_lambda > 0` switches one on)."""

from __future__ import annotations

from .base import BatchRegularizer, Regularizer, StepRegularizer, WeightRegularizer
from .distance import DecoupledL2, L1Distance, L2Distance
from .distill import DistillationBatch, FeatureProtection, LogitDistillation, ProtectedFeatures
from .ewc import EWC, estimate_fisher

REGULARIZERS: dict[str, type[Regularizer]] = {
    cls.name: cls for cls in (L1Distance, L2Distance, EWC, LogitDistillation, FeatureProtection)
}


def get_regularizer(name: str) -> type[Regularizer]:
    """The regularizer class called `name`, or a ValueError listing the known ones."""
    try:
        return REGULARIZERS[name]
    except KeyError:
        raise ValueError(f"unknown regularizer {name!r}; known: {', '.join(REGULARIZERS)}") from None


def build_regularizers(args) -> list[Regularizer]:
    """The regularizers whose weight in `args` is > 0."""
    return [cls.from_args(args) for name, cls in REGULARIZERS.items() if getattr(args, f"{name}_lambda", 0.0) > 0]


__all__ = [
    "REGULARIZERS",
    "BatchRegularizer",
    "DecoupledL2",
    "DistillationBatch",
    "EWC",
    "FeatureProtection",
    "L1Distance",
    "L2Distance",
    "LogitDistillation",
    "ProtectedFeatures",
    "Regularizer",
    "StepRegularizer",
    "WeightRegularizer",
    "build_regularizers",
    "estimate_fisher",
    "get_regularizer",
]
