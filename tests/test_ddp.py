"""Distributed data parallel (gloo, 2 processes): the same weights and logged terms as 1 process."""

import json
import os
import subprocess
import sys

import pytest
import torch
from launch_helpers import ENV, torchrun


SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "train_tiny.py")


def run(output_dir, *launcher):
    subprocess.run([*launcher, SCRIPT, str(output_dir)], check=True, env=ENV, capture_output=True, timeout=300)
    with open(os.path.join(output_dir, "result.json")) as f:
        return torch.load(os.path.join(output_dir, "weights.pt")), json.load(f)


def test_two_processes_match_one(tmp_path):
    one_weights, one = run(tmp_path / "one", sys.executable)
    two_weights, two = run(tmp_path / "two", *torchrun(2))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for name, weight in one_weights.items():
        assert torch.allclose(weight, two_weights[name], atol=1e-6), name
    assert len(one["logs"]) == len(two["logs"]) == 3
    for a, b in zip(one["logs"], two["logs"]):
        # the whole-model values, not one rank's share
        for key in ("loss", "loss_task", "loss_l1", "loss_l2", "loss_ewc", "loss_kd", "loss_feature"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
