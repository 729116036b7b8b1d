"""hf_specgen: fine-tune foundation models for a speciality without losing their generality.

`SpecGenTrainer` and `SpecGenTrainingArguments` are imported on first use, so that the merge tool
and the CLI start without loading the whole training stack (transformers' Trainer, Accelerate,
DeepSpeed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_getattr
from .version import __version__


_LAZY = {"SpecGenTrainer": ".trainer", "SpecGenTrainingArguments": ".args", "WeightAveraging": ".averaging"}

if TYPE_CHECKING:
    from .args import SpecGenTrainingArguments
    from .averaging import WeightAveraging
    from .trainer import SpecGenTrainer

__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = ["SpecGenTrainer", "SpecGenTrainingArguments", "WeightAveraging", "__version__"]
