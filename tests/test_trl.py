"""The regularizers in TRL's SFT, DPO and GRPO trainers, on the shipped tiny Galactica: bit-identical to
TRL with every weight at 0, the same weight terms as `SpecGenTrainer`, DPO's reference as the anchor and
the teacher, KD on completion tokens against hand computations, GRPO's importances without labels."""

import copy
import dataclasses
import subprocess
import sys

import datasets
import pytest
import torch
import torch.nn.functional as F
from conftest import kl_rows, perturb_, snapshot
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer, TrlParser

from hf_specgen import SpecGenTrainer, SpecGenTrainingArguments
from hf_specgen.args import SpecGenArguments
from hf_specgen.deltas import DenseDelta, LoraDelta
from hf_specgen.tiny.paths import lm_path
from hf_specgen.trl import (
    SpecGenDPOConfig,
    SpecGenDPOTrainer,
    SpecGenGRPOConfig,
    SpecGenGRPOTrainer,
    SpecGenSFTConfig,
    SpecGenSFTTrainer,
)


WEIGHT_TERMS = dict(l2_lambda=1.0, ewc_lambda=2.0, ewc_num_samples=4, mas_lambda=0.5, mas_num_samples=4)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(lm_path())


def tiny_lm():
    return AutoModelForCausalLM.from_pretrained(lm_path())


def common(tmp_path, **kwargs):
    # TRL's configs default to bf16: float32 here, so that hand computations compare exactly
    defaults = dict(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        bf16=False,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        per_device_train_batch_size=4,
    )
    return {**defaults, **kwargs}


def tokenized(n=8, length=10, prompt=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 1000, (n, length), generator=g)
    completion = torch.zeros_like(ids)
    completion[:, prompt:] = 1
    return ids, completion


def sft_data(n=8):
    ids, completion = tokenized(n)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "completion_mask": completion.tolist()})


def trainer_data(n=8):
    ids, completion = tokenized(n)
    labels = ids.masked_fill(completion == 0, -100)
    return datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": labels.tolist()}
    )


def preference_data(n=8):
    prompts = ["drop the last letter a b c :", "drop the last letter x y :", "reverse a b :", "sort c a b :"]
    chosen, rejected = [" a b", " x", " b a", " a b c"], [" b c", " y", " a b", " c a b"]
    return datasets.Dataset.from_dict(
        {"prompt": prompts * (n // 4), "chosen": chosen * (n // 4), "rejected": rejected * (n // 4)}
    )


def prompt_data(n=8):
    return datasets.Dataset.from_dict(
        {"prompt": ["reverse a b c :", "repeat x y :", "sort c a b :", "drop the first letter a b c :"] * (n // 4)}
    )


def three_words(completions, **_kwargs):
    return [float(len(c.split()) == 3) for c in completions]


def losses(trainer):
    return [e for e in trainer.state.log_history if "loss" in e]


def same_weights(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# ---- arguments -----------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [SpecGenSFTConfig, SpecGenDPOConfig, SpecGenGRPOConfig])
def test_configs_are_trls_with_the_regularizer_fields(config, tmp_path):
    base = config.__mro__[2]
    ours = {f.name for f in dataclasses.fields(SpecGenArguments)}
    assert not ours & {f.name for f in dataclasses.fields(base)}  # nothing of TRL's is shadowed
    assert issubclass(config, base) and {
        f.name: f.default for f in dataclasses.fields(config) if f.name not in ours
    } == {f.name: f.default for f in dataclasses.fields(base)}
    argv = [
        "--output_dir",
        str(tmp_path),
        "--use_cpu",
        "--l2_lambda",
        "0.5",
        "--mas_lambda",
        "2",
        "--kd_temperature",
        "3",
    ]
    for parser in (HfArgumentParser(config), TrlParser(config)):
        (args,) = parser.parse_args_into_dataclasses(argv)
        assert isinstance(args, base) and (args.l2_lambda, args.mas_lambda, args.kd_temperature) == (0.5, 2.0, 3.0)
    with pytest.raises(ValueError, match="l2_lambda must be a finite number"):
        config(output_dir=str(tmp_path), use_cpu=True, l2_lambda=float("nan"))


def test_import_hf_specgen_without_trl():
    script = (
        "import sys; sys.modules['trl'] = None\n"
        "import hf_specgen; from hf_specgen import SpecGenTrainer, SpecGenTrainingArguments\n"
        "try:\n    from hf_specgen.trl import SpecGenSFTTrainer\nexcept ImportError as e:\n    print('REFUSED:', e)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "REFUSED: hf_specgen.trl.SpecGenSFTTrainer needs TRL: pip install 'hf_specgen[trl]'" in run.stdout


# ---- every weight at 0: TRL itself ----------------------------------------------------------------


def test_sft_with_every_weight_zero_is_sft(tmp_path, tokenizer):
    runs = []
    for trainer, config in ((SFTTrainer, SFTConfig), (SpecGenSFTTrainer, SpecGenSFTConfig)):
        model = tiny_lm()
        args = config(
            **common(tmp_path / trainer.__name__, max_steps=3, learning_rate=1e-2, completion_only_loss=True)
        )
        t = trainer(model=model, args=args, train_dataset=sft_data(), processing_class=tokenizer)
        t.train()
        runs.append(t)
    assert same_weights(runs[0].model, runs[1].model)
    assert [e["loss"] for e in losses(runs[0])] == [e["loss"] for e in losses(runs[1])]


def test_dpo_with_every_weight_zero_is_dpo(tmp_path, tokenizer):
    runs = []
    for trainer, config in ((DPOTrainer, DPOConfig), (SpecGenDPOTrainer, SpecGenDPOConfig)):
        args = config(
            **common(tmp_path / trainer.__name__, max_steps=3, learning_rate=1e-3, per_device_train_batch_size=2)
        )
        t = trainer(model=tiny_lm(), args=args, train_dataset=preference_data(), processing_class=tokenizer)
        t.train()
        runs.append(t)
    assert same_weights(runs[0].model, runs[1].model)
    assert [e["loss"] for e in losses(runs[0])] == [e["loss"] for e in losses(runs[1])]


def grpo(trainer, config, tmp_path, tokenizer, model=None, **kwargs):
    options = dict(
        max_steps=1, num_generations=2, max_completion_length=6, learning_rate=1e-2, optim="sgd", max_grad_norm=0.0
    )
    args = config(**common(tmp_path / trainer.__name__, **{**options, **kwargs}))
    return trainer(
        model=model or tiny_lm(),
        reward_funcs=three_words,
        args=args,
        train_dataset=prompt_data(),
        processing_class=tokenizer,
    )


def test_grpo_with_every_weight_zero_is_grpo(tmp_path, tokenizer):
    runs = []
    for trainer, config in ((GRPOTrainer, GRPOConfig), (SpecGenGRPOTrainer, SpecGenGRPOConfig)):
        runs.append(
            grpo(trainer, config, tmp_path, tokenizer, max_steps=2)
        )  # built, then trained: the same seeded sampling
        runs[-1].train()
    assert same_weights(runs[0].model, runs[1].model)
    assert [e["loss"] for e in losses(runs[0])] == [e["loss"] for e in losses(runs[1])]


# ---- SFT ----------------------------------------------------------------------------------------------


def test_sft_weight_terms_equal_spec_gen_trainers(tmp_path, tokenizer):
    """L2, EWC and MAS on the same tokenized data: the same importances, and one SGD step from a perturbed
    start moves the weights by the same penalty gradient as under SpecGenTrainer (the task losses of TRL's
    fused head and the Trainer's differ by float rounding, so each is compared with its own plain run)."""
    options = dict(max_steps=1, learning_rate=1e-2, optim="sgd", max_grad_norm=0.0, lr_scheduler_type="constant")
    shifts, importances, logs = [], [], []
    for name, build in (
        ("trainer", lambda args, model: SpecGenTrainer(model=model, args=args, train_dataset=trainer_data())),
        (
            "sft",
            lambda args, model: SpecGenSFTTrainer(
                model=model, args=args, train_dataset=sft_data(), processing_class=tokenizer
            ),
        ),
    ):
        config = (
            (lambda **kw: SpecGenTrainingArguments(**kw))
            if name == "trainer"
            else (lambda **kw: SpecGenSFTConfig(**kw, completion_only_loss=True))
        )
        moved = []
        for terms in (WEIGHT_TERMS, {}):
            model = tiny_lm()
            trainer = build(config(**common(tmp_path / f"{name}{bool(terms)}", **options, **terms)), model)
            perturb_(model, scale=0.01)  # away from the anchor taken when the trainer was built
            start = snapshot(model)
            trainer.train()
            moved.append({n: p.detach() - start[n] for n, p in model.named_parameters()})
            if terms:
                importances.append({r.name: r.importance for r in trainer.regularizers if r.needs_importance})
                logs.append(losses(trainer)[0])
        shifts.append({n: moved[0][n] - moved[1][n] for n in moved[0]})
    for term in ("ewc", "mas"):
        for key, value in importances[0][term].items():
            torch.testing.assert_close(importances[1][term][key], value, rtol=1e-5, atol=1e-12)
    for key in ("loss_l2", "loss_ewc", "loss_mas"):
        assert logs[1][key] == pytest.approx(logs[0][key], rel=1e-5) and logs[0][key] > 0
    for key, shift in shifts[0].items():
        assert shift.abs().max() > 0
        torch.testing.assert_close(shifts[1][key], shift, rtol=1e-4, atol=1e-7)


def kd_rows(model, teacher, input_ids, positions, **forward):
    """By hand: the full logits of both models, at the positions predicting a supervised next token."""
    with torch.no_grad():
        s = model(input_ids=input_ids, **forward).logits[:, :-1][positions]
        t = teacher(input_ids=input_ids, **forward).logits[:, :-1][positions]
    return kl_rows(s, t).float()  # float32, as the trainer's term


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding_free"])
def test_sft_kd_on_the_supervised_completion_tokens(tmp_path, tokenizer, padding_free):
    """Completion-only labels, padded and padding-free (one row, `position_ids`, labels -100 at each
    sequence start): KD is the KL at the positions SFT's loss supervises, over its token count."""
    lam = 0.8
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(5, 1000, (n,), generator=g).tolist() for n in (7, 9, 6, 8)]
    data = datasets.Dataset.from_dict(
        {"input_ids": rows, "completion_mask": [[0] * 3 + [1] * (len(r) - 3) for r in rows]}
    )
    model = tiny_lm()
    teacher = copy.deepcopy(model).eval()
    extra = dict(padding_free=True, max_length=None) if padding_free else {}
    args = SpecGenSFTConfig(**common(tmp_path, kd_lambda=lam, completion_only_loss=True, **extra))
    trainer = SpecGenSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    perturb_(model)
    batch = next(iter(trainer.get_train_dataloader()))
    assert ("position_ids" in batch) == padding_free and batch["input_ids"].shape[0] == (1 if padding_free else 4)
    positions = batch["labels"][:, 1:] != -100
    n_tokens = int(positions.sum())
    assert n_tokens == sum(len(r) - 3 for r in rows)
    model.train()
    trainer.specgen.log_sums = {}
    trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(n_tokens))
    forward = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    expected = lam * kd_rows(model, teacher, batch["input_ids"], positions, **forward).sum() / n_tokens
    assert expected > 1e-4
    torch.testing.assert_close(trainer.specgen.log_sums["loss_kd"], expected, rtol=1e-4, atol=1e-9)


def test_sft_trains_with_every_regularizer(tmp_path, tokenizer):
    terms = dict(l1_lambda=1e-3, kd_lambda=1.0, feature_lambda=0.1, **WEIGHT_TERMS)
    args = SpecGenSFTConfig(**common(tmp_path, max_steps=2, learning_rate=1e-2, completion_only_loss=True, **terms))
    trainer = SpecGenSFTTrainer(model=tiny_lm(), args=args, train_dataset=sft_data(), processing_class=tokenizer)
    trainer.train()
    first, last = losses(trainer)
    names = ["loss_l1", "loss_l2", "loss_ewc", "loss_mas", "loss_kd", "loss_feature"]
    assert all(first[n] == 0 for n in names) and all(last[n] > 0 for n in names)
    assert last["loss"] == pytest.approx(last["loss_task"] + sum(last[n] for n in names), rel=1e-5)


# ---- DPO ----------------------------------------------------------------------------------------------


def test_dpo_reference_is_the_anchor_and_the_teacher(tmp_path, tokenizer):
    """No second copy: the weights are compared with DPO's reference's own tensors."""
    args = SpecGenDPOConfig(**common(tmp_path, per_device_train_batch_size=2, l2_lambda=1.0, kd_lambda=1.0))
    trainer = SpecGenDPOTrainer(
        model=tiny_lm(), args=args, train_dataset=preference_data(), processing_class=tokenizer
    )
    assert trainer.teacher.module is trainer.ref_model
    assert trainer.anchor_memory() == {"weights": 0, "teacher": 0, "fisher": 0}
    storage = {p.data_ptr() for p in trainer.ref_model.parameters()}
    assert trainer.deltas and all(
        isinstance(d, DenseDelta) and d.reference.data_ptr() in storage for d in trainer.deltas
    )


def dpo_kd_by_hand(tmp_path, tokenizer, **extra):
    lam = 0.6
    args = SpecGenDPOConfig(**common(tmp_path, per_device_train_batch_size=2, kd_lambda=lam))
    trainer = SpecGenDPOTrainer(
        model=tiny_lm(), args=args, train_dataset=preference_data(), processing_class=tokenizer, **extra
    )
    model = trainer.model
    perturb_(model)
    batch = next(iter(trainer.get_train_dataloader()))
    positions = batch["completion_mask"][:, 1:].bool()
    assert 0 < positions.sum() < batch["attention_mask"][:, 1:].sum()  # prompts are not distilled
    model.train()
    trainer.specgen.log_sums = {}
    trainer.compute_loss(model, dict(batch))
    return trainer, batch, positions, lam


def test_dpo_kd_on_chosen_and_rejected_completion_tokens(tmp_path, tokenizer):
    trainer, batch, positions, lam = dpo_kd_by_hand(tmp_path, tokenizer)
    reference = trainer.ref_model
    expected = (
        lam
        * kd_rows(
            trainer.model, reference, batch["input_ids"], positions, attention_mask=batch["attention_mask"]
        ).mean()
    )
    assert expected > 1e-4
    torch.testing.assert_close(trainer.specgen.log_sums["loss_kd"], expected, rtol=1e-4, atol=1e-9)


def test_dpo_with_peft_uses_the_model_with_adapters_disabled(tmp_path, tokenizer):
    pretrained = tiny_lm().eval()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer, batch, positions, lam = dpo_kd_by_hand(tmp_path, tokenizer, peft_config=config)
    assert trainer.ref_model is None and trainer.teacher.adapters_disabled
    assert trainer.anchor_memory() == {"weights": 0, "teacher": 0, "fisher": 0}
    expected = (
        lam
        * kd_rows(
            trainer.model, pretrained, batch["input_ids"], positions, attention_mask=batch["attention_mask"]
        ).mean()
    )
    assert expected > 1e-4
    torch.testing.assert_close(trainer.specgen.log_sums["loss_kd"], expected, rtol=1e-4, atol=1e-9)
    args = SpecGenDPOConfig(
        **common(tmp_path / "l2", per_device_train_batch_size=2, l2_lambda=1.0, ewc_lambda=1.0, ewc_num_samples=2)
    )
    lora = SpecGenDPOTrainer(
        model=tiny_lm(), args=args, train_dataset=preference_data(), processing_class=tokenizer, peft_config=config
    )
    assert lora.deltas and all(isinstance(d, LoraDelta) for d in lora.deltas)
    lora.train()
    assert losses(lora)[-1]["loss_ewc"] >= 0 and losses(lora)[-1]["loss_l2"] > 0


def test_dpo_importance_at_the_reference_on_the_chosen_completions(tmp_path, tokenizer):
    """EWC's empirical Fisher from DPO's pairs: the chosen answer's tokens are the labels, at DPO's reference."""
    args = SpecGenDPOConfig(
        **common(tmp_path, per_device_train_batch_size=2, ewc_lambda=1.0, ewc_fisher="empirical", ewc_num_samples=4)
    )
    data = preference_data(4)
    trainer = SpecGenDPOTrainer(model=tiny_lm(), args=args, train_dataset=data, processing_class=tokenizer)
    perturb_(trainer.model)  # the Fisher is the reference's, whatever the policy
    trainer.specgen.begin_training(None)
    fisher = trainer.regularizers[0].importance
    reference = trainer.ref_model
    params = dict(reference.named_parameters())
    by_hand = {k: torch.zeros_like(p) for k, p in params.items()}
    for row in data:
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        chosen = tokenizer(row["chosen"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + chosen])
        logits = reference(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        score = F.log_softmax(logits.float(), -1).gather(-1, ids[0, len(prompt) :, None]).sum()
        for k, grad in zip(params, torch.autograd.grad(score, list(params.values()))):
            by_hand[k] += grad.pow(2) / len(chosen) / len(data)
    assert sum(f.sum() for f in fisher.values()) > 0
    for k in by_hand:
        torch.testing.assert_close(fisher[k], by_hand[k], rtol=1e-4, atol=1e-10)


# ---- GRPO ---------------------------------------------------------------------------------------------


def test_grpo_l2_adds_its_gradient_to_the_policy_gradient_step(tmp_path, tokenizer):
    """One SGD step from a perturbed start, the same sampled completions (seeded): the L2 run ends
    `lr * 2 * lambda * (theta - theta_pre)` from the plain run, and logs `lambda * ||theta - theta_pre||^2`."""
    lam, lr = 0.7, 1e-2
    runs = []
    for trainer, config, terms in (
        (GRPOTrainer, GRPOConfig, {}),
        (SpecGenGRPOTrainer, SpecGenGRPOConfig, {"l2_lambda": lam}),
    ):
        model = tiny_lm()
        pre = snapshot(model)
        t = grpo(
            trainer, config, tmp_path, tokenizer, model=model, learning_rate=lr, lr_scheduler_type="constant", **terms
        )
        perturb_(model, scale=0.01)
        start = snapshot(model)
        t.train()
        runs.append((t, pre, start))
    (plain, _, _), (l2, pre, start) = runs
    distance = sum((start[n] - pre[n]).pow(2).sum() for n in pre)
    assert losses(l2)[0]["loss_l2"] == pytest.approx(lam * distance.item(), rel=1e-5)
    for (name, p), q in zip(l2.model.named_parameters(), plain.model.parameters()):
        torch.testing.assert_close(
            p - q, -lr * 2 * lam * (start[name] - pre[name]), rtol=1e-3, atol=5e-7, msg=name
        )  # float32 rounding of weights ~1


def test_grpo_importances_from_completions_sampled_from_the_pretrained_policy(tmp_path, tokenizer):
    """No labels exist: EWC and MAS are estimated on prompts with completions the pre-trained policy samples;
    reproducible from the seed, and the same whatever the policy has become."""
    terms = dict(ewc_lambda=1.0, ewc_num_samples=2, mas_lambda=1.0, mas_num_samples=2, kd_lambda=0.5)
    trainers = [grpo(SpecGenGRPOTrainer, SpecGenGRPOConfig, tmp_path / str(i), tokenizer, **terms) for i in range(2)]
    assert trainers[0].specgen.teacher.owned  # beta = 0: GRPO keeps no reference, the engine made its copy
    estimates = []
    for t in trainers:
        t.specgen.begin_training(None)
        estimates.append({r.name: r.importance for r in t.regularizers if r.needs_importance})
    for name in ("ewc", "mas"):
        assert sum(v.sum() for v in estimates[0][name].values()) > 0
        assert all(torch.equal(estimates[0][name][k], v) for k, v in estimates[1][name].items())
    trainers[0].train()
    log = losses(trainers[0])[-1]
    assert {"loss_ewc", "loss_mas", "loss_kd"} <= set(log) and log[
        "loss_kd"
    ] == 0  # step 1: at the pre-trained weights
    with pytest.raises(ValueError, match="feature_lambda is not supported by SpecGenGRPOTrainer"):
        grpo(SpecGenGRPOTrainer, SpecGenGRPOConfig, tmp_path / "f", tokenizer, feature_lambda=1.0)
