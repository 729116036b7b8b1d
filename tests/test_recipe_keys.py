"""Run keys come from the recipe's options dataclass: a new option keys the runs unless it is declared
result-free (`unkeyed_fields`), so that no option can be forgotten and reuse runs made without it."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hf_specgen import SpecGenTrainingArguments
from hf_specgen.experiment import ExperimentArguments, Method, Recipe
from hf_specgen.experiment.runner import run_key


RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@dataclass
class ToyOptions:
    model_name_or_path: str = "toy-model"
    dataset_name: str = "toy-data"
    eval_suites: list[str] = field(default_factory=lambda: ["toy-suite"])
    eval_batch_size: int = 8


@dataclass
class GrownOptions(ToyOptions):
    """`ToyOptions` with an option added later, which no fingerprint was taught to read."""

    new_option: int = 1


class ToyRecipe(Recipe):
    name = "toy"
    arguments = ToyOptions
    unkeyed_fields = ("eval_batch_size",)

    def prepare(self):
        raise NotImplementedError

    def load_model(self):
        raise NotImplementedError

    def build_trainer(self, model, processor, args, algorithm=None):
        raise NotImplementedError

    def evaluate(self, model_dir):
        raise NotImplementedError

    def fingerprint(self):
        return {"recipe": self.name, "model": self.options.model_name_or_path, "data": self.options.dataset_name}

    def eval_fingerprint(self):
        return {"suites": self.options.eval_suites}


class GrownRecipe(ToyRecipe):
    arguments = GrownOptions


class GrownUnkeyedRecipe(ToyRecipe):
    arguments = GrownOptions
    unkeyed_fields = ("eval_batch_size", "new_option")


def key(recipe: Recipe, tmp_path: Path) -> str:
    training = SpecGenTrainingArguments(output_dir=str(tmp_path), l2_lambda=0.1, report_to=[], use_cpu=True)
    return run_key(recipe, Method.parse("l2"), training, ExperimentArguments(), lora_r=16)


def test_every_option_is_read_by_a_fingerprint_or_declared_unkeyed():
    recipe = ToyRecipe(ToyOptions(), seed=0)
    assert recipe.unclaimed_options() == {}
    assert recipe.options == ToyOptions()  # the recorder is gone again


def test_a_new_option_keys_the_runs_and_an_unkeyed_one_does_not(tmp_path):
    today = key(ToyRecipe(ToyOptions(), seed=0), tmp_path)
    assert key(ToyRecipe(ToyOptions(eval_batch_size=64), seed=0), tmp_path) == today
    assert key(ToyRecipe(ToyOptions(dataset_name="other"), seed=0), tmp_path) != today

    grown = GrownRecipe(GrownOptions(), seed=0)
    assert grown.unclaimed_options() == {"new_option": 1}
    assert key(grown, tmp_path) != today
    assert key(GrownRecipe(GrownOptions(new_option=2), seed=0), tmp_path) != key(grown, tmp_path)

    unkeyed = GrownUnkeyedRecipe(GrownOptions(new_option=2), seed=0)
    assert unkeyed.unclaimed_options() == {}
    assert key(unkeyed, tmp_path) == today


@pytest.mark.parametrize("name", ["alignment_tax", "clip_imagenet", "galactica_med"])
def test_the_shipped_recipes_account_for_every_option(name, monkeypatch):
    """Their fingerprints read every option but the declared result-free ones: their run keys stay today's."""
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    (recipe_class,) = [
        value
        for value in vars(module).values()
        if isinstance(value, type) and issubclass(value, Recipe) and value.__module__ == spec.name
    ]
    assert recipe_class(recipe_class.arguments(), seed=0).unclaimed_options() == {}
