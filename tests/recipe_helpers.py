"""What the recipe tests share: the tiny presets reduced to one point, the recipes loaded as modules or
launched as users launch them, their run directories, an interrupted training, a configuration's
one-line stop message."""

import dataclasses
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from launch_helpers import ENV, ROOT, accelerate_launch
from transformers import TrainerCallback

from hf_specgen import SpecGenTrainingArguments
from hf_specgen.experiment import ExperimentArguments, parse_config, run_experiment
from hf_specgen.experiment.grid import GRID_FIELDS


RECIPE_CONFIGS = ROOT / "recipes" / "configs"


def single_point(preset: str) -> Path:
    """The tiny preset without the demo's sweep: the first value of each strength list and no early-stopping
    points; the base of the tests that run a recipe (a test that wants a sweep asks for it)."""
    values = yaml.safe_load((RECIPE_CONFIGS / preset).read_text())
    values = {
        k: v[0] if k in GRID_FIELDS and isinstance(v, list) else v for k, v in values.items() if k != "eval_fractions"
    }
    path = Path(tempfile.mkdtemp(prefix="hf_specgen_presets_")) / preset
    path.write_text(yaml.safe_dump(values))
    return path


TINY_LM, TINY_CLIP = single_point("galactica_med_tiny.yaml"), single_point("clip_tiny.yaml")


def load_recipe(name: str):
    """`recipes/<name>.py`, imported as the module `name`."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while they are defined
    spec.loader.exec_module(module)
    return module


def launch(script: str, output_dir: Path, *args: str, processes: int = 1, config: str | None = None) -> str:
    """`recipes/<script>` run to success under `accelerate launch` (`accelerate_launch(processes, config)`)
    into `output_dir`, then `args`; its stdout."""
    run = subprocess.run(
        [
            *accelerate_launch(processes, config),
            str(ROOT / "recipes" / script),
            "--output_dir",
            str(output_dir),
            *args,
        ],
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return run.stdout


def run_files(output_dir: Path, pattern: str) -> list[Path]:
    """The paths of a recipe's output matching `runs/<pattern>`, sorted."""
    return sorted(output_dir.glob(f"runs/{pattern}"))


class Interrupt(Exception):
    """Raised by `InterruptAt`: the training stops as if interrupted."""


class InterruptAt(TrainerCallback):
    """Raises `Interrupt` at the end of optimizer step `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupt(f"stopped at step {self.step}")


def lm_experiment(output_dir: Path, **overrides):
    """The tiny Galactica-MedMCQA recipe, in-process: L2 at alphas 0.5 and 1, 4 steps with a checkpoint
    every 2, into `output_dir`; `overrides` replace training arguments. (recipe, experiment, training)."""
    module = load_recipe("galactica_med")
    options, experiment, training = parse_config(
        (module.MedMCQAArguments, ExperimentArguments, SpecGenTrainingArguments),
        [
            "--config",
            str(TINY_LM),
            "--hma_groups",
            "0",
            "--output_dir",
            str(output_dir),
            "--methods",
            "l2",
            "--alphas",
            "0.5",
            "1",
            "--max_steps",
            "4",
            "--save_strategy",
            "steps",
            "--save_steps",
            "2",
            "--eval_limit",
            "4",
            "--l2_lambda",
            "1",
            "--disable_tqdm",
            "true",
            "--logging_steps",
            "1",
        ],
    )
    training = dataclasses.replace(training, **overrides)
    return module.GalacticaMed(options, training.seed), experiment, training


def interrupt_training(recipe, experiment, training, step: int = 3) -> None:
    """Runs the experiment with its training stopped (an exception) at `step`, as an interrupted run."""
    build = recipe.build_trainer
    recipe.build_trainer = lambda *a, **k: (t := build(*a, **k), t.add_callback(InterruptAt(step)))[0]
    try:
        with pytest.raises(Interrupt):
            run_experiment(recipe, experiment, training)
    finally:
        recipe.build_trainer = build


def stop_message(main, argv: list[str]) -> str:
    """The message a recipe's `main(argv)` stops with: one line, through `SystemExit`."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert isinstance(stop.value.code, str), stop.value.code
    assert len(stop.value.code.splitlines()) == 1, stop.value.code
    return stop.value.code
