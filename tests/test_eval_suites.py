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
from hf_specgen.eval.lm_tasks import MEDMCQA_HUB_ID, medmcqa_task_dir
from hf_specgen.eval.report import load_records
from hf_specgen.eval.suites import LM_SUITES, check_suites
from hf_specgen.tiny import CLASS_NAMES, GENERAL_TASKS, MEDMCQA_TASK, clip_path, image_domains, lm_path, zero_shot_templates


def test_tiny_suites_name_the_tiny_tasks():
    assert LM_SUITES["tiny_general"].tasks == GENERAL_TASKS
    assert LM_SUITES["tiny_medmcqa"].tasks == (MEDMCQA_TASK,)


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
        main(["eval", "--model", str(lm_path()), "--suite", "nope", "--method", "full", "--output", str(tmp_path / "r.json")])
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
    assert main(["eval", "--model", str(lm_path()), *lm, "pre-trained", "--alpha", "0", "--output", str(records / "lm.json")]) == 0
    assert main(["eval", "--model", str(clip_path()), "--suite", "tiny_clip", "--method", "zero-shot",
                 "--output", str(records / "clip" / "clip.json")]) == 0  # fmt: skip
    saved = json.loads((records / "lm.json").read_text())
    assert set(saved["speciality"]) == {"tiny_medmcqa"}
    assert set(saved["generality"]) == {"tiny_arithmetic", "tiny_instructions", "tiny_world_facts", "tiny_cause_effect"}
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
