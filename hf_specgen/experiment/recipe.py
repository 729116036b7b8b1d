"""What a recipe plugs into the experiment loop: its model, data, trainer and evaluation.

`recipes/galactica_med.py` and `recipes/clip_imagenet.py` each subclass `Recipe`; the loop
(`run_experiment`) does the rest the same way for both: methods, WiSE-FT alphas, records, report,
publishing. `ExperimentArguments` are the loop's own options, shared by every recipe.
"""

from __future__ import annotations

import statistics
import sys
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel

from ..args import SpecGenTrainingArguments
from ..eval.report import KEEP_SPECIALITY
from ..eval.suites import Role
from ..merge.schedule import AlphaSchedule
from .config import ConfigError, check_finite, parse_config
from .methods import DEFAULT_METHODS, METHODS
from .sources import is_local_path


@dataclass
class ExperimentArguments:
    """Which methods to compare and how to merge, report and publish them."""

    methods: list[str] = field(
        default_factory=lambda: list(DEFAULT_METHODS),
        metadata={"help": f"Methods to fine-tune with: {', '.join(METHODS)}, or '+' combinations (e.g. kd+feature); "
                  f"default {' '.join(DEFAULT_METHODS)}. Each regularizer's strength is its <name>_lambda."},
    )
    alphas: list[float] = field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
        metadata={"help": "WiSE-FT alphas merged and scored for every method (0: pre-trained, 1: fine-tuned)."},
    )
    merge_group_alphas: list[float] | None = field(
        default=None,
        metadata={"help": "Heterogeneous WiSE-FT (HMA): the shape of one ratio per group of consecutive transformer "
                  "blocks, input side first (e.g. 0.5 1 1.5 for three groups); each of alphas is the mean it is scaled "
                  "to, and tensors outside the blocks (embeddings, final norm, head) get that mean. Every scaled ratio "
                  "must lie in [0, 1]. Default: one alpha for every tensor."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (method 'lora')."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator: the update is lora_alpha / r * B @ A."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names LoRA adapts (default: the recipe's, e.g. q_proj v_proj)."}
    )
    lora_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of LoRA runs (default: learning_rate); adapters usually want more."}
    )
    keep_speciality: float = field(
        default=KEEP_SPECIALITY,
        metadata={"help": "Publishing rule: among the runs keeping at least this share of the best speciality, "
                  "publish the most general one."},
    )
    keep_merged_models: bool = field(
        default=False, metadata={"help": "Keep every WiSE-FT merge on disk after scoring it (default: only the scores)."}
    )
    report_title: str | None = field(default=None, metadata={"help": "Title of the report's table and plot."})

    def __post_init__(self) -> None:
        check_finite(self)  # first: NaN passes every range check below
        if any(not 0.0 <= a <= 1.0 for a in self.alphas):
            raise ValueError(f"alphas must lie in [0, 1], got {self.alphas}")
        if len(set(self.alphas)) != len(self.alphas):
            raise ValueError(f"alphas {self.alphas} repeat a value")
        if self.merge_group_alphas is not None:
            self._check_group_shape()
        if self.lora_r <= 0:
            raise ValueError(f"lora_r must be > 0, got {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_learning_rate is not None and self.lora_learning_rate <= 0:
            raise ValueError(f"lora_learning_rate must be > 0, got {self.lora_learning_rate}")
        if not 0.0 < self.keep_speciality <= 1.0:
            raise ValueError(f"keep_speciality must be in (0, 1], got {self.keep_speciality}")


    def _check_group_shape(self) -> None:
        shape = self.merge_group_alphas
        if not shape or statistics.fmean(shape) <= 0 or any(a < 0 for a in shape):
            raise ValueError(f"merge_group_alphas must be non-negative ratios with a positive mean, got {shape}")
        for alpha in self.alphas:
            scaled = [a * alpha / statistics.fmean(shape) for a in shape]
            if max(scaled) > 1.0:
                raise ValueError(
                    f"merge_group_alphas {shape} scaled to alpha {alpha:g} gives {[round(a, 6) for a in scaled]}: "
                    "a ratio above 1; use smaller alphas or a flatter shape"
                )

    def merge_schedule(self, alpha: float) -> AlphaSchedule | None:
        """The schedule a merge at (mean) `alpha` uses; None: one alpha for every tensor."""
        if self.merge_group_alphas is None:
            return None
        return AlphaSchedule(group_alphas=tuple(self.merge_group_alphas)).at_mean(alpha)


class Recipe(ABC):
    """A fine-tuning task: pre-trained model, training data, trainer and the two-sided evaluation.

    `arguments` is the recipe's own dataclass of options (with a `model_name_or_path` field);
    `Recipe.main()` is the script's entry point."""

    name: ClassVar[str]  # names the report and the summary lines
    arguments: ClassVar[type]
    reference_method: ClassVar[str] = "pre-trained"  # how the report calls the model before fine-tuning
    default_lora_targets: ClassVar[tuple[str, ...] | str | None] = None  # None: peft's default for the architecture

    def __init__(self, options: Any, seed: int) -> None:
        self.options, self.seed = options, seed
        self.pretrained: str = options.model_name_or_path  # `prepare` resolves it to a directory or Hub id
        self.train_data: Any = None  # `prepare` loads it

    @classmethod
    def main(cls, argv: Sequence[str] | None = None) -> None:
        """Parses `--config YAML` and the command line, then runs the experiment; a configuration
        that cannot run exits with one line naming the problem."""
        from .runner import run_experiment

        try:
            options, experiment, training = parse_config((cls.arguments, ExperimentArguments, SpecGenTrainingArguments), argv)
            run_experiment(cls(options, training.seed), experiment, training)
        except ConfigError as error:
            sys.exit(f"{cls.name}.py: error: {error}")
        finally:  # torch's documented shutdown: no process group left to the interpreter's exit
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()

    def local_paths(self) -> dict[str, str]:
        """The options naming local files or folders, as `{field: path}`: `run_experiment` checks
        that they exist before anything loads. Here `model_name_or_path` when it is a local path
        (`is_local_path`); recipes add their data sets and other files."""
        name = self.options.model_name_or_path
        return {"model_name_or_path": name} if is_local_path(name) else {}

    @abstractmethod
    def prepare(self) -> None:
        """Loads and checks the data and the model's configuration: a missing data set, model or
        column raises `ConfigError` here, before any training."""

    @abstractmethod
    def load_model(self) -> tuple[PreTrainedModel, Any]:
        """The pre-trained model and its tokenizer or processor (saved beside every fine-tune)."""

    @abstractmethod
    def build_trainer(self, model: PreTrainedModel, processor: Any, args: SpecGenTrainingArguments) -> Any:
        """A `SpecGenTrainer` over the training data."""

    @abstractmethod
    def evaluate(self, model_dir: Path) -> dict[Role, dict[str, float]]:
        """`{"speciality": {metric: score}, "generality": {...}}` of a saved model (main process only)."""

    @abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """Everything besides the training arguments that changes the fine-tuned model (keys the runs)."""

    @abstractmethod
    def eval_fingerprint(self) -> dict[str, Any]:
        """Everything that changes the scores of a given model (keys the records: new suites re-score, not retrain)."""
