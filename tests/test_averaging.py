"""`WeightAveraging`: EMA and SMA of the trainable weights against a hand computation over the weights of each step,
LoRA (only the adapter averaged), `swapped`, a resumed run bitwise equal to an uninterrupted one, the options it
refuses, and a 2-process DeepSpeed ZeRO-3 run (each rank averaging its own partitions) equal to one process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import lm_dataset, make_args, perturb_, tiny_opt
from launch_helpers import ENV, ROOT, accelerate_launch
from peft import LoraConfig, get_peft_model
from transformers import OPTForCausalLM, TrainerCallback

from hf_specgen import SpecGenTrainer
from hf_specgen.averaging import WeightAveraging, state_file


SCRIPT = ROOT / "tests" / "scripts" / "train_averaging.py"
STEPS = 5


class Snapshots(TrainerCallback):
    """The trainable weights in float64 at the start (index 0) and after each optimizer step (index t)."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights = [trainable(model)]

    def on_step_end(self, args, state, control, model=None, **kwargs):
        assert len(self.weights) == state.global_step
        self.weights.append(trainable(model))


class StopAt(TrainerCallback):
    """Ends training after optimizer step `step`, as an interrupted run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step == self.step


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad}


def train(output_dir: Path, *callbacks: TrainerCallback, model=None, steps: int = STEPS, resume=None, **kwargs):
    """SGD (lr 0.1 unless given) on tiny OPT for `steps` steps with `callbacks`; the trainer once trained."""
    args = make_args(
        output_dir, **{"max_steps": steps, "optim": "sgd", "learning_rate": 0.1, "logging_steps": 100, **kwargs}
    )
    trainer = SpecGenTrainer(
        model=model or tiny_opt(), args=args, train_dataset=lm_dataset(), callbacks=list(callbacks)
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def averaged_run(tmp_path: Path, averaging: WeightAveraging, model=None, **kwargs):
    """Trains with `averaging`; the weights of every step and the trainable weights `save_model` wrote."""
    snapshots = Snapshots()
    trainer = train(tmp_path / "run", snapshots, averaging, model=model, **kwargs)
    trainer.save_model(tmp_path / "saved")
    saved = OPTForCausalLM.from_pretrained(tmp_path / "saved").state_dict()
    return snapshots.weights, {n: saved[n] for n in snapshots.weights[0]}


def ema(weights: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    average = dict(weights[0])
    for step in weights[1:]:
        average = {n: decay * average[n] + (1 - decay) * step[n] for n in average}
    return average


def mean(weights: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {n: sum(w[n] for w in weights) / len(weights) for n in weights[0]}


def assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert set(actual) == set(expected)
    for name, value in expected.items():
        assert torch.allclose(actual[name].double(), value, atol=atol, rtol=0), name


def assert_differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert max((a[n].double() - b[n].double()).abs().max().item() for n in a) > 1e-3


# ---- 1: EMA and SMA by hand ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (dict(kind="ema", ema_decay=0.7), lambda w: ema(w, 0.7)),
        (dict(kind="sma", sma_start=0.5), lambda w: mean(w[math.ceil(0.5 * STEPS) :])),  # steps 3, 4, 5
        (dict(kind="sma", sma_start=0.0, sma_window=2), lambda w: mean(w[-2:])),  # the window replaces sma_start
    ],
    ids=["ema", "sma", "sma_window"],
)
def test_saved_model_is_the_hand_computed_average(options, expected, tmp_path):
    weights, saved = averaged_run(tmp_path, WeightAveraging(**options))
    assert len(weights) == STEPS + 1
    assert_close(saved, expected(weights))
    assert_differ(saved, weights[-1])  # an average, not the trained weights


@pytest.mark.parametrize(
    "options", [dict(kind="ema", ema_decay=0.0), dict(kind="sma", sma_window=1)], ids=["ema", "sma"]
)
def test_degenerate_averages_are_the_final_weights(options, tmp_path):
    weights, saved = averaged_run(tmp_path, WeightAveraging(**options))
    assert all(torch.equal(saved[n].double(), w) for n, w in weights[-1].items())


def test_swapped_puts_the_average_in_for_a_while(tmp_path):
    """Mid-training (step 3): the EMA so far inside the block, the trained weights bitwise after it."""
    averaging, seen = WeightAveraging("ema", ema_decay=0.5), {}

    class SwapAt3(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 3:
                seen["before"] = trainable(model)
                with averaging.swapped(model) as swapped:
                    seen["inside"] = trainable(swapped)
                seen["after"] = trainable(model)

    snapshots = Snapshots()
    train(tmp_path, snapshots, averaging, SwapAt3())
    assert_close(seen["inside"], ema(snapshots.weights[:4], 0.5))
    assert all(torch.equal(seen["after"][n], w) for n, w in seen["before"].items())
    assert_differ(seen["inside"], seen["before"])


def test_sma_before_its_first_step_keeps_the_weights():
    """No average before s0 (step 3 of 6 here): the model's own weights stay, with a warning."""
    model, averaging = tiny_opt(), WeightAveraging("sma", sma_start=0.5)
    before = trainable(model)
    averaging.reset(model)
    averaging.update(model, 2, 6)
    with pytest.warns(UserWarning, match="no average yet at step 2"), averaging.swapped(model):
        assert all(torch.equal(w, before[n]) for n, w in trainable(model).items())
    assert averaging.count == 0 and not averaging.averages


# ---- 2: LoRA -------------------------------------------------------------------------------------


def test_lora_averages_only_the_adapter(tmp_path):
    model = get_peft_model(tiny_opt(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    perturb_(model, scale=0.3)  # B starts at zero: move the adapter off it
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    averaging, snapshots = WeightAveraging("ema", ema_decay=0.6), Snapshots()
    train(tmp_path, snapshots, averaging, model=model, steps=4, learning_rate=1.0)
    assert set(averaging.averages) == set(snapshots.weights[0]) and all("lora_" in n for n in averaging.averages)
    assert_close(trainable(model), ema(snapshots.weights, 0.6))
    assert_differ(trainable(model), snapshots.weights[-1])
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


# ---- 3: resume -----------------------------------------------------------------------------------

RESUMED = dict(steps=6, save_strategy="steps", save_steps=2)


@pytest.mark.parametrize(
    "options", [dict(kind="ema", ema_decay=0.7), dict(kind="sma", sma_start=0.5)], ids=["ema", "sma"]
)
def test_resumed_run_ends_with_the_uninterrupted_average(options, tmp_path):
    """Interrupted at step 5, resumed from checkpoint-4 (SMA: started at step 3, 2 steps in the saved mean)."""
    full = WeightAveraging(**options)
    train(tmp_path / "full", full, **RESUMED)
    train(tmp_path / "cut", WeightAveraging(**options), StopAt(5), **RESUMED)
    resumed = WeightAveraging(**options)
    trainer = train(tmp_path / "cut", resumed, resume=True, **RESUMED)
    assert (resumed.step, resumed.count) == (full.step, full.count) == (6, 6 if options["kind"] == "ema" else 4)
    assert all(torch.equal(resumed.averages[n], a) for n, a in full.averages.items())
    assert all(torch.equal(p, full.averages[n]) for n, p in trainer.model.named_parameters())  # written at the end

    elsewhere = WeightAveraging(**options)  # a checkpoint outside output_dir: named in the arguments too
    checkpoint = str(tmp_path / "cut" / "checkpoint-4")
    train(tmp_path / "elsewhere", elsewhere, resume=checkpoint, resume_from_checkpoint=checkpoint, **RESUMED)
    assert all(torch.equal(elsewhere.averages[n], a) for n, a in full.averages.items())

    other = {**options, "ema_decay": 0.5} if options["kind"] == "ema" else {**options, "sma_start": 0.2}
    with pytest.raises(ValueError, match="ema_decay" if options["kind"] == "ema" else "sma_start"):
        train(tmp_path / "cut", WeightAveraging(**other), resume=checkpoint, **RESUMED)


def test_resuming_a_checkpoint_without_the_average_is_refused(tmp_path):
    train(tmp_path, steps=2, save_strategy="steps", save_steps=2)
    assert not os.path.exists(state_file(str(tmp_path / "checkpoint-2")))
    with pytest.raises(FileNotFoundError, match="specgen_weight_average-rank0.pt is missing.*without WeightAveraging"):
        train(tmp_path, WeightAveraging("ema"), steps=4, resume=True)


# ---- 4: options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (dict(kind="ema", ema_decay=1.0), "ema_decay"),
        (dict(kind="ema", ema_decay=-0.1), "ema_decay"),
        (dict(kind="ema", ema_decay=float("nan")), "ema_decay"),
        (dict(kind="sma", sma_start=1.0), "sma_start"),
        (dict(kind="sma", sma_window=0), "sma_window"),
        (dict(kind="ema", sma_window=3), "sma_window"),
        (dict(kind="ema", device="nowhere"), "device"),
        (dict(kind="swa"), "kind must be one of 'ema', 'sma'"),
    ],
)
def test_bad_options_are_refused_by_name(options, named):
    with pytest.raises(ValueError, match=named):
        WeightAveraging(**options)


def test_sma_first_step():
    assert [WeightAveraging("sma", sma_start=s).first_step(6) for s in (0.0, 0.5, 0.51, 0.99)] == [1, 3, 4, 6]
    assert [WeightAveraging("sma", sma_window=w).first_step(6) for w in (1, 6, 10)] == [6, 1, 1]


# ---- 5: DeepSpeed ZeRO-3 -------------------------------------------------------------------------


def launched(tmp_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """`tests/scripts/train_averaging.py` (EMA, 4 steps, a checkpoint every 2) in one process (`tmp_path/one`) and
    in 2 under ZeRO-3 (`tmp_path/two`), launched together: the consolidated averaged weights of each."""
    runs = {}
    for name, launcher in (("one", [sys.executable]), ("two", accelerate_launch(2, "zero3"))):
        with open(tmp_path / f"{name}.log", "w") as log:
            command = [*launcher, str(SCRIPT), str(tmp_path / name), "--save-steps", "2"]
            runs[name] = subprocess.Popen(command, env=ENV, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    for name, run in runs.items():
        assert run.wait(timeout=600) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    return tuple(torch.load(tmp_path / name / "weights.pt") for name in runs)


def evaluated(output_dir: Path) -> dict:
    return json.loads((output_dir / "result.json").read_text())


def test_zero3_average_matches_one_process(tmp_path):
    """Each rank averages its own partitions (about half of each weight, in its own state file); the saved averaged
    model is one process's, and so is a forward of it after training: the small weights DeepSpeed also keeps whole on
    every rank (persistent, below stage3_param_persistence_threshold) are gathered again from the averaged
    partitions."""
    one, two = launched(tmp_path)
    assert set(one) == set(two)
    for name, weight in one.items():
        assert torch.allclose(weight, two[name], atol=1e-5), name
    saved = OPTForCausalLM.from_pretrained(tmp_path / "two" / "model").state_dict()
    assert all(torch.equal(saved[n], two[n]) for n in saved)
    (one_run, two_run) = evaluated(tmp_path / "one"), evaluated(tmp_path / "two")
    assert (one_run["zero3"], two_run["zero3"], two_run["world_size"]) == (False, True, 2)
    assert two_run["eval_loss"] == pytest.approx(
        one_run["eval_loss"], rel=1e-6
    )  # a forward reads the whole weights too
    whole = torch.load(state_file(str(tmp_path / "one" / "checkpoint-2"), 0))["averages"]
    ranks = [torch.load(state_file(str(tmp_path / "two" / "checkpoint-2"), r))["averages"] for r in (0, 1)]
    for name, average in whole.items():  # flat partitions, the last rank's padded
        assert ranks[0][name].shape == ranks[1][name].shape == (math.ceil(average.numel() / 2),), name
        assert torch.allclose(
            torch.cat([ranks[0][name], ranks[1][name]])[: average.numel()], average.flatten(), atol=1e-5
        )
