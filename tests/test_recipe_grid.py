"""Strength grids and early-stopping points in the recipes: each `<name>_lambda` and `lora_r` may be a
list (YAML or command line), every method trains at each of its strengths (product or paired for
combinations), the checkpoints saved at `eval_fractions` of training are scored as extra points,
and re-runs, keys and publishing work per (method, strength, alpha) point."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import FakeHub
from recipe_helpers import lm_experiment, load_recipe, run_files
from safetensors.torch import load_file
from transformers import TrainerCallback

from hf_specgen import SpecGenTrainingArguments
from hf_specgen.eval.records import ResultRecord
from hf_specgen.experiment import ConfigError, ExperimentArguments, parse_config, run_experiment
from hf_specgen.experiment.early_stopping import fraction_step
from hf_specgen.experiment.grid import GRID_FIELDS, expand_points, grid_summary
from hf_specgen.experiment.methods import Method
from hf_specgen.merge import merge
from hf_specgen.tiny import lm_path


DEFAULTS = {
    "l1_lambda": 0.0,
    "l2_lambda": 0.01,
    "kd_lambda": 1.0,
    "ewc_lambda": 0.0,
    "mas_lambda": 0.0,
    "feature_lambda": 0.0,
    "lora_r": 16,
}


def points(names, grids, combination="product"):
    return expand_points([Method.parse(n) for n in names], grids, DEFAULTS, combination)


def test_every_method_trains_at_each_of_its_strengths_and_combinations_take_the_product():
    grid = {"l2_lambda": [0.001, 0.01, 0.1], "kd_lambda": [1.0, 10.0], "lora_r": [4, 16]}
    expanded = points(["full", "l2", "kd+l2", "lora", "full+ema"], grid)
    assert [p.describe() for p in expanded] == [
        "full",
        "l2 (l2_lambda=0.001)",
        "l2 (l2_lambda=0.01)",
        "l2 (l2_lambda=0.1)",
        "kd+l2 (kd_lambda=1, l2_lambda=0.001)",
        "kd+l2 (kd_lambda=1, l2_lambda=0.01)",
        "kd+l2 (kd_lambda=1, l2_lambda=0.1)",
        "kd+l2 (kd_lambda=10, l2_lambda=0.001)",
        "kd+l2 (kd_lambda=10, l2_lambda=0.01)",
        "kd+l2 (kd_lambda=10, l2_lambda=0.1)",
        "lora (lora_r=4)",
        "lora (lora_r=16)",
        "full+ema",
    ]
    assert grid_summary(expanded).startswith("13 trainings: full 1, l2 3 (l2_lambda 0.001, 0.01, 0.1), kd+l2 6 (")


def test_paired_combinations_take_the_ith_values_together_and_one_value_pairs_with_every_position():
    expanded = points(["kd+l2", "lora+l2"], {"l2_lambda": [0.001, 0.1], "kd_lambda": [1.0, 10.0]}, "paired")
    assert [p.values for p in expanded] == [
        {"kd_lambda": 1.0, "l2_lambda": 0.001},
        {"kd_lambda": 10.0, "l2_lambda": 0.1},
        {"l2_lambda": 0.001, "lora_r": 16},
        {"l2_lambda": 0.1, "lora_r": 16},
    ]
    with pytest.raises(
        ValueError, match=r"kd\+l2: strength_combination paired needs lists of one length .*kd_lambda 3, l2_lambda 2"
    ):
        points(["kd+l2"], {"l2_lambda": [0.001, 0.1], "kd_lambda": [1.0, 2.0, 3.0]}, "paired")


def test_a_method_without_a_list_trains_once_at_its_single_strength():
    assert [p.values for p in points(["l2", "kd"], {"lora_r": [4, 8]})] == [{"l2_lambda": 0.01}, {"kd_lambda": 1.0}]


@pytest.mark.parametrize(
    "grid, message",
    [
        ({"l2_lambda": []}, "l2_lambda is an empty list"),
        ({"l2_lambda": [0.1, float("nan")]}, "l2_lambda must be finite numbers"),
        ({"l2_lambda": [0.1, float("inf")]}, "l2_lambda must be finite numbers"),
        ({"l2_lambda": [0.0, 0.1]}, r"l2_lambda must be numbers > 0"),
        ({"l2_lambda": [0.1, 0.1]}, r"l2_lambda \[0.1, 0.1\] repeats a value"),
        ({"lora_r": [4, 4.5]}, "lora_r must be whole numbers > 0"),
        ({"learning_rate": [0.1, 0.2]}, r"\['learning_rate'\] cannot be lists"),
    ],
)
def test_bad_grids_are_refused_naming_the_option(grid, message):
    with pytest.raises(ValueError, match=message):
        points(["l2", "lora"], grid)


def test_grid_fields_are_every_regularizers_strength_and_the_lora_rank():
    assert set(GRID_FIELDS) == {
        "l1_lambda",
        "l2_lambda",
        "ewc_lambda",
        "mas_lambda",
        "kd_lambda",
        "feature_lambda",
        "lora_r",
    }


def test_averaged_methods_parse_and_need_a_training():
    assert Method.parse("full+ema").average == "ema" and Method.parse("l2+sma").regularizers == ("l2",)
    assert Method.parse("lora+l2+ema").strength_fields == ("l2_lambda", "lora_r")
    with pytest.raises(ValueError, match="name the training too, e.g. full\\+ema"):
        Method.parse("ema")
    for bad in ("ema+sma", "full+l2", "full+ema+ema", "swa"):
        with pytest.raises(ValueError, match="unknown method"):
            Method.parse(bad)


def parsed(tmp_path, yaml_text, *argv):
    module = load_recipe("galactica_med")
    preset = tmp_path / "preset.yaml"
    preset.write_text(yaml_text)
    types = (module.MedMCQAArguments, ExperimentArguments, SpecGenTrainingArguments)
    return parse_config(
        types, ["--config", str(preset), "--output_dir", str(tmp_path), *argv], grid_fields=GRID_FIELDS
    )


def test_lists_in_the_yaml_and_on_the_command_line_become_grids(tmp_path):
    *_, training, grids = parsed(tmp_path, "l2_lambda: [1.0e-3, '1e-2']\nlora_r: [4, 8]\nkd_lambda: 2\n")
    assert (
        grids == {"l2_lambda": [0.001, 0.01], "lora_r": [4, 8]}
        and training.l2_lambda == 0.001
        and training.kd_lambda == 2.0
    )
    _, experiment, training, grids = parsed(
        tmp_path,
        "l2_lambda: [1.0e-3, 1.0e-2]\n",
        "--l2_lambda",
        "0.5",
        "2",
        "--kd_lambda=3",
        "--lora_r",
        "2",
        "--methods",
        "l2",
    )
    assert grids == {
        "l2_lambda": [0.5, 2.0],
        "kd_lambda": [3.0],
        "lora_r": [2],
    }  # the command line replaces the file's list
    assert (training.l2_lambda, training.kd_lambda, experiment.lora_r, experiment.methods) == (0.5, 3.0, 2, ["l2"])
    module = load_recipe("galactica_med")
    plain = parse_config(
        (module.MedMCQAArguments, ExperimentArguments, SpecGenTrainingArguments), ["--output_dir", str(tmp_path)]
    )
    assert len(plain) == 3  # without grid_fields: the instances only


@pytest.mark.parametrize(
    "yaml_text, argv, message",
    [
        ("l2_lambda: []\n", [], "invalid value \\[\\] for l2_lambda: an empty list"),
        ("", ["--l2_lambda", "--methods", "l2"], "--l2_lambda needs one value or more"),
        (
            "",
            ["--l2_lambda", "0.1", "x"],
            r"--l2_lambda 0.1 x: numbers expected \(could not convert string to float: 'x'\)",
        ),
        ("", ["--lora_r", "4", "4.5"], r"--lora_r 4 4.5: whole numbers expected"),
        (
            "",
            ["--learning_rate", "1e-3", "2e-3"],
            r"unknown arguments \['2e-3'\] \(only l1_lambda, .*lora_r take several values\)",
        ),
        ("lora_r: [4, many]\n", [], "invalid value .* for lora_r"),
        ("learning_rate: [0.1, 0.2]\n", [], "invalid value .* for learning_rate: a list where one value is expected"),
    ],
)
def test_bad_lists_stop_the_configuration(tmp_path, yaml_text, argv, message):
    with pytest.raises(ConfigError, match=message):
        parsed(tmp_path, yaml_text, *argv)


class Snapshot(TrainerCallback):
    """The trained weights at `step`, to compare with the early-stopping checkpoint saved there."""

    def __init__(self, step: int) -> None:
        self.step, self.weights = step, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """l2 at two strengths and LoRA at two ranks, 4 steps each, alpha 1, early points at 0.25 and 0.5 of training."""
    output_dir = tmp_path_factory.mktemp("swept") / "grid"
    recipe, experiment, training = lm_experiment(output_dir, save_strategy="no")
    experiment = dataclasses.replace(experiment, methods=["l2", "lora"], alphas=[1.0], eval_fractions=[0.25, 0.5])
    experiment.strength_grids = {"l2_lambda": [0.1, 1.0], "lora_r": [2, 4]}
    snapshots = []
    build = recipe.build_trainer

    def with_snapshot(*args, **kwargs):
        trainer = build(*args, **kwargs)
        snapshots.append(Snapshot(2))
        trainer.add_callback(snapshots[-1])
        return trainer

    recipe.build_trainer = with_snapshot
    records = run_experiment(recipe, experiment, training)
    recipe.build_trainer = build
    return output_dir, (recipe, experiment, training), records, snapshots


def test_each_strength_is_its_own_run_and_its_records_carry_it(swept):
    output_dir, _, records, _ = swept
    assert len(run_files(output_dir, "l2-*/finetuned")) == 2 and len(run_files(output_dir, "lora-*/finetuned")) == 2
    merged = {(r.method, tuple(sorted(r.strengths.items()))) for r in records if r.alpha == 1.0}
    assert merged == {
        ("l2", (("l2_lambda", 0.1),)),
        ("l2", (("l2_lambda", 1.0),)),
        ("lora", (("lora_r", 2.0),)),
        ("lora", (("lora_r", 4.0),)),
    }
    for run in run_files(output_dir, "lora-*/finetuned"):
        rank = json.loads((run / "adapter_config.json").read_text())["r"]
        (record,) = [ResultRecord.load(p) for p in (run.parent).glob("records-*/alpha-1.json")]
        assert record.strengths == {"lora_r": float(rank)} and record.value == float(rank)


def test_early_points_score_the_checkpoint_saved_at_their_fraction(swept):
    output_dir, _, records, snapshots = swept
    early = [r for r in records if r.checkpoint is not None]
    assert len(early) == 8 and all(r.alpha is None for r in early)  # 4 runs x 2 fractions
    assert {(r.checkpoint["fraction"], r.checkpoint["step"], r.checkpoint["steps"]) for r in early} == {
        (0.25, 1, 4),
        (0.5, 2, 4),
    }
    assert fraction_step(0.25, 4) == 1 and fraction_step(0.5, 4) == 2 and fraction_step(0.01, 4) == 1
    by_strength = {0.1: snapshots[0].weights, 1.0: snapshots[1].weights}  # trained in the grid's order
    for run in run_files(output_dir, "l2-*"):  # the scored model is the checkpoint, holding the weights of step 2
        (record,) = [ResultRecord.load(p) for p in run.glob("records-*/early-0.5.json")]
        assert Path(record.model) == run / "early" / "fraction-0.5"
        saved = load_file(Path(record.model) / "model.safetensors")
        weights = by_strength[record.strengths["l2_lambda"]]
        assert all(torch.equal(weights[k], v) for k, v in saved.items())
        final = load_file(run / "finetuned" / "model.safetensors")
        assert any(not torch.equal(final[k], saved[k]) for k in saved)  # steps 3 and 4 moved it


def test_a_rerun_retrains_nothing_and_a_new_fraction_is_said_not_trained(swept, capsys):
    output_dir, (recipe, experiment, training), _, _ = swept
    files = run_files(output_dir, "*/finetuned/*") + run_files(output_dir, "*/records-*/*.json")
    stamps = {p: p.stat().st_mtime_ns for p in files}
    more = dataclasses.replace(experiment, eval_fractions=[0.25, 0.5, 0.75])
    more.strength_grids = experiment.strength_grids
    records = run_experiment(recipe, more, training)
    out = capsys.readouterr().out
    assert "4 trainings: l2 2 (l2_lambda 0.1, 1), lora 2 (lora_r 2, 4); 4 already trained" in out
    assert out.count("trained without a checkpoint at eval_fractions 0.75") == 4
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    assert len([r for r in records if r.checkpoint is not None]) == 8


def test_publishing_picks_a_point_of_one_strength_and_merges_that_runs_model(swept, tmp_path):
    output_dir, (recipe, experiment, training), records, _ = swept
    hub = FakeHub()
    publishing = dataclasses.replace(training, push_to_hub=True, hub_model_id="me/grid")
    chosen = dataclasses.replace(experiment)
    chosen.strength_grids = experiment.strength_grids
    again = run_experiment(recipe, chosen, publishing, hub_api=hub)
    (upload,) = hub.uploads
    from hf_specgen.eval.pareto import best_generality

    pick = best_generality([r for r in again if r.method != "pre-trained"], experiment.keep_speciality)
    runs = [
        p
        for p in run_files(output_dir, f"{pick.method}-*")
        if any(ResultRecord.load(q).strengths == pick.strengths for q in p.glob("records-*/alpha-1.json"))
    ]
    (run,) = runs
    trained = (
        run / "finetuned" if pick.checkpoint is None else run / "early" / f"fraction-{pick.checkpoint['fraction']:g}"
    )
    expected = merge(lm_path(), trained, 1.0 if pick.alpha is None else pick.alpha, tmp_path / "expected")
    assert upload["files"]["model.safetensors"] == (expected / "model.safetensors").read_bytes()


def test_bad_grids_and_fractions_stop_before_training(tmp_path):
    recipe, experiment, training = lm_experiment(tmp_path / "bad")
    experiment.strength_grids = {"l2_lambda": [0.1, -1.0]}
    with pytest.raises(ConfigError, match="l2_lambda must be numbers > 0"):
        run_experiment(recipe, experiment, training)
    for fractions, message in (([0.5, 1.0], r"eval_fractions must lie in \(0, 1\)"), ([0.5, 0.5], "repeat a value")):
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(experiment, eval_fractions=fractions)
    assert not (tmp_path / "bad").exists()
