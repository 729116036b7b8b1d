"""The anti-forgetting regularizers and their registry (`<name>_lambda > 0` switches one on).

The registry is the one list of regularizer names: the arguments validate `<name>_lambda` for
each, the recipes' methods are named after them, and the report labels strengths with them.
Adding a regularizer is one module plus its entry here (and its fields in `SpecGenArguments`).
"""

from __future__ import annotations

from typing import Any

from .base import BatchRegularizer, Regularizer, StepRegularizer, WeightRegularizer
from .batch import DistillationBatch
from .distance import DecoupledL2, L1Distance, L2Distance
from .distill import FeatureProtection, LogitDistillation, ProtectedFeatures
from .ewc import EWC
from .importance import ImportanceRegularizer, ImportanceSample, accumulate_importance
from .mas import MAS


REGULARIZERS: dict[str, type[Regularizer]] = {
    cls.name: cls for cls in (L1Distance, L2Distance, EWC, MAS, LogitDistillation, FeatureProtection)
}


def get_regularizer(name: str) -> type[Regularizer]:
    """The regularizer class called `name`, or a ValueError listing the known ones.

    Args:
        name: the regularizer's name, e.g. `"l2"` (`REGULARIZERS`).

    Returns:
        Its class.
    """
    try:
        return REGULARIZERS[name]
    except KeyError:
        raise ValueError(f"unknown regularizer {name!r}; known: {', '.join(REGULARIZERS)}") from None


def weight_field(name: str) -> str:
    """The argument that switches regularizer `name` on and sets its strength, e.g. `l2_lambda`.

    Args:
        name: the regularizer's name, e.g. `"l2"`.

    Returns:
        The field's name.
    """
    return f"{name}_lambda"


def build_regularizers(args: Any) -> list[Regularizer]:
    """The regularizers whose weight in `args` is > 0.

    Args:
        args: the arguments holding the `<name>_lambda` fields and options (a `SpecGenArguments`).

    Returns:
        One configured regularizer per term that is on, in `REGULARIZERS` order.
    """
    return [cls.from_args(args) for name, cls in REGULARIZERS.items() if getattr(args, weight_field(name), 0.0) > 0]


__all__ = [
    "EWC",
    "MAS",
    "REGULARIZERS",
    "BatchRegularizer",
    "DecoupledL2",
    "DistillationBatch",
    "FeatureProtection",
    "ImportanceRegularizer",
    "ImportanceSample",
    "L1Distance",
    "L2Distance",
    "LogitDistillation",
    "ProtectedFeatures",
    "Regularizer",
    "StepRegularizer",
    "WeightRegularizer",
    "accumulate_importance",
    "build_regularizers",
    "get_regularizer",
    "weight_field",
]
