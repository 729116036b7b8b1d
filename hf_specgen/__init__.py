"""hf_specgen: fine-tune foundation models for a speciality without losing their generality."""

from .args import SpecGenTrainingArguments
from .trainer import SpecGenTrainer

__version__ = "0.1.0"

__all__ = ["SpecGenTrainer", "SpecGenTrainingArguments", "__version__"]
