"""Recipes that choose points instead of only sweeping them: `alphas: auto` (the auto-alpha pick) and
`hma:` (HMA ratio searches), through `accelerate launch` and in process: records, re-runs, report,
publishing, and configurations refused before training."""

import dataclasses
import json
import statistics
from pathlib import Path

import pytest
from conftest import FakeHub
from recipe_helpers import TINY_CLIP, TINY_LM, launch, lm_experiment, load_recipe, run_files
from safetensors.torch import load_file

from hf_specgen import SpecGenTrainingArguments
from hf_specgen.eval.markdown import chosen_points
from hf_specgen.eval.records import ResultRecord
from hf_specgen.experiment import ConfigError, ExperimentArguments, parse_config, run_experiment
from hf_specgen.experiment.runner import _schedule_of
from hf_specgen.merge import AlphaSchedule, merge
from hf_specgen.tiny import clip_path, lm_path


CHOOSING = [
    "--config",
    str(TINY_LM),
    "--methods",
    "full",
    "lora",
    "--alphas",
    "0",
    "1",
    "auto",
    "--auto_budget",
    "2",
    "--hma_groups",
    "2",
    "--hma_mean_alphas",
    "0.5",
    "--hma_steps",
    "3",
    "--hma_max_samples",
    "8",
    "--hma_max_new_tokens",
    "8",
    "--selection_methods",
    "full",
    "lora",
    "--max_steps",
    "20",
    "--eval_limit",
    "8",
    "--disable_tqdm",
    "true",
]


@pytest.fixture(scope="module")
def choosing(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("choosing") / "demo"
    return output_dir, launch("galactica_med.py", output_dir, *CHOOSING)


def records_of(output_dir: Path, pattern: str) -> list[ResultRecord]:
    return [ResultRecord.load(p) for p in run_files(output_dir, pattern)]


def test_selection_methods_limit_the_chosen_points_to_those_methods(tmp_path):
    recipe, experiment, training = lm_experiment(tmp_path / "some", max_steps=2, save_strategy="no")
    experiment = dataclasses.replace(
        experiment,
        methods=["full", "l2"],
        alphas=[1.0],
        auto_alpha=True,
        auto_budget=1,
        selection_methods=["l2", "lora"],
    )
    records = run_experiment(recipe, experiment, training)
    assert [r.method for r in records if r.selection is not None] == ["l2"]
    assert not run_files(tmp_path / "some", "full-*/records-*/auto-*.json") and run_files(
        tmp_path / "some", "l2-*/records-*/auto-*.json"
    )


def test_auto_alpha_bisects_from_the_ends_and_records_every_point_it_scored(choosing):
    output_dir, _ = choosing
    (reference,) = records_of(output_dir, "pre-trained/*/record.json")
    for method in ("full", "lora"):
        (pick,) = records_of(output_dir, f"{method}-*/records-*/auto-keep-0.95-budget-2.json")
        chosen = pick.selection
        (end,) = [r for r in records_of(output_dir, f"{method}-*/records-*/alpha-1.json")]
        s0, s1 = reference.speciality_score, end.speciality_score
        assert chosen["floor"] == pytest.approx(s0 + 0.95 * (s1 - s0), abs=1e-12)  # the floor's closed form
        scored = {
            a: ResultRecord.load(next(iter(run_files(output_dir, f"{method}-*/records-*/alpha-{a:g}.json"))))
            for a in chosen["scored"]
        }
        inner = [a for a in scored if a < 1]
        assert chosen["evaluations"] == len(inner) <= 2 and set(inner) <= {0.5, 0.25, 0.75}  # bisection's midpoints
        assert chosen["reused"] == (0.5 in inner)  # 0.5 was scored for the HMA comparison first
        shown = {r.alpha: r for r in records_of(output_dir, f"{method}-*/records-*/alpha-*.json")}  # grid and search
        meeting = {a: r for a, r in [(0.0, reference), *shown.items()] if r.speciality_score >= chosen["floor"]}
        best = max(meeting, key=lambda a: (meeting[a].generality_score, -a))  # never less general than a point shown
        assert pick.alpha == best and (pick.speciality, pick.generality) == (
            meeting[best].speciality,
            meeting[best].generality,
        )


def test_hma_points_keep_their_mean_and_sit_beside_the_uniform_merge(choosing):
    output_dir, stdout = choosing
    for method in ("full", "lora"):
        (hma,) = records_of(output_dir, f"{method}-*/records-*/hma-2-mean-0.5-generated-8-3-*.json")
        ratios = hma.merge["group_alphas"]
        assert hma.alpha == 0.5 and len(ratios) == 2 and statistics.fmean(ratios) == pytest.approx(0.5, abs=1e-9)
        assert hma.selection["rule"] == "hma" and hma.selection["held_out_loss"] <= hma.selection["uniform_loss"]
        assert 1 <= hma.selection["steps"] == len(hma.selection["loss_curve"]) <= 3 and hma.cost["search_s"] >= 0
        assert run_files(output_dir, f"{method}-*/records-*/alpha-0.5.json")  # the uniform merge at the same mean
    assert run_files(output_dir, "*/finetuned-merged") == [] and run_files(output_dir, "*/merged") == []
    report = (output_dir / "report.md").read_text()
    assert (
        "Chosen, not swept:" in report
        and "auto: keeps 95% of the gain" in report
        and "HMA search, generated" in report
    )
    assert "HMA ratios" in report and "; uniform alpha 0.5: " in report
    assert "(auto)" in stdout and "(HMA groups " in stdout
    kinds = [r.get("selection", {}) or {} for r in json.loads((output_dir / "report.json").read_text())["records"]]
    assert (
        sorted(k.get("rule", "") for k in kinds).count("auto") == 2
        and [k.get("rule") for k in kinds].count("hma") == 2
    )


def test_a_rerun_with_auto_and_hma_scores_nothing_again(choosing):
    output_dir, _ = choosing
    records = run_files(output_dir, "*/records-*/*.json")
    stamps = {p: p.stat().st_mtime_ns for p in records}
    stdout = launch("galactica_med.py", output_dir, *CHOOSING)
    assert "train_runtime" not in stdout
    assert {p: p.stat().st_mtime_ns for p in run_files(output_dir, "*/records-*/*.json")} == stamps


def test_clip_hma_with_the_labels_as_targets_and_its_merge_is_the_records_ratios(tmp_path):
    module = load_recipe("clip_imagenet")
    options, experiment, training = parse_config(
        (module.ImageClassificationArguments, ExperimentArguments, SpecGenTrainingArguments),
        [
            "--config",
            str(TINY_CLIP),
            "--output_dir",
            str(tmp_path / "clip"),
            "--methods",
            "full",
            "--alphas",
            "1",
            "--hma_groups",
            "2",
            "--hma_mean_alphas",
            "0.4",
            "--hma_samples",
            "targets",
            "--hma_steps",
            "4",
            "--hma_max_samples",
            "32",
            "--max_steps",
            "10",
            "--eval_max_samples",
            "16",
            "--keep_merged_models",
            "true",
            "--disable_tqdm",
            "true",
            "--save_strategy",
            "no",
        ],
    )
    records = run_experiment(module.ClipImageNet(options, training.seed), experiment, training)
    (hma,) = [r for r in records if r.selection is not None]
    assert {(r.alpha, r.selection is None) for r in records if r.method == "full"} == {
        (1.0, True),
        (0.4, True),
        (0.4, False),
    }
    assert records[0].model == "hf_specgen/tiny-clip"  # the pre-trained model as the preset names it
    low, high = hma.merge["group_alphas"]
    assert (low + high) / 2 == pytest.approx(0.4, abs=1e-9) and hma.selection["samples"] == "targets"
    merged, (finetuned,) = (
        load_file(Path(hma.model) / "model.safetensors"),
        run_files(tmp_path / "clip", "full-*/finetuned"),
    )
    tuned, pre = load_file(finetuned / "model.safetensors"), load_file(clip_path() / "model.safetensors")
    # the tiny CLIP's vision tower has 3 blocks: 0-1 in the input group, 2 in the output group
    for key, alpha in [
        ("vision_model.encoder.layers.0.mlp.fc1.weight", low),
        ("vision_model.encoder.layers.2.mlp.fc1.weight", high),
    ]:
        expected = pre[key].double() + alpha * (tuned[key].double() - pre[key].double())
        assert (merged[key].double() - expected).abs().max() < 1e-6, key


def test_publish_point_auto_publishes_the_auto_pick(tmp_path):
    hub = FakeHub()
    recipe, experiment, training = lm_experiment(
        tmp_path / "auto", push_to_hub=True, hub_model_id="me/auto", max_steps=20, save_strategy="no"
    )
    experiment = dataclasses.replace(
        experiment, alphas=[1.0], auto_alpha=True, auto_budget=2, publish_point="auto", selection_methods=None
    )
    records = run_experiment(recipe, experiment, training, hub_api=hub)
    (pick,) = [r for r in records if r.selection is not None]
    (upload,) = hub.uploads
    assert f"alpha: {pick.alpha:g}" in upload["files"]["README.md"].decode() and pick.selection["rule"] == "auto"
    (finetuned,) = run_files(tmp_path / "auto", "l2-*/finetuned")
    expected = merge(lm_path(), finetuned, pick.alpha, tmp_path / "expected")
    assert upload["files"]["model.safetensors"] == (expected / "model.safetensors").read_bytes()


def test_an_hma_record_is_merged_again_at_its_ratios():
    record = ResultRecord(
        method="full",
        alpha=0.5,
        speciality={"s": 1.0},
        generality={"g": 1.0},
        merge=AlphaSchedule(group_alphas=(0.7, 0.3)).describe(),
        selection={"rule": "hma"},
    )
    assert _schedule_of(record) == AlphaSchedule(group_alphas=(0.7, 0.3), outside_alpha=0.5)
    assert _schedule_of(dataclasses.replace(record, merge=None, selection=None)) == 0.5


def test_chosen_points_compare_hma_with_the_uniform_merge_at_its_mean():
    uniform = ResultRecord(method="full", alpha=0.5, speciality={"s": 0.5}, generality={"g": 0.75})
    hma = ResultRecord(
        method="full",
        alpha=0.5,
        speciality={"s": 0.625},
        generality={"g": 0.5},
        selection={"rule": "hma", "samples": "generated"},
        merge={"kind": "groups", "group_alphas": [0.75, 0.25], "outside_alpha": 0.5, "mean_alpha": 0.5},
    )
    auto = ResultRecord(
        method="full",
        alpha=0.25,
        speciality={"s": 0.5},
        generality={"g": 0.75},
        selection={"rule": "auto", "keep": 0.9, "floor": 0.45, "evaluations": 3, "reused": 1, "monotone": True},
    )
    assert chosen_points([uniform, hma, auto]).splitlines() == [
        "- full: auto alpha 0.25 (speciality 0.500 >= floor 0.450, generality 0.750) after 3 evaluations"
        " (1 reused from the grid)",
        "- full: HMA ratios 0.75/0.25 (mean 0.5): speciality 0.625, generality 0.500; uniform alpha 0.5: 0.500, 0.750 "
        "(HMA +0.125 speciality, -0.250 generality)",
    ]
    assert hma.setting == "alpha=0.5 (HMA search, generated; groups 0.75/0.25)"
    assert auto.setting == "alpha=0.25 (auto: keeps 90% of the gain, 3 evaluations)"
    with pytest.raises(ValueError, match="selection must be a mapping whose rule is one of"):
        ResultRecord(
            method="full", alpha=0.5, speciality={"s": 1.0}, generality={"g": 1.0}, selection={"rule": "guess"}
        )
    with pytest.raises(ValueError, match="needs the merge's"):
        ResultRecord(method="full", speciality={"s": 1.0}, generality={"g": 1.0}, selection={"rule": "auto"})


def test_yaml_mappings_and_auto_in_alphas(tmp_path):
    module = load_recipe("galactica_med")
    types = (module.MedMCQAArguments, ExperimentArguments, SpecGenTrainingArguments)
    preset = tmp_path / "preset.yaml"
    preset.write_text(
        "alphas: auto\nauto: {keep: 0.9, budget: 4}\nhma: {groups: 3, mean_alphas: [0.2, 0.5], samples: targets}\n"
    )
    _, experiment, _ = parse_config(types, ["--config", str(preset), "--output_dir", str(tmp_path)])
    assert (experiment.alphas, experiment.auto_alpha, experiment.auto_keep, experiment.auto_budget) == (
        [],
        True,
        0.9,
        4,
    )
    assert (experiment.hma_groups, experiment.hma_mean_alphas, experiment.hma_samples) == (3, [0.2, 0.5], "targets")
    _, experiment, _ = parse_config(types, ["--alphas", "0", "0.5", "AUTO", "--output_dir", str(tmp_path)])
    assert (experiment.alphas, experiment.auto_alpha) == ([0.0, 0.5], True)
    for text, message in [
        ("hma: {groups: 3, mean: [0.2]}", r"unknown field\(s\) \['hma.mean'\]"),
        ("hma: {groups: 3}\nhma_groups: 2", "hma_groups is given twice"),
    ]:
        preset.write_text(text + "\n")
        with pytest.raises(ConfigError, match=message):
            parse_config(types, ["--config", str(preset), "--output_dir", str(tmp_path)])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"alphas": ["0.5", "autox"]}, "'autox' is neither a number in \\[0, 1\\] nor auto"),
        ({"alphas": ["auto", "auto"]}, "names auto twice"),
        ({"alphas": []}, "alphas is empty"),
        ({"publish_point": "auto"}, "publish_point auto publishes an auto-alpha pick"),
        ({"auto_keep": 0.0}, "auto_keep must be in"),
        ({"auto_budget": 0}, "auto_budget must be >= 1"),
        ({"hma_groups": 2, "hma_mean_alphas": [0.0]}, "hma_mean_alphas must be one or more means in"),
        ({"selection_methods": ["full", "l3"]}, "unknown method 'l3'"),
        ({"hma_groups": -1}, "hma_groups must be >= 1 \\(or 0: no HMA points\\)"),
        ({"hma_groups": 2, "hma_max_samples": 1}, "hma_max_samples must be >= 2"),
    ],
)
def test_bad_selection_options_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        ExperimentArguments(**changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hma_groups": 5}, "hma_groups 5: 5 groups, but model.decoder.layers has only 4 blocks"),
        ({"auto_alpha": True, "publish_point": "auto", "selection_methods": ["full"]}, "no auto pick to publish"),
    ],
)
def test_chosen_points_that_cannot_be_made_stop_before_training(tmp_path, changes, message):
    recipe, experiment, training = lm_experiment(tmp_path / "out")
    with pytest.raises(ConfigError, match=message):
        run_experiment(recipe, dataclasses.replace(experiment, **changes), training)
    assert not (tmp_path / "out").exists()
