"""DeepSpeed ZeRO-2 / ZeRO-3 on CPU (gloo, 2 processes), launched as users launch: with the
recipes' Accelerate configs, and with `TrainingArguments(deepspeed=...)` under torchrun. Every
regularizer gives the weights and the logged (whole-model) terms of one process: KD and feature
protection with the teacher partitioned under ZeRO-3; L1, L2-SP (both modes) and EWC on each
rank's own partition, the anchor and the Fisher cut to about half a model per rank; a ZeRO-3
run resumed from its checkpoint ends where the uninterrupted one does; CPU offload too (ZeRO-1,
2 and 3). The gradient norm DeepSpeed clips and logs is one process's, with clipping active
(max_grad_norm 1 below every step's norm). A run without use_cpu=True, where accelerate counts
one process on CPU, logs the values of one process too."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch_helpers import ENV, ROOT, accelerate_launch, torchrun
from transformers import OPTForCausalLM

from hf_specgen.merge import wise_ft


SCRIPT = ROOT / "tests" / "scripts" / "train_tiny.py"
PENALTIES = ("loss", "loss_task", "loss_l1", "loss_l2", "loss_ewc", "loss_mas")
OFFLOADED = (
    "loss",
    "loss_task",
    "loss_l1",
    "loss_ewc",
    "loss_mas",
    "l2_distance",
)  # L1, EWC, MAS, decoupled L2: CPU Adam
ADAMW = ("--steps", "4", "--optim", "adamw_torch")


def launcher(config: str | None) -> list[str]:
    """One process (None), 2 under torchrun ("torchrun"), or 2 under Accelerate with a recipe's config."""
    if config is None:
        return [sys.executable]
    return torchrun(2) if config == "torchrun" else accelerate_launch(2, config)


def launch(output_dir: Path, regularizers: str, config: str | None, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*launcher(config), str(SCRIPT), str(output_dir), regularizers, *options],
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def launched(output_dir: Path, regularizers: str, config: str | None, *options: str) -> Path:
    run = launch(output_dir, regularizers, config, *options)
    assert run.returncode == 0, run.stderr[-3000:]
    return output_dir


def result(output_dir: Path) -> tuple[dict, dict]:
    return torch.load(output_dir / "weights.pt"), json.loads((output_dir / "result.json").read_text())


def assert_same_run(one_dir: Path, two_dir: Path, keys: tuple[str, ...], atol: float = 1e-5) -> tuple[dict, dict]:
    """The same weights (ZeRO-3's partitions gathered) and logged values, step by step."""
    (one_weights, one), (two_weights, two) = result(one_dir), result(two_dir)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["accelerate_processes"] == (2 if two["use_cpu"] else 1)  # accelerate counts 1 without use_cpu
    assert set(two_weights) == set(one_weights)
    for name, weight in one_weights.items():
        assert two_weights[name].shape == weight.shape and torch.allclose(weight, two_weights[name], atol=atol), name
    assert len(one["logs"]) == len(two["logs"])
    for a, b in zip(one["logs"], two["logs"]):
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    return one, two


def assert_clipping_active(run: dict) -> None:
    """Every step's gradient norm is above max_grad_norm: the norm compared is the one that scaled the step."""
    limit, norms = run["max_grad_norm"], [entry["grad_norm"] for entry in run["logs"]]
    assert limit > 0 and min(norms) > limit, (limit, norms)


def assert_halved(one: dict, two: dict, kind: str) -> None:
    """Each of the 2 ranks holds its own half of the anchor / the Fisher: together exactly one copy."""
    whole, ranks = one["anchor_memory"][0][kind], [rank[kind] for rank in two["anchor_memory"]]
    assert whole > 0 and sum(ranks) == whole, (whole, ranks)
    assert all(rank <= whole / 2 * 1.01 for rank in ranks), (whole, ranks)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return launched(tmp_path_factory.mktemp("one"), "kd,feature,l1", None)


@pytest.fixture(scope="module")
def one_process_penalties(tmp_path_factory):
    return launched(tmp_path_factory.mktemp("one_penalties"), "l1,l2,ewc,mas", None, "--steps", "4")


@pytest.fixture(scope="module")
def one_process_adamw(tmp_path_factory):
    """L1, decoupled L2-SP and EWC stepped by torch's AdamW: what DeepSpeed's CPU Adam steps under optimizer
    offload."""
    return launched(tmp_path_factory.mktemp("one_adamw"), "l1,l2d,ewc,mas", None, *ADAMW)


@pytest.fixture(scope="module")
def one_process_decoupled(tmp_path_factory):
    return launched(tmp_path_factory.mktemp("one_decoupled"), "l2d", None, "--steps", "4")


@pytest.fixture(scope="module")
def zero_penalties(tmp_path_factory):
    """`zero_penalties(config)`: L1, L2-SP and EWC under ZeRO, 4 steps with a checkpoint after 2, launched once."""
    runs: dict[str, Path] = {}

    def run(config: str) -> Path:
        if config not in runs:
            output_dir = tmp_path_factory.mktemp(f"{config}_penalties")
            runs[config] = launched(output_dir, "l1,l2,ewc,mas", config, "--steps", "4", "--save-steps", "2")
        return runs[config]

    return run


# ZeRO-1 and ZeRO-2 with `offload_optimizer`; the ZeRO-2 launch leaves use_cpu unset as well (issue 13, item 13)
OFFLOAD_LAUNCHES = {1: (), 2: ("--no-use-cpu",)}


@pytest.fixture(scope="module")
def zero12_offload(tmp_path_factory):
    """`zero12_offload(stage)`: L1, EWC and decoupled L2-SP with recipes/deepspeed/zero2_offload.json (set to `stage`):
    the optimizer offloaded to CPU, stepped by DeepSpeed's CPU Adam, which accelerate puts in AdamW's place; torchrun +
    TrainingArguments(deepspeed=...), launched once. The config leaves train_batch_size out for DeepSpeed to derive
    from its own count of processes: without use_cpu the Trainer would fill "auto" with its world size of 1, which
    DeepSpeed's batch check refuses (a plain Trainer's too)."""
    runs: dict[int, Path] = {}

    def run(stage: int) -> Path:
        if stage not in runs:
            config = json.loads((ROOT / "recipes" / "deepspeed" / "zero2_offload.json").read_text())
            config["zero_optimization"]["stage"] = stage
            del config["train_batch_size"]
            output_dir = tmp_path_factory.mktemp(f"zero{stage}_offload")
            config_file = output_dir / "ds_config.json"
            config_file.write_text(json.dumps(config))
            runs[stage] = launched(
                output_dir / "run",
                "l1,l2d,ewc,mas",
                "torchrun",
                *ADAMW,
                "--deepspeed",
                str(config_file),
                *OFFLOAD_LAUNCHES[stage],
            )
        return runs[stage]

    return run


@pytest.mark.parametrize(("config", "options"), [("zero2", ()), ("zero3", ()), ("zero3", ("--zero-init",))])
def test_distillation_terms_under_zero_match_one_process(config, options, one_process, tmp_path):
    """KD and feature protection, with L1 beside them: its anchor is the teacher's copy of the weights
    in one process, and under ZeRO this rank's slice of it, taken before the teacher is partitioned.
    With `--zero-init` the model is loaded partitioned, as `from_pretrained` loads it once
    TrainingArguments enabled ZeRO-3: the teacher is then a partitioned copy made partition by partition."""
    launched(tmp_path, "kd,feature,l1", config, *options)
    one_dir = one_process / "model"
    keys = ("loss", "loss_task", "loss_kd", "loss_feature", "loss_l1", "grad_norm")
    one, two = assert_same_run(one_process, tmp_path, keys)
    assert_clipping_active(one)
    one_weights, two_weights = result(one_process)[0], result(tmp_path)[0]
    teacher = two["teacher"]
    if config == "zero3":  # partitioned like the model: about half on each of 2 ranks (partitions are padded)
        assert teacher["total"] / 2 <= teacher["local"] < teacher["total"] / 2 * 1.01, teacher
    else:
        assert teacher["local"] == teacher["total"] == one["teacher"]["total"]
    # save_model writes a consolidated HuggingFace checkpoint that from_pretrained and the merge read
    saved = OPTForCausalLM.from_pretrained(tmp_path / "model").state_dict()
    assert all(torch.equal(saved[name], two_weights[name]) for name in saved)
    merged = OPTForCausalLM.from_pretrained(
        wise_ft(one_dir, tmp_path / "model", 0.5, tmp_path / "merged")
    ).state_dict()
    for name in saved:
        assert torch.allclose(merged[name], (one_weights[name] + two_weights[name]) / 2, atol=1e-6), name
    assert len(one["logs"]) == 3


@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_weight_penalties_under_zero_match_one_process(config, zero_penalties, one_process_penalties):
    """Same weights and whole-model L1 / L2 / EWC values; the same gradient norm, so the penalties'
    gradients are clipped with the task gradient (max_grad_norm 1 < the norm) as in one process."""
    one, two = assert_same_run(one_process_penalties, zero_penalties(config), (*PENALTIES, "grad_norm"))
    assert_clipping_active(one)
    assert len(one["logs"]) == 4 and one["logs"][-1]["loss_ewc"] > 0 and one["logs"][-1]["loss_mas"] > 0
    assert_halved(one, two, "weights")  # the anchor: about half of the one-process snapshot per rank
    assert_halved(one, two, "fisher")
    assert one["fisher_estimated"] and two["fisher_estimated"]


@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_decoupled_l2_under_zero_matches_one_process(config, one_process_decoupled, tmp_path):
    launched(tmp_path, "l2d", config, "--steps", "4")
    one, two = assert_same_run(one_process_decoupled, tmp_path, ("loss", "loss_task", "l2_distance", "grad_norm"))
    assert_clipping_active(one)
    assert "loss_l2" not in one["logs"][0] and one["logs"][0]["l2_distance"] > 0
    assert_halved(one, two, "weights")


def test_zero3_resume_continues_to_the_uninterrupted_weights(zero_penalties, tmp_path):
    """Resumed from the step-2 checkpoint in a fresh launch: the per-rank Fisher comes from the
    checkpoint (not re-estimated at the trained weights) and the run ends where the uninterrupted
    one did. The resumed launch loads the model partitioned (zero.Init), so its anchor is never
    whole on a rank and is sliced from each weight's partition."""
    full_dir = zero_penalties("zero3")
    checkpoint = full_dir / "checkpoint-2"
    assert sorted(p.name for p in checkpoint.glob("specgen_regularizers*")) == [
        "specgen_regularizers.rank0-of-2.safetensors",
        "specgen_regularizers.rank1-of-2.safetensors",
    ]
    launched(tmp_path, "l1,l2,ewc,mas", "zero3", "--steps", "4", "--resume", str(checkpoint), "--zero-init")
    (full_weights, full), (resumed_weights, resumed) = result(full_dir), result(tmp_path)
    assert not resumed["fisher_estimated"]
    assert resumed["anchor_at_start"] == full["anchor_memory"][0]["weights"]  # half from the start
    for name, weight in full_weights.items():
        assert torch.allclose(weight, resumed_weights[name], atol=1e-6), name
    for a, b in zip(full["logs"][2:], resumed["logs"][2:]):
        for key in PENALTIES:
            assert a[key] == pytest.approx(b[key], rel=1e-5), key


def test_zero3_cpu_offload_matches_one_process(one_process_adamw, tmp_path):
    """ZeRO-3 with parameters and optimizer state in CPU memory, stepped by DeepSpeed's CPU Adam (on a
    GPU the local API hands out copies of these partitions, written back): L1, EWC and decoupled L2
    together, against torch's AdamW in one process."""
    launched(tmp_path, "l1,l2d,ewc,mas", "zero3_offload", *ADAMW)
    one, two = assert_same_run(one_process_adamw, tmp_path, (*OFFLOADED, "grad_norm"))
    assert_clipping_active(one)
    assert_halved(one, two, "weights")


@pytest.mark.parametrize("stage", [2, 1])
def test_deepspeed_json_in_training_arguments_matches_one_process(stage, one_process_penalties, tmp_path):
    """`TrainingArguments(deepspeed="recipes/deepspeed/zero2.json")` under torchrun, "auto" values filled by the
    Trainer; 2 micro-batches of 1 row per step on each rank: the penalties still count once per step. ZeRO-1
    (the same file at stage 1: optimizer state partitioned, gradients whole until the step) too."""
    config = json.loads((ROOT / "recipes" / "deepspeed" / "zero2.json").read_text())
    config["zero_optimization"]["stage"] = stage
    config_file = tmp_path / f"zero{stage}.json"
    config_file.write_text(json.dumps(config))
    output_dir = tmp_path / "run"
    launched(
        output_dir, "l1,l2,ewc,mas", "torchrun", "--steps", "4", "--accumulation", "2", "--deepspeed", str(config_file)
    )
    one, two = assert_same_run(one_process_penalties, output_dir, (*PENALTIES, "grad_norm"))
    assert_clipping_active(one)
    assert_halved(one, two, "weights")


@pytest.mark.parametrize("stage", sorted(OFFLOAD_LAUNCHES))
def test_zero12_offload_penalties_inside_the_clipped_norm(stage, zero12_offload, one_process_adamw):
    """ZeRO-1/2 with `offload_optimizer` take the norm they clip and log during backward, fragment by fragment; the
    penalties' gradients (L1, EWC), added to the offloaded fp32 gradient after that, must be in it (issue 13, item 1):
    the same weights, gradient norm (clipping active on every step) and terms as one process; decoupled L2 too."""
    one, two = assert_same_run(one_process_adamw, zero12_offload(stage), (*OFFLOADED, "grad_norm"))
    assert_clipping_active(one)
    assert_halved(one, two, "weights")


def test_logged_terms_without_use_cpu_match_one_process(zero12_offload, one_process_adamw):
    """Without use_cpu=True accelerate counts one process under DeepSpeed on CPU while 2 train (issue 13, item 13):
    the terms are averaged over the processes the way the Trainer averages `loss` (accelerate's gather crashed), each
    rank's share counted once per process: loss, loss_task and every term as in one process."""
    (_, one), (_, two) = result(one_process_adamw), result(zero12_offload(2))
    assert two["use_cpu"] is False and two["accelerate_processes"] == 1  # the case of the item
    assert len(one["logs"]) == len(two["logs"]) == 4
    for a, b in zip(one["logs"], two["logs"]):
        for key in OFFLOADED:
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
