"""DeepSpeed ZeRO-2 / ZeRO-3 on CPU (gloo, 2 processes), launched with the recipes' Accelerate
configs as users launch: KD and feature protection give the weights and logged terms of one
process, with the teacher partitioned under ZeRO-3; the weight-space penalties are refused with a
clear message until they are partition-local."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import OPTForCausalLM

from hf_specgen.merge import wise_ft

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "scripts" / "train_tiny.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def launch(output_dir: Path, regularizers: str, config: str | None) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "recipes" / "accelerate" / f"{config}.yaml"),
                "--num_processes", "2", "--main_process_port", "0"] if config else [sys.executable]  # fmt: skip
    return subprocess.run([*launcher, str(SCRIPT), str(output_dir), regularizers], env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def result(output_dir: Path) -> tuple[dict, dict]:
    return torch.load(output_dir / "weights.pt"), json.loads((output_dir / "result.json").read_text())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("one")
    assert launch(output_dir, "kd,feature", None).returncode == 0
    return output_dir


@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_distillation_terms_under_zero_match_one_process(config, one_process, tmp_path):
    run = launch(tmp_path, "kd,feature", config)
    assert run.returncode == 0, run.stderr[-3000:]
    one_dir = one_process / "model"
    (one_weights, one), (two_weights, two) = result(one_process), result(tmp_path)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert set(two_weights) == set(one_weights)
    for name, weight in one_weights.items():  # ZeRO-3's partitions gathered for the comparison
        assert two_weights[name].shape == weight.shape and torch.allclose(weight, two_weights[name], atol=1e-5), name
    teacher = two["teacher"]
    if config == "zero3":  # partitioned like the model: about half on each of 2 ranks (partitions are padded)
        assert teacher["total"] / 2 <= teacher["local"] < teacher["total"] / 2 * 1.01, teacher
    else:
        assert teacher["local"] == teacher["total"] == one["teacher"]["total"]
    # save_model writes a consolidated HuggingFace checkpoint that from_pretrained and the merge read
    saved = OPTForCausalLM.from_pretrained(tmp_path / "model").state_dict()
    assert all(torch.equal(saved[name], two_weights[name]) for name in saved)
    merged = OPTForCausalLM.from_pretrained(wise_ft(one_dir, tmp_path / "model", 0.5, tmp_path / "merged")).state_dict()
    for name in saved:
        assert torch.allclose(merged[name], (one_weights[name] + two_weights[name]) / 2, atol=1e-6), name
    assert len(one["logs"]) == len(two["logs"]) == 3
    for a, b in zip(one["logs"], two["logs"]):
        for key in ("loss", "loss_task", "loss_kd", "loss_feature"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key


def test_weight_penalties_are_refused_under_deepspeed(tmp_path):
    run = launch(tmp_path, "l2", "zero3")
    assert run.returncode != 0
    assert "l1_lambda, l2_lambda and ewc_lambda are not supported under DeepSpeed yet" in run.stderr
    assert not (tmp_path / "weights.pt").exists()
