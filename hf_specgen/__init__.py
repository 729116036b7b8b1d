"""hf_specgen: fine-tune foundation models for a speciality without losing their generality.

`SpecGenTrainer` and `SpecGenTrainingArguments` are imported on first use, so that the merge tool
and the CLI start without loading the whole training stack (transformers' Trainer, Accelerate,
DeepSpeed).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {"SpecGenTrainer": ".trainer", "SpecGenTrainingArguments": ".args", "WeightAveraging": ".averaging"}

if TYPE_CHECKING:
    from .args import SpecGenTrainingArguments
    from .averaging import WeightAveraging
    from .trainer import SpecGenTrainer


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["SpecGenTrainer", "SpecGenTrainingArguments", "WeightAveraging", "__version__"]
