"""MAS (Memory Aware Synapses): the importance of each weight from the sensitivity of the output's
squared norm at the pre-trained weights, against hand computations; the penalty; LoRA; no labels."""

import copy

import datasets
import torch
from conftest import lm_batch, lm_dataset, perturb_, snapshot, step_and_grads, tiny_opt
from peft import LoraConfig, get_peft_model
from transformers import OPTForSequenceClassification

from hf_specgen import SpecGenTrainer
from hf_specgen.regularizers import MAS


def importance_of(trainer):
    trainer.specgen.begin_training(None)
    return next(r for r in trainer.regularizers if isinstance(r, MAS)).importance


def test_importance_is_the_mean_absolute_gradient_of_the_output_norm(args_factory):
    """Omega = mean_x (1/n_x) |d/dtheta sum_t ||logits_t(x)||^2| over the supervised positions."""
    n = 5
    data = lm_dataset(n)
    model = tiny_opt()
    trainer = SpecGenTrainer(model=model, args=args_factory(mas_lambda=1.0, mas_num_samples=n), train_dataset=data)
    omega = importance_of(trainer)
    params = dict(model.named_parameters())
    by_hand = {k: torch.zeros_like(p) for k, p in params.items()}
    model.eval()
    for i in range(n):
        row = {k: torch.tensor([data[i][k]]) for k in data.column_names}
        logits = model(input_ids=row["input_ids"], attention_mask=row["attention_mask"]).logits[:, :-1]
        mask = row["labels"][:, 1:] != -100
        norm = logits[mask].pow(2).sum()
        for k, g in zip(params, torch.autograd.grad(norm, list(params.values()))):
            by_hand[k] += g.abs() / mask.sum() / n
    assert set(omega) == set(by_hand)
    assert sum(o.sum() for o in omega.values()) > 0
    for k in by_hand:
        torch.testing.assert_close(omega[k], by_hand[k], rtol=1e-4, atol=1e-9)
    # it needs no labels' values: the same importance with every label replaced (positions kept)
    relabelled = data.map(lambda row: {"labels": [3 if t != -100 else -100 for t in row["labels"]]})
    other = importance_of(
        SpecGenTrainer(
            model=tiny_opt(), args=args_factory(mas_lambda=1.0, mas_num_samples=n), train_dataset=relabelled
        )
    )
    assert all(torch.equal(other[k], omega[k]) for k in omega)


def test_penalty_is_zero_at_the_pretrained_weights_then_omega_weighted(args_factory):
    lam = 4.0
    model = tiny_opt()
    pre = snapshot(model)
    trainer = SpecGenTrainer(
        model=model, args=args_factory(mas_lambda=lam, mas_num_samples=4), train_dataset=lm_dataset(4)
    )
    omega = importance_of(trainer)
    batch = lm_batch()
    loss, grads = step_and_grads(trainer, batch)
    model.zero_grad()
    task = model(**batch).loss
    task.backward()
    assert loss == task.detach() and all(torch.equal(grads[n], p.grad) for n, p in model.named_parameters())
    perturb_(model)
    model.zero_grad()
    (mas,) = trainer.specgen.weight_terms
    value = mas.apply_(trainer.deltas, grad_scale=1.0)
    expected = lam * sum((omega[n] * (p.detach() - pre[n]).pow(2)).sum() for n, p in model.named_parameters())
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * lam * omega[name] * (p.detach() - pre[name]), rtol=1e-5, atol=1e-8)


def test_lora_importance_of_the_base_weights_on_the_effective_delta(args_factory):
    lam, n = 2.0, 4
    base = tiny_opt()
    pretrained = copy.deepcopy(base).eval()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    perturb_(model, scale=0.3)
    data = lm_dataset(n)
    trainer = SpecGenTrainer(model=model, args=args_factory(mas_lambda=lam, mas_num_samples=n), train_dataset=data)
    omega = importance_of(trainer)
    assert len(omega) == 4 and all(k.endswith(".base_layer.weight") for k in omega)
    assert trainer.anchor_memory() == {
        "weights": 0,
        "teacher": 0,
        "fisher": sum(o.numel() * 4 for o in omega.values()),
    }
    plain = importance_of(
        SpecGenTrainer(model=pretrained, args=args_factory(mas_lambda=lam, mas_num_samples=n), train_dataset=data)
    )
    for k, o in omega.items():  # the pre-trained model's importance (adapters disabled)
        name = k.removeprefix("base_model.model.").replace(".base_layer.", ".")
        torch.testing.assert_close(o, plain[name], rtol=1e-5, atol=1e-10)
    (mas,) = trainer.specgen.weight_terms
    value = mas.apply_(trainer.deltas, grad_scale=1.0)
    layers = {d.name: d.layer.get_delta_weight("default").float() for d in trainer.deltas}
    expected = lam * sum((omega[k] * layers[k].pow(2)).sum() for k in omega)
    assert expected > 0
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=0)


def test_mas_works_for_a_one_output_head(args_factory):
    """Unlike EWC and KD (refused there), MAS differentiates the output itself: a regression head has one."""
    config = tiny_opt().config
    config.num_labels, config.pad_token_id = 1, 1
    torch.manual_seed(0)
    model = OPTForSequenceClassification(config)
    rows = lm_dataset(4)
    data = datasets.Dataset.from_dict(
        {"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"], "labels": [0.5, -1.0, 2.0, 0.0]}
    )
    trainer = SpecGenTrainer(model=model, args=args_factory(mas_lambda=1.0, mas_num_samples=4), train_dataset=data)
    omega = importance_of(trainer)
    assert omega["score.weight"].sum() > 0
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs[-1]["loss_mas"] > 0
