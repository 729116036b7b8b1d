"""The Trainer's machinery: logging, gradient accumulation, bf16 autocast, save and resume."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, lm_dataset, perturb_, tiny_opt
from launch_helpers import free_port

from hf_specgen import SpecGenTrainer
from hf_specgen.regularizers import EWC, MAS
from hf_specgen.trainer import STATE_FILE


ALL_ON = dict(
    l1_lambda=0.01,
    l2_lambda=0.5,
    ewc_lambda=2.0,
    ewc_num_samples=4,
    mas_lambda=0.05,
    mas_num_samples=4,
    kd_lambda=0.7,
    feature_lambda=0.3,
)
TERMS = ["loss_l1", "loss_l2", "loss_ewc", "loss_mas", "loss_kd", "loss_feature"]


def train(args_factory, data, *, perturb=False, branch_b=False, **kwargs):
    model = tiny_opt()
    trainer = SpecGenTrainer(model=model, args=args_factory(**kwargs), train_dataset=data)
    if perturb:  # start away from the pre-trained weights, so distance terms act from step 1
        perturb_(model)
    if branch_b:  # the Trainer's other loss-scaling branch: per-micro-batch means divided by the accumulation
        trainer.model_accepts_loss_kwargs = False
    trainer.train()
    return trainer


@pytest.mark.parametrize("regularizers", [ALL_ON, dict(l2_lambda=0.5)], ids=["all", "l2_only"])
def test_each_term_is_logged_and_they_add_up_to_the_loss(args_factory, regularizers):
    trainer = train(
        args_factory,
        lm_dataset(16),
        perturb=True,
        max_steps=4,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=2,
        **regularizers,
    )
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    terms = [name for name in TERMS if name.removeprefix("loss_") + "_lambda" in regularizers]
    assert len(logs) == 4
    for entry in logs:
        assert sorted(k for k in entry if k.startswith("loss_")) == sorted(["loss_task", *terms])
        assert all(entry[name] > 0 for name in terms)
        assert entry["loss"] == pytest.approx(entry["loss_task"] + sum(entry[name] for name in terms), rel=1e-5)


@pytest.mark.parametrize("branch_b", [False, True], ids=["num_items_in_batch", "per_batch_mean"])
@pytest.mark.parametrize(
    "regularizer",
    [
        dict(l1_lambda=0.05),
        dict(l2_lambda=1.0),
        dict(l2_lambda=5.0, l2_mode="decoupled"),
        dict(ewc_lambda=5.0, ewc_num_samples=4),
        dict(kd_lambda=2.0),
        dict(feature_lambda=1.0),
    ],
    ids=["l1", "l2", "l2_decoupled", "ewc", "kd", "feature"],
)
def test_gradient_accumulation_gives_the_same_weights(args_factory, regularizer, branch_b):
    """Batch 4 and batch 2 x accumulation 2: the same optimizer steps, each term counted once per step."""
    data = lm_dataset(12)
    common = dict(max_steps=3, optim="sgd", learning_rate=0.1, lr_scheduler_type="constant", **regularizer)
    one = train(args_factory, data, perturb=True, branch_b=branch_b, per_device_train_batch_size=4, **common)
    two = train(
        args_factory,
        data,
        perturb=True,
        branch_b=branch_b,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        **common,
    )
    for (name, p), q in zip(one.model.named_parameters(), two.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
    log_one, log_two = ([e for e in t.state.log_history if "loss" in e] for t in (one, two))
    key = next(k for k in log_one[0] if k.startswith(("loss_", "l2_distance")) and k != "loss_task")
    for a, b in zip(log_one, log_two):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_bf16_autocast_and_clipping(args_factory):
    trainer = train(args_factory, lm_dataset(8), perturb=True, bf16=True, max_grad_norm=0.5, **ALL_ON)
    assert trainer.accelerator.mixed_precision == "bf16"
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor([e[n] for n in TERMS])).all() for e in logs)
    assert all(e["grad_norm"] > 0.5 for e in logs)  # the clipped norm counts the penalties too


def test_resume_ends_with_the_same_weights_and_reuses_the_saved_fisher(args_factory, tmp_path, monkeypatch):
    data = lm_dataset(24)
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, **ALL_ON)
    full = train(args_factory, data, **common)
    checkpoint = os.path.join(full.args.output_dir, "checkpoint-3")
    assert os.path.isfile(os.path.join(checkpoint, STATE_FILE))

    def no_estimate(*_args, **_kwargs):
        raise AssertionError("the Fisher must come from the checkpoint, not be re-estimated")

    monkeypatch.setattr(EWC, "estimate", no_estimate)
    monkeypatch.setattr(MAS, "estimate", no_estimate)
    resumed = SpecGenTrainer(
        model=tiny_opt(), args=args_factory(**{**common, "output_dir": str(tmp_path / "resumed")}), train_dataset=data
    )
    resumed.train(resume_from_checkpoint=checkpoint)
    for name in ("ewc", "mas"):  # EWC's Fisher and MAS's Omega, from the checkpoint
        term = lambda t: next(r for r in t.regularizers if r.name == name)  # noqa: B023, E731
        assert set(term(resumed).importance) == set(term(full).importance)
        assert all(torch.equal(term(full).importance[k], v) for k, v in term(resumed).importance.items())
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
    last = lambda t: [e for e in t.state.log_history if "loss" in e][-1]  # noqa: E731
    assert last(full)["loss_ewc"] == pytest.approx(last(resumed)["loss_ewc"], rel=1e-4)
    assert last(full)["loss_mas"] == pytest.approx(last(resumed)["loss_mas"], rel=1e-4)


@pytest.mark.parametrize(
    "terms", [dict(l2_lambda=1.0), dict(kd_lambda=1.0), dict(feature_lambda=1.0)], ids=["l2", "kd", "feature"]
)
def test_resume_from_other_pretrained_weights_is_refused(args_factory, tmp_path, terms):
    """Whatever the terms: a KD or feature checkpoint used to save checksum 0 and accept any teacher."""
    data = lm_dataset(8)
    full = train(args_factory, data, max_steps=2, save_strategy="steps", save_steps=2, **terms)
    other = SpecGenTrainer(
        model=tiny_opt(seed=7), args=args_factory(output_dir=str(tmp_path / "o"), **terms), train_dataset=data
    )
    with pytest.raises(ValueError, match="toward other pre-trained weights"):
        other.train(resume_from_checkpoint=os.path.join(full.args.output_dir, "checkpoint-2"))


@pytest.mark.parametrize(
    "resumed_with", [dict(kd_lambda=1.0), dict(feature_lambda=0.5, l1_lambda=0.01)], ids=["kd", "feature_l1"]
)
def test_resume_with_other_terms_from_the_same_pretrained_weights(args_factory, tmp_path, resumed_with):
    """An L2 + EWC checkpoint resumed as KD (or feature + L1) from the same pre-trained model: the same
    reference, accepted (it was refused as "other pre-trained weights")."""
    data = lm_dataset(8)
    full = train(
        args_factory,
        data,
        max_steps=2,
        save_strategy="steps",
        save_steps=2,
        l2_lambda=1.0,
        ewc_lambda=1.0,
        ewc_num_samples=2,
    )
    resumed = SpecGenTrainer(
        model=tiny_opt(),
        args=args_factory(output_dir=str(tmp_path / "r"), max_steps=3, **resumed_with),
        train_dataset=data,
    )
    resumed.train(resume_from_checkpoint=os.path.join(full.args.output_dir, "checkpoint-2"))
    assert resumed.state.global_step == 3


def test_a_second_train_logs_only_its_own_steps(args_factory):
    """The first train() ends on an unlogged step; the second one's first log must not count it (it logged
    `loss` 9.327 beside `loss_task + loss_l2` = 10.005)."""
    trainer = train(args_factory, lm_dataset(8), perturb=True, max_steps=3, logging_steps=2, l2_lambda=5.0)
    trainer.train()  # a new TrainerState: its log history is the second run's
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs and all(e["loss"] == pytest.approx(e["loss_task"] + e["loss_l2"], rel=1e-5) for e in logs)


@pytest.mark.parametrize(
    "terms", [dict(l2_lambda=1.0), dict(kd_lambda=1.0), dict(feature_lambda=1.0)], ids=["l2", "kd", "feature"]
)
def test_vocabulary_resized_after_building_the_trainer_is_refused(args_factory, terms):
    model = tiny_opt()
    trainer = SpecGenTrainer(model=model, args=args_factory(**terms), train_dataset=lm_dataset(8))
    model.resize_token_embeddings(VOCAB + 8)
    with pytest.raises(
        ValueError,
        match=r"is shape \(72, 16\); it was shape \(64, 16\) when .*resize_token_embeddings.*build the trainer after",
    ):
        trainer.train()


def test_every_term_is_exactly_zero_at_step_zero_under_bf16(args_factory):
    """The teacher runs under the student's autocast: at the pre-trained weights KD and the feature term are
    exactly 0 (a float32 teacher beside a bf16-autocast student gave KD > 0 at step 0), like the weight terms."""
    trainer = train(args_factory, lm_dataset(8), bf16=True, max_steps=1, **ALL_ON)
    assert trainer.accelerator.mixed_precision == "bf16"
    (log,) = [e for e in trainer.state.log_history if "loss" in e]
    assert log["loss_task"] > 0
    assert {name: log[name] for name in TERMS} == dict.fromkeys(TERMS, 0.0)


FSDP_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from conftest import make_args, tiny_opt
from hf_specgen import SpecGenTrainer
try:
    SpecGenTrainer(model=tiny_opt(), args=make_args({out!r}, fsdp="full_shard", l2_lambda=1.0))
except ValueError as error:
    print("REFUSED:", error)
"""


def test_fsdp_is_refused_naming_deepspeed(tmp_path):
    """FSDP (here in one distributed process, as torchrun starts it) is neither handled nor silently ignored."""
    env = {
        **os.environ,
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "HF_HUB_OFFLINE": "1",
    }
    script = FSDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path / "out"))
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "REFUSED: the regularizers (*_lambda > 0) do not support FSDP yet: shard with DeepSpeed ZeRO" in run.stdout
