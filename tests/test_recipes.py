"""The recipes end to end on the tiny presets (reduced grids, a few steps): through `accelerate
launch` as users run them, re-runs that skip what is done and resume what is not, publishing, and
configurations that stop before training with one clear message."""

import dataclasses
import json
import re
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
from conftest import FakeHub
from recipe_helpers import (
    RECIPE_CONFIGS,
    TINY_CLIP,
    TINY_LM,
    interrupt_training,
    launch,
    lm_experiment,
    load_recipe,
    run_files,
    stop_message,
)
from safetensors.torch import load_file

from hf_specgen import SpecGenTrainingArguments
from hf_specgen.eval.pareto import best_generality
from hf_specgen.eval.records import ResultRecord
from hf_specgen.experiment import ConfigError, ExperimentArguments, Method, parse_config, parse_methods, run_experiment
from hf_specgen.experiment.grid import GRID_FIELDS
from hf_specgen.merge import wise_ft
from hf_specgen.tiny import GENERAL_TASKS, clip_path, lm_path
from hf_specgen.tiny.names import tiny_dataset


LM_ARGS = [
    "--config",
    str(TINY_LM),
    "--hma_groups",
    "0",
    "--methods",
    "full",
    "l2",
    "--alphas",
    "0",
    "0.5",
    "1",
    "--max_steps",
    "3",
    "--eval_limit",
    "8",
    "--l2_lambda",
    "10",
    "--disable_tqdm",
    "true",
]


@pytest.fixture(scope="module")
def lm_demo(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("lm") / "demo"
    return output_dir, launch("galactica_med.py", output_dir, *LM_ARGS)


def test_lm_recipe_writes_records_report_and_summaries(lm_demo):
    output_dir, stdout = lm_demo
    report = json.loads((output_dir / "report.json").read_text())
    points = {(r["method"], r["alpha"]) for r in report["records"]}
    assert points == {("pre-trained", None), ("full", 0.5), ("full", 1.0), ("l2", 0.5), ("l2", 1.0)}
    assert [r["model"] for r in report["records"] if r["method"] == "pre-trained"] == ["hf_specgen/tiny-galactica"]
    for record in report["records"]:
        assert set(record["speciality"]) == {"tiny_medmcqa"} and set(record["generality"]) == set(GENERAL_TASKS)
    assert all(
        r["hyperparameter"] == "l2_lambda" and r["value"] == 10.0 for r in report["records"] if r["method"] == "l2"
    )
    assert (
        len(run_files(output_dir, "*/records-*/alpha-*.json")) == 4
        and len(run_files(output_dir, "pre-trained/*/record.json")) == 1
    )
    assert "| l2 | l2_lambda=10, alpha=0.5 |" in (output_dir / "report.md").read_text()
    assert (output_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summaries = [line for line in stdout.splitlines() if line.startswith("[galactica_med] ")]
    assert [line.split(":")[0] for line in summaries] == [
        "[galactica_med] pre-trained",
        "[galactica_med] 2 trainings",
        "[galactica_med] full",
        "[galactica_med] l2 (l2_lambda=10)",
    ]
    assert summaries[1] == "[galactica_med] 2 trainings: full 1, l2 1"  # what the grid implies, before training
    assert "3 steps" in summaries[2] and "alpha 0.5: " in summaries[2]
    # merges are scored, then removed; checkpoints are removed once the fine-tuned model is saved
    assert run_files(output_dir, "*/merged") == [] and run_files(output_dir, "*/trainer") == []


def test_lm_recipe_regularizer_keeps_weights_closer_to_pretrained(lm_demo):
    output_dir, _ = lm_demo
    pretrained = load_file(lm_path() / "model.safetensors")

    def distance(method: str) -> float:
        (finetuned,) = run_files(output_dir, f"{method}-*/finetuned")
        weights = load_file(finetuned / "model.safetensors")
        return sum(((weights[k].float() - v.float()) ** 2).sum().item() for k, v in pretrained.items()) ** 0.5

    full, l2 = distance("full"), distance("l2")
    assert 0 < l2 < 0.9 * full


def test_rerun_skips_finished_work_and_scores_only_what_is_missing(lm_demo):
    output_dir, _ = lm_demo
    (missing,) = run_files(output_dir, "l2-*/records-*/alpha-0.5.json")
    before = missing.read_text()
    kept = {
        p: p.stat().st_mtime_ns
        for p in [*run_files(output_dir, "*/records-*/alpha-*.json"), *run_files(output_dir, "*/finetuned/*")]
        if p != missing
    }
    missing.unlink()  # as if the sweep had been interrupted there
    stdout = launch("galactica_med.py", output_dir, *LM_ARGS)
    assert "train_runtime" not in stdout  # nothing retrained
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    rescored, scored = json.loads(missing.read_text()), json.loads(before)
    assert {k: v for k, v in rescored.items() if k != "cost"} == {k: v for k, v in scored.items() if k != "cost"}


def test_lm_recipe_on_two_processes_trains_together_and_scores_once(tmp_path):
    """DDP (gloo): every process trains, the main one merges, scores and writes; the others wait."""
    stdout = launch(
        "galactica_med.py",
        tmp_path / "ddp",
        "--config",
        str(TINY_LM),
        "--hma_groups",
        "0",
        "--methods",
        "full",
        "--alphas",
        "1",
        "--max_steps",
        "2",
        "--eval_limit",
        "4",
        "--disable_tqdm",
        "true",
        "--eval_fractions",
        "0.5",
        processes=2,
    )
    assert [line.split(":")[0] for line in stdout.splitlines() if line.startswith("[galactica_med] ")] == [
        "[galactica_med] pre-trained",
        "[galactica_med] 1 training",
        "[galactica_med] full",
    ]
    (finetuned,) = run_files(tmp_path / "ddp", "full-*/finetuned")
    assert json.loads((finetuned / "specgen_training.json").read_text())["steps"] == 2
    report = json.loads((tmp_path / "ddp" / "report.json").read_text())
    assert [(r["method"], r["alpha"]) for r in report["records"]] == [
        ("pre-trained", None),
        ("full", 1.0),
        ("full", None),
    ]
    assert report["records"][2]["checkpoint"] == {
        "fraction": 0.5,
        "step": 1,
        "steps": 2,
    }  # saved once, by the main process
    assert run_files(tmp_path / "ddp", "full-*/early/*") == [finetuned.parent / "early" / "fraction-0.5"]


def test_lm_recipe_under_zero3_partitions_training_and_scores_on_one_process(tmp_path):
    """ZeRO-3 on 2 processes: the model loads partitioned (zero.Init), L2 works on each rank's
    partition, KD's teacher is a partitioned copy, and the main process loads whole models to merge
    and score while the other waits (a partitioned load there would be a collective it never joins)."""
    stdout = launch(
        "galactica_med.py",
        tmp_path / "z3",
        "--config",
        str(TINY_LM),
        "--hma_groups",
        "0",
        "--methods",
        "l2+ema",
        "kd",
        "--alphas",
        "0.5",
        "1",
        "--max_steps",
        "2",
        "--eval_limit",
        "4",
        "--ema_decay",
        "0.5",
        "--eval_fractions",
        "0.5",
        "--disable_tqdm",
        "true",
        processes=2,
        config="zero3",
    )
    assert [line.split(":")[0] for line in stdout.splitlines() if line.startswith("[galactica_med] ")] == [
        "[galactica_med] pre-trained",
        "[galactica_med] 2 trainings",
        "[galactica_med] l2+ema (l2_lambda=0.01)",
        "[galactica_med] kd (kd_lambda=1)",
    ]
    pretrained = load_file(lm_path() / "model.safetensors")
    for method in ("l2+ema", "kd"):
        (finetuned,) = run_files(tmp_path / "z3", f"{method}-*/finetuned")
        weights = load_file(finetuned / "model.safetensors")  # consolidated from the partitions
        assert weights.keys() == pretrained.keys() and any(
            not torch.equal(weights[k], v) for k, v in pretrained.items()
        )
        early = load_file(finetuned.parent / "early" / "fraction-0.5" / "model.safetensors")  # gathered in a callback
        assert early.keys() == pretrained.keys() and any(not torch.equal(early[k], weights[k]) for k in weights)
    report = json.loads((tmp_path / "z3" / "report.json").read_text())
    assert len(report["records"]) == 7


def test_clip_recipe_on_two_processes(tmp_path):
    """`accelerate launch` with 2 processes (DDP, gloo): both train (KD's teacher on each), the main
    one merges and scores, the other waits; records and summaries are written once."""
    stdout = launch(
        "clip_imagenet.py",
        tmp_path / "demo",
        "--config",
        str(TINY_CLIP),
        "--hma_groups",
        "0",
        "--methods",
        "full",
        "kd",
        "--alphas",
        "0.5",
        "1",
        "--max_steps",
        "3",
        "--eval_max_samples",
        "40",
        "--disable_tqdm",
        "true",
        processes=2,
    )
    finetuned = run_files(tmp_path / "demo", "*/finetuned")
    assert len(finetuned) == 2 and all(
        json.loads((f / "specgen_training.json").read_text())["steps"] == 3 for f in finetuned
    )
    records = [
        ResultRecord.from_dict(r) for r in json.loads((tmp_path / "demo" / "report.json").read_text())["records"]
    ]
    assert {(r.method, r.alpha) for r in records} == {
        ("zero-shot", None),
        ("full", 0.5),
        ("full", 1.0),
        ("kd", 0.5),
        ("kd", 1.0),
    }
    for record in records:
        assert set(record.speciality) == {"photo"} and set(record.generality) == {"sketch", "clipart", "painting"}
        assert all(
            0.0 <= v <= 1.0 and abs(v * 40 - round(v * 40)) < 1e-5
            for v in {**record.speciality, **record.generality}.values()
        )
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert len(report["records"]) == 5 and report["title"].startswith("clip_imagenet")
    assert (
        sum(line.startswith("[clip_imagenet] ") for line in stdout.splitlines()) == 4
    )  # the reference, the grid, 2 runs


# ---- in-process: an interrupted training resumes; publishing ------------------------------------------


def test_interrupted_training_resumes_from_its_checkpoint_then_publishes(tmp_path):
    recipe, experiment, training = lm_experiment(tmp_path / "resumed")
    interrupt_training(recipe, experiment, training)
    (checkpoint,) = run_files(tmp_path / "resumed", "l2-*/trainer/checkpoint-*")
    assert checkpoint.name == "checkpoint-2"
    run_experiment(recipe, experiment, training)
    (finetuned,) = run_files(tmp_path / "resumed", "l2-*/finetuned")
    training_log = json.loads((finetuned / "specgen_training.json").read_text())
    assert training_log["steps"] == 4 and training_log["resumed_from"].endswith("checkpoint-2")

    straight = run_experiment(*lm_experiment(tmp_path / "straight"))
    (uninterrupted,) = run_files(tmp_path / "straight", "l2-*/finetuned")
    resumed, reference = load_file(finetuned / "model.safetensors"), load_file(uninterrupted / "model.safetensors")
    for key, value in reference.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6, msg=key)

    hub = FakeHub()
    recipe, experiment, training = lm_experiment(tmp_path / "resumed", push_to_hub=True, hub_model_id="me/tiny-med")
    records = run_experiment(recipe, experiment, training, hub_api=hub)
    assert (
        [(r.method, r.alpha) for r in records]
        == [(r.method, r.alpha) for r in straight]
        == [("pre-trained", None), ("l2", 0.5), ("l2", 1.0)]
    )
    pick = best_generality([r for r in records if r.method == "l2"], experiment.keep_speciality)
    (upload,) = hub.uploads
    assert upload["repo_id"] == "me/tiny-med" and f"alpha: {pick.alpha:g}" in upload["files"]["README.md"].decode()
    assert "| l2 | l2_lambda=1, alpha=0.5 |" in upload["files"]["README.md"].decode()
    expected = wise_ft(lm_path(), finetuned, pick.alpha, tmp_path / "expected")
    assert upload["files"]["model.safetensors"] == (expected / "model.safetensors").read_bytes()


def test_a_save_interrupted_after_training_leaves_no_finetuned_model_and_the_rerun_publishes(tmp_path, monkeypatch):
    """Ctrl-C while the fine-tuned model is being written (its weights saved, its processor not yet): no
    `finetuned/` and no temporary directory stay behind; the re-run trains again from the last checkpoint and
    publishes it whole."""
    from transformers import PreTrainedTokenizerBase

    recipe, experiment, training = lm_experiment(tmp_path / "run")
    original = PreTrainedTokenizerBase.save_pretrained

    def interrupted(self, directory, *args, **kwargs):
        if Path(directory).name.startswith(".finetuned."):
            raise KeyboardInterrupt
        return original(self, directory, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(recipe, experiment, training)
    (run,) = run_files(tmp_path / "run", "l2-*")
    assert not (run / "finetuned").exists() and not [p.name for p in run.iterdir() if "finetuned" in p.name]
    assert [p.name for p in run_files(tmp_path / "run", "l2-*/trainer/checkpoint-*")] == ["checkpoint-4"]
    monkeypatch.undo()
    run_experiment(recipe, experiment, training)
    training_log = json.loads((run / "finetuned" / "specgen_training.json").read_text())
    assert training_log["resumed_from"].endswith("checkpoint-4")
    assert {"model.safetensors", "tokenizer_config.json"} <= {p.name for p in (run / "finetuned").iterdir()}


def test_kept_merges_survive_a_rerun_that_merges_more_alphas(tmp_path):
    """keep_merged_models: a re-run scoring a new alpha used to replace the whole merged/ folder, deleting
    the merges its records still pointed to."""
    recipe, experiment, training = lm_experiment(tmp_path / "kept", max_steps=2, save_strategy="no")
    experiment = dataclasses.replace(experiment, alphas=[0.5], keep_merged_models=True)
    (kept,) = [Path(r.model) for r in run_experiment(recipe, experiment, training) if r.alpha == 0.5]
    stamp = (kept / "model.safetensors").stat().st_mtime_ns
    records = run_experiment(recipe, dataclasses.replace(experiment, alphas=[0.25, 0.5]), training)
    models = {r.alpha: Path(r.model) for r in records if r.method == "l2"}
    assert models[0.5] == kept and (kept / "model.safetensors").stat().st_mtime_ns == stamp
    assert all((m / "model.safetensors").is_file() for m in models.values()) and models[0.25].parent == kept.parent
    assert run_files(tmp_path / "kept", "*/merging") == []


def test_group_alphas_merge_each_group_of_blocks_at_its_ratio_and_records_carry_the_schedule(tmp_path):
    """merge_group_alphas (HMA): each alpha is the mean of the shape scaled to it; the records, their
    report label and the kept merges carry the per-group alphas."""
    recipe, experiment, training = lm_experiment(tmp_path / "hma", max_steps=2, save_strategy="no")
    experiment = dataclasses.replace(experiment, alphas=[0.5], keep_merged_models=True, merge_group_alphas=[0.5, 1.5])
    (record,) = [r for r in run_experiment(recipe, experiment, training) if r.method == "l2" and r.alpha == 0.5]
    assert record.merge == {"kind": "groups", "group_alphas": [0.25, 0.75], "outside_alpha": 0.5, "mean_alpha": 0.5}
    assert record.setting == "l2_lambda=1, alpha=0.5 (groups 0.25/0.75)"
    assert "alpha=0.5 (groups 0.25/0.75)" in (tmp_path / "hma" / "report.md").read_text()
    merged = load_file(Path(record.model) / "model.safetensors")
    finetuned = load_file(Path(record.model).parents[1] / "finetuned" / "model.safetensors")
    pretrained = load_file(Path(recipe.pretrained) / "model.safetensors")
    # the tiny Galactica has 4 blocks: 0-1 in the input group, 2-3 in the output group
    for key, alpha in [
        ("model.decoder.layers.0.fc1.weight", 0.25),
        ("model.decoder.layers.3.fc1.weight", 0.75),
        ("model.decoder.final_layer_norm.weight", 0.5),
    ]:
        expected = (1 - alpha) * pretrained[key].double() + alpha * finetuned[key].double()
        assert (merged[key].double() - expected).abs().max() < 1e-6, key
        assert not torch.equal(merged[key], finetuned[key])
    config = json.loads((Path(record.model) / "merge_config.json").read_text())
    assert config["alphas"]["model.decoder.layers.1.fc1.weight"] == 0.25


@pytest.mark.parametrize(
    ("shape", "alphas", "message"),
    [
        ([1, 3], [0.75], r"scaled to alpha 0.75 gives \[0.375, 1.125\]: a ratio above 1"),
        ([], [0.5], "non-negative ratios with a positive mean"),
        ([-1, 2], [0.5], "non-negative ratios"),
        ([0, 0], [0.5], "positive mean"),
    ],
)
def test_group_alphas_that_cannot_be_scaled_into_0_1_are_refused(shape, alphas, message):
    with pytest.raises(ValueError, match=message):
        ExperimentArguments(alphas=alphas, merge_group_alphas=shape)


# ---- configuration ---------------------------------------------------------------------------------


def test_yaml_preset_then_command_line_overrides(tmp_path):
    module = load_recipe("galactica_med")
    options, experiment, training, grids = parse_config(
        (module.MedMCQAArguments, ExperimentArguments, SpecGenTrainingArguments),
        [
            "--config",
            str(RECIPE_CONFIGS / "galactica_med_tiny.yaml"),
            "--learning_rate",
            "3e-4",
            "--methods",
            "kd+feature",
            "--push-to-hub",
            "me/model",
            "--output_dir",
            str(tmp_path),
        ],
        grid_fields=GRID_FIELDS,
    )
    assert options.model_name_or_path == "hf_specgen/tiny-galactica" and options.eval_suites == [
        "tiny_medmcqa",
        "tiny_general",
    ]
    assert training.learning_rate == 3e-4 and training.num_train_epochs == 10  # the override, and the preset
    assert (
        grids == {"l2_lambda": [1e-2, 1e-1]} and training.l2_lambda == 1e-2 and isinstance(training.l2_lambda, float)
    )  # YAML's "1.0e-2" converted
    assert experiment.methods == ["kd+feature"] and experiment.alphas == [0.0, 0.5, 1.0] and experiment.auto_alpha
    assert (experiment.auto_keep, experiment.auto_budget, experiment.hma_groups, experiment.eval_fractions) == (
        0.95,
        4,
        0,
        [0.5],
    )
    assert training.push_to_hub is True and training.hub_model_id == "me/model"


def test_methods_switch_on_their_own_regularizers_only(tmp_path):
    base = SpecGenTrainingArguments(
        output_dir=str(tmp_path), l1_lambda=1e-3, l2_lambda=0.1, kd_lambda=2.0, report_to=[]
    )
    kd_l2 = Method.parse("kd+l2").training_arguments(base)
    assert (kd_l2.l1_lambda, kd_l2.l2_lambda, kd_l2.kd_lambda) == (0.0, 0.1, 2.0)
    full = Method.parse("full").training_arguments(base, output_dir=str(tmp_path / "x"))
    assert (full.l1_lambda, full.l2_lambda, full.kd_lambda, full.output_dir) == (0.0, 0.0, 0.0, str(tmp_path / "x"))
    assert Method.parse("lora+l2") == Method("lora+l2", ("l2",), True)
    assert Method.parse("l1").hyperparameter(base, 8) == ("l1_lambda", 1e-3)
    assert Method.parse("lora").hyperparameter(base, 8) == ("lora_r", 8.0)
    assert Method.parse("kd+l2").hyperparameter(base, 8) == (None, None)
    for bad in ("sgd", "full+l2", "l2+l2", ""):
        with pytest.raises(ValueError, match="unknown method"):
            Method.parse(bad)
    with pytest.raises(ValueError, match="needs ewc_lambda > 0"):
        parse_methods(["full", "ewc"], base)


@pytest.fixture
def json_medmcqa_without_answer(tmp_path):
    folder = tmp_path / "medmcqa"
    folder.mkdir()
    rows = [{"question": "q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d"}] * 4
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "full", "sgd"], "unknown method 'sgd'"),
        (["--methods", "l2", "--l2_lambda", "0"], "needs l2_lambda > 0"),
        (["--alphas", "0", "1.5"], r"alphas must lie in \[0, 1\]"),
        (["--dataset_name", "/nonexistent/medmcqa"], "dataset_name '/nonexistent/medmcqa' does not exist"),
        (["--dataset_name", "hf_specgen/tiny-medmcqa", "--train_split", "dev"], "not 'dev'"),
        (["--model_name_or_path", "/nonexistent/model"], "model_name_or_path '/nonexistent/model' does not exist"),
        (["--model_name_or_path", "{answerless}"], "model '.*medmcqa' cannot be loaded"),  # a folder, not a model
        (["--eval_suites", "tiny_medmcqa", "nope"], r"unknown suite\(s\) \['nope'\]"),
        (["--eval_suites", "tiny_general"], "measure no speciality"),
        (["--push_to_hub"], "push_to_hub needs hub_model_id"),
        (["--dataset_name", "{answerless}"], r"has no column\(s\) \['cop'\]"),
        (["--config", "{bad_value}"], "invalid value 'fast' for learning_rate"),
        (["--config", "{bad_key}"], r"unknown field\(s\) \['learnin_rate'\]"),
    ],
)
def test_bad_configuration_stops_before_training_with_one_message(
    args, message, tmp_path, json_medmcqa_without_answer, capsys
):
    preset = (RECIPE_CONFIGS / "galactica_med_tiny.yaml").read_text()
    (tmp_path / "bad_value.yaml").write_text(preset + "learning_rate: fast\n")
    (tmp_path / "bad_key.yaml").write_text(preset + "learnin_rate: 1.0e-3\n")
    values = {
        "answerless": json_medmcqa_without_answer,
        "bad_value": tmp_path / "bad_value.yaml",
        "bad_key": tmp_path / "bad_key.yaml",
    }
    args = [a.format(**values) for a in args]
    output_dir = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        load_recipe("galactica_med").GalacticaMed.main(
            ["--config", str(TINY_LM), "--output_dir", str(output_dir), *args]
        )
    assert stop.value.code != 0
    error = str(stop.value.code) if isinstance(stop.value.code, str) else capsys.readouterr().err
    assert error.startswith("galactica_med.py: error: ") and len(error.strip().splitlines()) == 1, error
    assert re.search(message, error), error
    assert not output_dir.exists()  # nothing written


def counting_calls(monkeypatch, recipe_class) -> list[str]:
    """Records `prepare` (the recipe's loading of model and data) and makes `evaluate` (scoring) a failure."""
    calls = []
    prepare = recipe_class.prepare

    def counted_prepare(self):
        calls.append("prepare")
        prepare(self)

    def evaluate(self, model_dir):
        calls.append("evaluate")
        raise AssertionError(f"scored {model_dir} although the configuration cannot run")

    monkeypatch.setattr(recipe_class, "prepare", counted_prepare)
    monkeypatch.setattr(recipe_class, "evaluate", evaluate)
    return calls


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory that refuses new files: mode 0o500, or where that does not stop this user (root
    bypasses modes), /proc/self (procfs creates no files for anyone)."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        (folder / "probe").touch()
    except PermissionError:
        yield folder, "Permission denied"
    else:
        (folder / "probe").unlink()
        yield Path("/proc/self"), "No such file or directory"
    folder.chmod(0o700)


@pytest.mark.parametrize("case", ["under_a_file", "is_a_file", "read_only"])
def test_unwritable_output_dir_stops_before_any_work(case, tmp_path, read_only_dir, monkeypatch):
    """Found before the model and data are loaded (`prepare`), let alone scored (`evaluate`)."""
    module = load_recipe("galactica_med")
    calls = counting_calls(monkeypatch, module.GalacticaMed)
    (tmp_path / "file").write_text("in the way")
    output_dir, reason = {
        "under_a_file": (tmp_path / "file" / "out", "'.*/file' is not a directory"),
        "is_a_file": (tmp_path / "file", "'.*/file' is not a directory"),
        "read_only": read_only_dir,
    }[case]
    error = stop_message(module.GalacticaMed.main, ["--config", str(TINY_LM), "--output_dir", str(output_dir)])
    assert re.match(rf"galactica_med.py: error: output_dir '{re.escape(str(output_dir))}'.*{reason}", error), error
    assert calls == []
    assert (tmp_path / "file").read_text() == "in the way" and sorted(p.name for p in tmp_path.iterdir()) == [
        "file",
        "read_only",
    ]


def test_output_dir_created_for_the_check_is_removed_when_the_configuration_fails(tmp_path):
    module = load_recipe("galactica_med")
    output_dir = tmp_path / "new" / "out"
    error = stop_message(
        module.GalacticaMed.main, ["--config", str(TINY_LM), "--output_dir", str(output_dir), "--train_split", "dev"]
    )
    assert "not 'dev'" in error and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("recipe", "args", "message"),
    [
        ("galactica_med", ["--model_name_or_path", "./no/model"], "model_name_or_path './no/model' does not exist"),
        ("galactica_med", ["--dataset_name", "{tmp}/no/medmcqa"], "dataset_name '.*/no/medmcqa' does not exist"),
        ("clip_imagenet", ["--train_dataset", "{tmp}/no/photos"], "train_dataset '.*/no/photos' does not exist"),
        ("clip_imagenet", ["--class_names_file", "names.json"], "class_names_file 'names.json' does not exist"),
        (
            "clip_imagenet",
            ["--generality_sets", "sketch=hf_specgen/tiny-domains/sketch:test", "paint={tmp}/no/painting:test"],
            r"generality_sets \(paint\) '.*/no/painting' does not exist",
        ),
        ("clip_imagenet", ["--speciality_sets", "photo"], r"speciality_sets: 'photo' is not NAME=SOURCE\[:SPLIT\]"),
    ],
)
def test_missing_local_paths_stop_before_any_work(recipe, args, message, tmp_path, monkeypatch):
    """Every local path of the configuration is checked before the model and data sets load (a
    missing class-names file or last evaluation folder was found after loading the training set)."""
    monkeypatch.chdir(tmp_path)
    module = load_recipe(recipe)
    recipe_class = module.GalacticaMed if recipe == "galactica_med" else module.ClipImageNet
    calls = counting_calls(monkeypatch, recipe_class)
    preset = "galactica_med_tiny" if recipe == "galactica_med" else "clip_tiny"
    argv = [
        "--config",
        str(RECIPE_CONFIGS / f"{preset}.yaml"),
        "--output_dir",
        str(tmp_path / "out"),
        *(a.replace("{tmp}", str(tmp_path)) for a in args),
    ]
    error = stop_message(recipe_class.main, argv)
    assert re.match(rf"{recipe}.py: error: {message}", error), error
    assert calls == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--alphas", "0", "nan", "1"], "alphas"),
        (["--keep_speciality", "inf"], "keep_speciality"),
        (["--lora_dropout", "nan"], "lora_dropout"),
        (["--lora_learning_rate", "inf"], "lora_learning_rate"),
        (["--methods", "l2", "--l2_lambda", "nan"], "l2_lambda"),
        (["--methods", "full", "l2", "--l2_lambda", "inf"], "l2_lambda"),
        (["--methods", "kd", "--kd_temperature", "nan"], "kd_temperature"),
        (["--config", "{nan_preset}"], "lora_dropout"),  # YAML's .nan
    ],
)
def test_non_finite_floats_are_refused_naming_the_field(args, field, tmp_path, monkeypatch):
    """NaN passes `x < 0` and `x <= 0` checks (`l2_lambda: nan` trained "l2" as a full fine-tune)."""
    module = load_recipe("galactica_med")
    calls = counting_calls(monkeypatch, module.GalacticaMed)
    (tmp_path / "nan.yaml").write_text(
        (RECIPE_CONFIGS / "galactica_med_tiny.yaml").read_text() + "lora_dropout: .nan\n"
    )
    args = [a.format(nan_preset=tmp_path / "nan.yaml") for a in args]
    error = stop_message(
        module.GalacticaMed.main, ["--config", str(TINY_LM), "--output_dir", str(tmp_path / "out"), *args]
    )
    assert re.match(rf"galactica_med.py: error: .*\b{field}\b.*finite", error), error
    assert calls == [] and not (tmp_path / "out").exists()


def test_parse_methods_refuses_non_finite_strengths_whatever_the_training_arguments_allow():
    base = SimpleNamespace(
        l1_lambda=0.0,
        l2_lambda=float("nan"),
        ewc_lambda=float("inf"),
        kd_lambda=1.0,
        kd_temperature=float("nan"),
        feature_lambda=0.0,
    )
    assert parse_methods(["full"], base) == [Method("full", (), False)]
    for method, field in (("l2", "l2_lambda"), ("ewc", "ewc_lambda"), ("kd", "kd_temperature")):
        with pytest.raises(ValueError, match=rf"method '{method}' needs {field} .*finite.*, got (nan|inf)"):
            parse_methods([method], base)
    with pytest.raises(ValueError, match="alphas must be finite"):
        ExperimentArguments(alphas=[0.5, float("nan")])


def test_clip_class_names_from_labels_ids_and_indices():
    module = load_recipe("clip_imagenet")

    def labelled(*names):
        return datasets.Dataset.from_dict(
            {"label": [0]}, features=datasets.Features({"label": datasets.ClassLabel(names=list(names))})
        )

    assert module.class_names(labelled("tench, Tinca tinca", "great_white_shark"), "label", {}) == [
        "tench",
        "great white shark",
    ]
    assert module.class_names(
        labelled("n01440764", "n01443537"), "label", {"n01443537": "goldfish, Carassius auratus"}
    ) == ["n01440764", "goldfish"]
    assert module.class_names(labelled("0", "2"), "label", {}, fallback=["tench", "goldfish", "shark"]) == [
        "tench",
        "shark",
    ]
    assert module.parse_set("v2=data/imagenet-v2") == ("v2", "data/imagenet-v2", "test")
    assert module.parse_set("val=ILSVRC/imagenet-1k:validation") == ("val", "ILSVRC/imagenet-1k", "validation")


def test_clip_evaluation_reads_the_configured_columns():
    module = load_recipe("clip_imagenet")
    photos = tiny_dataset("hf_specgen/tiny-domains/photo", "test").select(range(30))
    names = module.class_names(photos, "label", {})

    def scores(image_column: str, label_column: str) -> dict:
        options = module.ImageClassificationArguments(
            image_column=image_column, label_column=label_column, templates=["a photo of a {}."]
        )
        recipe = module.ClipImageNet(options, seed=0)
        data = photos.rename_columns({"image": image_column, "label": label_column})
        recipe._sets = {"speciality": {"photo": (data, names)}, "generality": {"photo_again": (data, names)}}
        return recipe.evaluate(clip_path())

    default, renamed = scores("image", "label"), scores("img", "y")
    assert renamed == default and 0.0 < default["speciality"]["photo"] <= 1.0


def test_clip_recipe_refuses_a_malformed_evaluation_set(tmp_path):
    module = load_recipe("clip_imagenet")
    with pytest.raises(SystemExit, match="'photo' is not NAME=SOURCE"):
        module.ClipImageNet.main(
            ["--config", str(TINY_CLIP), "--output_dir", str(tmp_path / "out"), "--speciality_sets", "photo"]
        )
    with pytest.raises(ConfigError, match="templates must each contain"):
        parse_config((module.ImageClassificationArguments,), ["--templates", "a photo"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("recipe", "preset"), [("galactica_med", "galactica_med"), ("clip_imagenet", "clip_imagenet")]
)
def test_published_presets_parse(recipe, preset):
    """The GPU presets hold only known fields and valid values (`use_cpu`: bf16 needs a GPU otherwise)."""
    module = load_recipe(recipe)
    arguments = module.MedMCQAArguments if recipe == "galactica_med" else module.ImageClassificationArguments
    options, experiment, training = parse_config(
        (arguments, ExperimentArguments, SpecGenTrainingArguments),
        ["--config", str(RECIPE_CONFIGS / f"{preset}.yaml"), "--use_cpu", "true"],
    )
    assert options.model_name_or_path in ("facebook/galactica-1.3b", "openai/clip-vit-base-patch16")
    assert experiment.methods == ["full", "l1", "l2", "ewc", "kd", "feature", "lora"] and len(experiment.alphas) == 5
    assert experiment.auto_alpha and experiment.hma_groups == 3 and experiment.hma_mean_alphas == [0.2, 0.5]
    assert training.bf16 and parse_methods(experiment.methods, training)


@pytest.mark.parametrize("preset", ["alignment_tax", "alignment_tax_hh"])
def test_alignment_presets_parse(preset):
    """The alignment tax's GPU presets: DPO's own options (beta) and the recipe's, every method and algorithm known."""
    module = load_recipe("alignment_tax")
    options, experiment, training = parse_config(
        (module.AlignmentArguments, ExperimentArguments, module.SpecGenDPOConfig),
        ["--config", str(RECIPE_CONFIGS / f"{preset}.yaml"), "--use_cpu", "true"],
    )
    assert options.eval_suites == ["alignment_tax"] and options.speciality_metrics == [
        "win_rate",
        "preference_accuracy",
    ]
    methods = parse_methods(experiment.methods, training)
    assert {m.algorithm for m in methods} == {"dpo", "rsf", None} and training.bf16 and 0 < training.beta <= 0.1
    assert experiment.auto_alpha and experiment.hma_groups == 3 and training.learning_rate == 5e-7
