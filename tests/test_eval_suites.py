"""Named suites, `specgen eval` / `specgen report` end to end on the tiny foundations, the MedMCQA
task over the Hub data set, CLIP class-subset masking and local image folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from hf_specgen.cli import main
from hf_specgen.data.image_classification import load_image_set
from hf_specgen.eval.clip import accuracy, image_logits, zero_shot_head
from hf_specgen.eval.lm import TaskScore, _primary_score, _task_manager, evaluate_lm
from hf_specgen.eval.lm_tasks import MEDMCQA_HUB_ID, medmcqa_task_dir
from hf_specgen.eval.records import load_records
from hf_specgen.eval.suites import LM_SUITES, LMSuite, check_suites, suite_scores, task_metrics
from hf_specgen.tiny import (
    CLASS_NAMES,
    GENERAL_TASKS,
    MEDMCQA_TASK,
    clip_path,
    image_domains,
    lm_path,
    zero_shot_templates,
)


def test_tiny_suites_name_the_tiny_tasks():
    assert LM_SUITES["tiny_general"].tasks == GENERAL_TASKS
    assert LM_SUITES["tiny_medmcqa"].tasks == (MEDMCQA_TASK,)


ALIGNMENT_TAX = {  # task -> the metric scored: accuracy, F1, BLEU as in "Mitigating the Alignment Tax of RLHF"
    "arc_easy": "acc",
    "arc_challenge": "acc",
    "race": "acc",
    "piqa": "acc",
    "squadv2": "f1",
    "drop": "f1",
    "wmt14-fr-en": "bleu",
}


def test_alignment_tax_suite_names_the_papers_tasks():
    suite = LM_SUITES["alignment_tax"]
    assert suite.tasks == tuple(ALIGNMENT_TAX) and suite.role == "generality"
    assert "downloads its data from the Hub" in suite.description
    assert task_metrics([suite]) == {"squadv2": "f1", "drop": "f1", "wmt14-fr-en": "bleu"}
    assert [suite.pick(task)[1] for task in suite.tasks] == [1, 1, 1, 1, 0.01, 1, 0.01]


def test_alignment_tax_tasks_and_metrics_are_in_lm_evals_registry():
    """Each task is a registry name whose configuration (read offline, nothing downloaded) lists
    the metric scored: a task or metric renamed in lm-eval fails here, not after a download."""
    from lm_eval.tasks._yaml_loader import load_yaml

    manager, suite = _task_manager(()), LM_SUITES["alignment_tax"]
    assert set(suite.tasks) <= set(manager.all_subtasks)
    for task, expected in ALIGNMENT_TAX.items():
        config = load_yaml(manager.task_index[task].yaml_path)
        assert config["task"] == task
        if "class" in config:  # a Python task (SQuAD v2): its metrics are its aggregations
            listed = list(object.__new__(config["class"]).aggregation())
        else:
            listed = [entry["metric"] for entry in config["metric_list"]]
        assert (suite.pick(task)[0] or listed[0]) == expected and expected in listed, (task, listed)


def test_scales_bring_lm_evals_own_scores_to_0_1():
    """lm-eval's BLEU of a perfect translation is 100, DROP's F1 of a half-right answer 0.5 (its
    exact match 0): the suite's scores are 1 and 0.5."""
    from lm_eval.api.metrics import bleu
    from lm_eval.tasks._yaml_loader import load_yaml

    suite = LM_SUITES["alignment_tax"]
    process_drop = load_yaml(_task_manager(()).task_index["drop"].yaml_path)["process_results"]
    drop = process_drop({"answers": [("two cats",)]}, ["two dogs"])
    assert drop == {"em": 0, "f1": 0.5}
    perfect = bleu([("the cat sat on the mat", "the cat sat on the mat")])
    scores = {
        "wmt14-fr-en": TaskScore("wmt14-fr-en", "bleu", perfect, None, 1),
        "drop": TaskScore("drop", "f1", drop["f1"], None, 1),
    }
    assert suite.score("wmt14-fr-en", scores) == pytest.approx(1.0) and suite.score("drop", scores) == 0.5


def lm_eval_output() -> dict:
    """What `simple_evaluate` returns for the alignment-tax tasks (the parts `_primary_score` reads)."""
    from lm_eval.api.task import TaskConfig

    multiple_choice = {"metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}
    configs = {task: multiple_choice for task in ("arc_easy", "arc_challenge", "race", "piqa")}
    configs |= {
        "squadv2": TaskConfig(metadata={"version": 3}).to_dict(),  # what SQuAD2.__init__ configures
        "drop": {"metric_list": [{"metric": "em"}, {"metric": "f1"}]},
        "wmt14-fr-en": {"metric_list": [{"metric": "bleu"}, {"metric": "ter"}, {"metric": "chrf"}]},
    }
    results = {
        task: {"alias": task, "acc,none": 0.5 + i / 10, "acc_stderr,none": 0.01, "acc_norm,none": 0.2}
        for i, task in enumerate(("arc_easy", "arc_challenge", "race", "piqa"))
    }
    results |= {
        "squadv2": {
            "alias": "squadv2",
            "exact,none": 50.0,
            "exact_stderr,none": "N/A",
            "f1,none": 55.0,
            "f1_stderr,none": "N/A",
            "HasAns_f1,none": 60.0,
            "best_f1,none": 58.0,
        },
        "drop": {"alias": "drop", "em,none": 0.3, "em_stderr,none": 0.02, "f1,none": 0.4, "f1_stderr,none": 0.03},
        "wmt14-fr-en": {
            "alias": "wmt14-fr-en",
            "bleu,none": 25.0,
            "bleu_stderr,none": 1.5,
            "ter,none": 70.0,
            "chrf,none": 50.0,
        },
    }
    return {"configs": configs, "results": results, "n-samples": {task: {"effective": 10} for task in results}}


def test_alignment_tax_scores_pick_the_named_metric_and_scale_it():
    output, suite = lm_eval_output(), LM_SUITES["alignment_tax"]
    metrics = task_metrics([suite])
    scores = {task: _primary_score(task, output, metrics.get(task)) for task in suite.tasks}
    assert {task: score.metric for task, score in scores.items()} == ALIGNMENT_TAX
    assert scores["drop"] == TaskScore("drop", "f1", 0.4, 0.03, 10) and scores["squadv2"].stderr is None
    assert suite_scores([suite], scores) == {
        "speciality": {},
        "generality": pytest.approx(
            {
                "arc_easy": 0.5,
                "arc_challenge": 0.6,
                "race": 0.7,
                "piqa": 0.8,
                "squadv2": 0.55,
                "drop": 0.4,
                "wmt14-fr-en": 0.25,
            }
        ),
    }
    # without a choice: the first metric listed (DROP's exact match), and a Python task lists none
    assert _primary_score("drop", output) == TaskScore("drop", "em", 0.3, 0.02, 10)
    with pytest.raises(ValueError, match="task 'squadv2' lists no metrics in its configuration: name the metric"):
        _primary_score("squadv2", output)
    with pytest.raises(ValueError, match=r"lm-eval returned no 'rouge' for task 'drop': \['alias', 'em,none'"):
        _primary_score("drop", output, "rouge")


def test_metric_choices_are_checked():
    with pytest.raises(ValueError, match=r"suite 'x' names metrics for task\(s\) \['b'\] it does not have"):
        LMSuite("x", ("a",), "generality", "", metrics={"b": ("f1", 1.0)})
    task_metrics(list(LM_SUITES.values()))  # every suite sharing a task scores it the same way
    em = LMSuite("em", ("drop",), "generality", "")
    with pytest.raises(ValueError, match=r"'drop' is scored as \('f1', 1.0\) by one suite and \(None, 1.0\) by 'em'"):
        task_metrics([LM_SUITES["alignment_tax"], em])
    with pytest.raises(ValueError, match=r"metrics named for task\(s\) \['drop'\] that are not evaluated"):
        evaluate_lm(str(lm_path()), ["tiny_world_facts"], metrics={"drop": "f1"})  # before any model is loaded


def test_unknown_or_mixed_suites_are_refused_before_loading_a_model():
    with pytest.raises(ValueError, match=r"unknown suite\(s\) \['nope'\]; known: .*commonsense"):
        check_suites(["tiny_general", "nope"])
    with pytest.raises(ValueError, match="mix language-model and CLIP"):
        check_suites(["tiny_general", "tiny_clip"])
    check_suites(["tiny_general"])
    with pytest.raises(ValueError, match="measure no speciality: add a speciality suite, e.g. medmcqa, tiny_medmcqa"):
        check_suites(["tiny_general", "commonsense"], both_sides=True)
    check_suites(["tiny_clip"], both_sides=True)


def test_cli_unknown_suite_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "eval",
                "--model",
                str(lm_path()),
                "--suite",
                "nope",
                "--method",
                "full",
                "--output",
                str(tmp_path / "r.json"),
            ]
        )
    assert exit_info.value.code == 2 and "unknown suite" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_medmcqa_suite_uses_the_hub_validation_split_and_the_training_prompt(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_SPECGEN_HOME", str(tmp_path))
    directory = medmcqa_task_dir()
    text = (directory / "specgen_medmcqa.yaml").read_text()
    assert f"dataset_path: {MEDMCQA_HUB_ID}" in text and "validation_split: validation" in text
    assert "doc_to_text: !function" in text and "doc_to_target: cop" in text
    assert "hf_specgen.data.medmcqa" in (directory / "medmcqa_prompt.py").read_text()
    assert "specgen_medmcqa" in TaskManager(include_path=str(directory)).all_tasks  # indexed, nothing downloaded


def test_eval_and_report_on_the_tiny_foundations(tmp_path, capsys):
    records = tmp_path / "records"
    lm = ["--suite", "tiny_general", "--suite", "tiny_medmcqa", "--limit", "12", "--method"]
    assert (
        main(
            [
                "eval",
                "--model",
                str(lm_path()),
                *lm,
                "pre-trained",
                "--alpha",
                "0",
                "--output",
                str(records / "lm.json"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "eval",
                "--model",
                str(clip_path()),
                "--suite",
                "tiny_clip",
                "--method",
                "zero-shot",
                "--output",
                str(records / "clip" / "clip.json"),
            ]
        )
        == 0
    )
    saved = json.loads((records / "lm.json").read_text())
    assert set(saved["speciality"]) == {"tiny_medmcqa"}
    assert set(saved["generality"]) == {
        "tiny_arithmetic",
        "tiny_instructions",
        "tiny_world_facts",
        "tiny_cause_effect",
    }
    assert saved["method"] == "pre-trained" and saved["alpha"] == 0 and saved["cost"]["eval_s"] > 0
    assert all(0 <= v <= 1 for v in [*saved["speciality"].values(), *saved["generality"].values()])
    clip = json.loads((records / "clip" / "clip.json").read_text())
    assert set(clip["speciality"]) == {"photo"} and set(clip["generality"]) == {"sketch", "clipart", "painting"}
    assert len(load_records([records])) == 2

    assert main(["report", str(records), "--output-dir", str(tmp_path / "report"), "--title", "tiny"]) == 0
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["report.json", "report.md", "report.png"]
    assert "| pre-trained |" in (tmp_path / "report" / "report.md").read_text()
    assert (tmp_path / "report" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out
    # a report written inside the results tree is not read back as a record
    assert main(["report", str(records), "--output-dir", str(records / "report")]) == 0
    assert len(load_records([records])) == 2


def test_class_subset_masks_the_logits():
    model, processor = CLIPModel.from_pretrained(clip_path()), CLIPProcessor.from_pretrained(clip_path())
    data = image_domains("test", n_per_class=3, domains=["sketch"])["sketch"]
    head = zero_shot_head(model, processor, CLASS_NAMES, zero_shot_templates())
    logits = image_logits(model, processor, data, head)
    subset = [0, 2, 5, 7]
    keep = torch.tensor(data["label"])
    expected = (torch.tensor(subset)[logits[:, subset].argmax(-1)] == keep).float().mean().item()
    assert accuracy(model, processor, data, head, class_subset=subset) == pytest.approx(expected)
    assert accuracy(model, processor, data, head) == pytest.approx((logits.argmax(-1) == keep).float().mean().item())
    # a subset of one class predicts it everywhere: accuracy = that class's share
    assert accuracy(model, processor, data, head, class_subset=[3]) == pytest.approx(0.1)


def test_load_image_set_from_a_local_folder(tmp_path):
    for name, value in (("cat", 0), ("dog", 255)):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(tmp_path / name / f"{i}.png")
    data = load_image_set(tmp_path)
    assert len(data) == 4 and data.features["label"].names == ["cat", "dog"]
    assert sorted(data["label"]) == [0, 0, 1, 1]
