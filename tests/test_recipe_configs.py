"""The launch configurations users copy (`recipes/accelerate/`, `recipes/deepspeed/`) parse, point
at files that exist, and leave no "auto" value unfilled once the Trainer's arguments are known."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from conftest import tiny_opt
from transformers import TrainingArguments
from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig


RECIPES = Path(__file__).resolve().parent.parent / "recipes"
EXPECTED = {
    "single_gpu": ("NO", None),
    "multi_gpu": ("MULTI_GPU", None),
    "zero2": ("DEEPSPEED", 2),
    "zero3": ("DEEPSPEED", 3),
    "zero3_offload": ("DEEPSPEED", 3),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_config(name, monkeypatch):
    monkeypatch.chdir(RECIPES.parent)  # paths inside are relative to the repository root, as users launch
    config = load_config_from_file(str(RECIPES / "accelerate" / f"{name}.yaml"))
    distributed_type, stage = EXPECTED[name]
    assert str(config.distributed_type).endswith(distributed_type)
    if stage:
        ds_file = Path(config.deepspeed_config["deepspeed_config_file"])
        assert ds_file.is_file() and json.loads(ds_file.read_text())["zero_optimization"]["stage"] == stage
        assert config.deepspeed_config["zero3_init_flag"] == (stage == 3)


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload"])
def test_deepspeed_config_autos_are_filled_by_the_trainer_arguments(name, tmp_path):
    config = HfTrainerDeepSpeedConfig(str(RECIPES / "deepspeed" / f"{name}.json"))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=3,
        max_grad_norm=0.5,
        use_cpu=True,
        report_to=[],
    )
    config.trainer_config_process(args)
    config.trainer_config_finalize(args, tiny_opt(), num_training_steps=10)
    filled = config.config
    assert "auto" not in json.dumps(filled)
    assert filled["train_micro_batch_size_per_gpu"] == 4 and filled["gradient_accumulation_steps"] == 3
    assert filled["train_batch_size"] == 4 * 3 * args.world_size and filled["gradient_clipping"] == 0.5
    assert filled["bf16"]["enabled"] is False and filled["fp16"]["enabled"] is False
    offloaded = name.endswith("offload")
    assert ("offload_param" in filled["zero_optimization"]) == offloaded
