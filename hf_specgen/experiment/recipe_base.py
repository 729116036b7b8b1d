"""What the experiment loop needs of a recipe (`RecipeBase`): its model, data, trainer and evaluation,
and the fingerprints that key its runs and records.

`Recipe` (`hf_specgen.experiment.recipe`) adds the script's entry point; the loop, `run_experiment`,
sees a `RecipeBase` only, so that the arrow between them goes one way: recipe -> runner -> this.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from transformers import PreTrainedModel

from ..args import SpecGenTrainingArguments
from ..eval.suites import Role
from ..merge.search import GroupSearch
from .arguments import ExperimentArguments
from .sources import is_local_path


class RecipeBase(ABC):
    """A fine-tuning task: pre-trained model, training data, trainer and the two-sided evaluation.

    What the experiment loop (`run_experiment`) needs of a recipe; `Recipe` adds the script's entry
    point, `Recipe.main()`. `arguments` is the recipe's own dataclass of options (with a
    `model_name_or_path` field), `options` an instance of it.

    Args:
        options: the recipe's options, an instance of `arguments`.
        seed: the training seed (the training arguments'), for the recipe's own sampling.
    """

    name: ClassVar[str]  # names the report and the summary lines
    arguments: ClassVar[type]
    # the training arguments' dataclass (a TRL recipe: its config with the regularizers, e.g. `SpecGenDPOConfig`)
    training_arguments: ClassVar[type] = SpecGenTrainingArguments
    # the training algorithms a method may name (`dpo+l2`), the first the default; () : the recipe's own loss only
    algorithms: ClassVar[tuple[str, ...]] = ()
    reference_method: ClassVar[str] = "pre-trained"  # how the report calls the model before fine-tuning
    default_lora_targets: ClassVar[tuple[str, ...] | str | None] = None  # None: peft's default for the architecture
    # The fields of `arguments` that change no result, only how fast or where it is computed (e.g. an
    # evaluation batch size): no key holds them. Every other field that none of the fingerprints reads keys
    # the runs by itself (`unclaimed_options`), so that a new option never reuses runs made without it.
    unkeyed_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: Any, seed: int) -> None:
        self.options, self.seed = options, seed
        self.pretrained: str = options.model_name_or_path  # `prepare` resolves it to a directory or Hub id
        self.train_data: Any = None  # `prepare` loads it

    def local_paths(self) -> dict[str, str]:
        """The options naming local files or folders: `run_experiment` checks that they exist before
        anything loads.

        Returns:
            `{field: path}`: here `model_name_or_path` when it is a local path (`is_local_path`);
            recipes add their data sets and other files.
        """
        name = self.options.model_name_or_path
        return {"model_name_or_path": name} if is_local_path(name) else {}

    @abstractmethod
    def prepare(self) -> None:
        """Loads and checks the data and the model's configuration: a missing data set, model or
        column raises `ConfigError` here, before any training."""

    @abstractmethod
    def load_model(self) -> tuple[PreTrainedModel, Any]:
        """Loads the pre-trained model.

        Returns:
            The model and its tokenizer or processor (saved beside every fine-tune).
        """

    @abstractmethod
    def build_trainer(
        self, model: PreTrainedModel, processor: Any, args: SpecGenTrainingArguments, algorithm: str | None = None
    ) -> Any:
        """A `SpecGenTrainer` (or a TRL trainer with the regularizers) over the training data.

        Args:
            model: the model to train (a LoRA run's already wrapped by peft).
            processor: its tokenizer or processor.
            args: the run's training arguments (`training_arguments`), its regularizers switched on.
            algorithm: one of `algorithms` (None where the recipe offers none).

        Returns:
            The trainer the loop runs (`train`, `save_model`, callbacks).
        """

    def algorithm_fingerprint(self, algorithm: str) -> dict[str, Any]:
        """The recipe's options that change what `algorithm` trains (keys its runs only).

        Args:
            algorithm: one of `algorithms`.

        Returns:
            `{name: value}`; default none.
        """
        return {}

    @abstractmethod
    def evaluate(self, model_dir: Path) -> dict[Role, dict[str, float]]:
        """Scores a saved model on both sides (called on the main process only).

        Args:
            model_dir: the model's directory.

        Returns:
            `{"speciality": {metric: score}, "generality": {metric: score}}`.
        """

    def search_group_alphas(
        self, finetuned: Path, groups: int, mean_alpha: float, experiment: ExperimentArguments
    ) -> GroupSearch:
        """HMA's ratio search on this recipe's model and data, for an HMA point (`hma_groups`).

        Recipes that offer HMA points override it: samples from `experiment.hma_max_samples`
        training examples (`hma_samples`: the fine-tuned model's answers or the data's targets),
        the model's loss on them, `experiment.hma_steps` steps (`hf_specgen.merge.search_group_alphas`
        for causal LMs; `optimize_group_alphas` with a loss of its own otherwise).

        Args:
            finetuned: the full fine-tuned model's directory (a LoRA run's adapter already merged).
            groups: K, the number of ratios.
            mean_alpha: their fixed mean.
            experiment: the options (`hma_samples`, `hma_max_samples`, `hma_steps`).

        Returns:
            The `GroupSearch` whose ratios the loop merges and scores.
        """
        raise NotImplementedError(f"{self.name} has no HMA ratio search")

    def hma_fingerprint(self) -> dict[str, Any]:
        """The recipe's own options that change its HMA search's samples (keys the HMA records).

        Returns:
            `{name: value}`; default none.
        """
        return {}

    @abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """Everything besides the training arguments that changes the fine-tuned model (keys the runs).

        The options it reads are accounted for; the ones no fingerprint reads key the runs anyway
        (`unclaimed_options`), unless `unkeyed_fields` names them.

        Returns:
            `{name: value}`, e.g. the recipe's name, model and training data.
        """

    @abstractmethod
    def eval_fingerprint(self) -> dict[str, Any]:
        """Everything that changes the scores of a given model (keys the records: new suites re-score, not retrain).

        Returns:
            `{name: value}`, e.g. the evaluation suites and their limits.
        """

    def unclaimed_options(self) -> dict[str, Any]:
        """The options that key the runs by themselves: the fields of `arguments` that none of the
        fingerprints (`fingerprint`, `eval_fingerprint`, `hma_fingerprint`, `algorithm_fingerprint` of
        each of `algorithms`) reads and that `unkeyed_fields` does not name.

        Returns:
            `{field: value}`, in the dataclass's order; empty when every field is accounted for (then
            the run keys are the fingerprints' alone).
        """
        read = self._fingerprinted_fields()
        return {
            f.name: getattr(self.options, f.name)
            for f in dataclasses.fields(self.arguments)
            if f.name not in read and f.name not in self.unkeyed_fields
        }

    def _fingerprinted_fields(self) -> set[str]:
        """The fields of `options` that the fingerprints read (computed with a recorder in its place)."""
        options, recorder = self.options, _ReadRecorder(self.options)
        self.options = recorder
        try:
            self.fingerprint()
            self.eval_fingerprint()
            self.hma_fingerprint()
            for algorithm in self.algorithms:
                self.algorithm_fingerprint(algorithm)
        finally:
            self.options = options
        return recorder.read


class _ReadRecorder:
    """Stands in for a recipe's options and records which of them are read."""

    def __init__(self, options: Any) -> None:
        self._options, self.read = options, set()

    def __getattr__(self, name: str) -> Any:
        self.read.add(name)
        return getattr(self._options, name)
