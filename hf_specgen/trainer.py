"""`SpecGenTrainer`: `transformers.Trainer` plus regularization toward the pre-trained model."""

from __future__ import annotations

from transformers import Trainer

from .engine import REFERENCE_KEY, STATE_FILE, STATE_PREFIX
from .mixin import SpecGenMixin


__all__ = ["REFERENCE_KEY", "STATE_FILE", "STATE_PREFIX", "SpecGenTrainer"]


class SpecGenTrainer(SpecGenMixin, Trainer):
    """A drop-in `transformers.Trainer` whose loss is the task loss plus the active regularizers.

    Swap the class (and `TrainingArguments` for `SpecGenTrainingArguments`); every constructor
    argument is the Trainer's, plus `ref_model`, the pre-trained model when the model passed is
    not it. With every `<name>_lambda` at 0 it is exactly `Trainer`. See `SpecGenMixin`.

    Args:
        *args: `transformers.Trainer`'s positional arguments.
        ref_model: the pre-trained model (anchor and teacher) when `model` is not it, e.g. a model
            already fine-tuned on something else; default: `model` as it is when the trainer is built.
        **kwargs: `transformers.Trainer`'s keyword arguments; `args` a `SpecGenTrainingArguments`.
    """
