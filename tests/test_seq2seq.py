"""Encoder-decoder models (T5 built from a config) and labels under other names: every regularizer
gets the decoder inputs the model makes from its labels, and KD the positions the task loss uses."""

import copy

import datasets
import pytest
import torch
import torch.nn.functional as F
from conftest import kd_by_hand, lm_batch, perturb_, seq2seq_batch, tiny_opt, tiny_t5
from torch import nn

from hf_specgen import SpecGenTrainer
from hf_specgen.regularizers import EWC


def test_kd_on_an_encoder_decoder_uses_the_decoder_supervised_positions(args_factory):
    """T5 builds its decoder inputs from the labels; the teacher gets the same ones (it used to fail:
    'You must specify exactly one of input_ids or inputs_embeds'), and KD counts the labels that are not
    -100, unshifted (the seq2seq loss is not shifted)."""
    lam = 0.6
    model = tiny_t5()
    teacher = copy.deepcopy(model).eval()
    trainer = SpecGenTrainer(model=model, args=args_factory(kd_lambda=lam))
    perturb_(model)
    model.train()
    batch = seq2seq_batch()
    task = model(**batch).loss
    loss = trainer.compute_loss(model, dict(batch))
    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "decoder_input_ids": decoder_input_ids,
    }
    with torch.no_grad():
        student, reference = model(**inputs).logits, teacher(**inputs).logits
    expected = lam * kd_by_hand(student, reference, batch["labels"] != -100)
    assert expected > 1e-4
    torch.testing.assert_close((loss - task).detach().double(), expected, rtol=1e-5, atol=1e-9)


def test_feature_protection_on_an_encoder_decoder_protects_both_stacks(args_factory):
    """Encoder hidden states over real source tokens, decoder hidden states over supervised target positions."""
    lam, layers = 0.5, [1, -1]
    model = tiny_t5()
    teacher = copy.deepcopy(model).eval()
    trainer = SpecGenTrainer(model=model, args=args_factory(feature_lambda=lam, feature_layers=layers))
    perturb_(model)
    model.train()
    batch = seq2seq_batch()
    task = model(**batch).loss
    loss = trainer.compute_loss(model, dict(batch))
    with torch.no_grad():
        s, t = (m(**batch, output_hidden_states=True) for m in (model, teacher))
    source, target = batch["attention_mask"].bool(), batch["labels"] != -100
    per_feature = [
        (s.encoder_hidden_states[i] - t.encoder_hidden_states[i]).pow(2).sum(-1)[source].mean() for i in layers
    ]
    per_feature += [
        (s.decoder_hidden_states[i] - t.decoder_hidden_states[i]).pow(2).sum(-1)[target].mean() for i in layers
    ]
    expected = lam * torch.stack(per_feature).mean()
    assert expected > 1e-4
    torch.testing.assert_close((loss - task).detach(), expected, rtol=1e-5, atol=1e-9)


def test_ewc_fisher_of_an_encoder_decoder(args_factory):
    """The empirical Fisher by hand: per example, the decoder's log-likelihood of its labels."""
    n = 4
    batch = seq2seq_batch(n)
    data = datasets.Dataset.from_dict({k: v.tolist() for k, v in batch.items()})
    model = tiny_t5()
    trainer = SpecGenTrainer(
        model=model, args=args_factory(ewc_lambda=1.0, ewc_fisher="empirical", ewc_num_samples=n), train_dataset=data
    )
    trainer.specgen.begin_training(None)
    fisher = next(r for r in trainer.regularizers if isinstance(r, EWC)).fisher
    params = dict(model.named_parameters())
    by_hand = {k: torch.zeros_like(p) for k, p in params.items()}
    model.eval()
    for i in range(n):
        row = {k: v[i : i + 1] for k, v in batch.items()}
        mask = row["labels"] != -100
        logits = model(**row).logits
        score = F.log_softmax(logits[mask], -1).gather(-1, row["labels"][mask].unsqueeze(-1)).sum()
        for k, g in zip(params, torch.autograd.grad(score, list(params.values()))):
            by_hand[k] += g.pow(2) / mask.sum() / n
    assert sum(f.sum() for f in fisher.values()) > 0
    for k in fisher:
        torch.testing.assert_close(fisher[k], by_hand[k], rtol=1e-4, atol=1e-10)


def test_every_regularizer_trains_an_encoder_decoder(args_factory):
    batch = seq2seq_batch(8)
    data = datasets.Dataset.from_dict({k: v.tolist() for k, v in batch.items()})
    terms = dict(l1_lambda=0.01, l2_lambda=0.5, ewc_lambda=1.0, ewc_num_samples=4, kd_lambda=0.5, feature_lambda=0.3)
    model = tiny_t5()
    trainer = SpecGenTrainer(
        model=model, args=args_factory(max_steps=3, learning_rate=0.05, **terms), train_dataset=data
    )
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    names = ["loss_l1", "loss_l2", "loss_ewc", "loss_kd", "loss_feature"]
    assert len(logs) == 3 and all(logs[-1][name] > 0 for name in names)
    assert logs[-1]["loss"] == pytest.approx(logs[-1]["loss_task"] + sum(logs[-1][n] for n in names), rel=1e-5)


class TargetLM(nn.Module):
    """A causal LM whose labels are called `target` (`label_names=["target"]`)."""

    loss_type = "ForCausalLM"

    def __init__(self) -> None:
        super().__init__()
        self.lm = tiny_opt()
        self.config = self.lm.config

    def forward(self, input_ids, attention_mask=None, target=None, **kwargs):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, labels=target, **kwargs)


def test_kd_and_ewc_read_the_labels_under_the_trainers_label_names(args_factory):
    """KD used to fall back to every position, padding included, when the labels were not called `labels`."""
    lam = 0.9
    model = TargetLM()
    teacher = copy.deepcopy(model).eval()
    rows = lm_batch()
    batch = {"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"], "target": rows["labels"]}
    data = datasets.Dataset.from_dict({k: v.tolist() for k, v in batch.items()})
    args = args_factory(
        kd_lambda=lam, ewc_lambda=1.0, ewc_fisher="empirical", ewc_num_samples=2, label_names=["target"]
    )
    trainer = SpecGenTrainer(model=model, args=args, train_dataset=data)
    assert trainer.label_names == ["target"]
    perturb_(model)
    model.train()
    task = model(**batch).loss
    loss = trainer.compute_loss(model, dict(batch))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        s, t = model(**inputs).logits[:, :-1], teacher(**inputs).logits[:, :-1]
    expected = lam * kd_by_hand(s, t, batch["target"][:, 1:] != -100)
    torch.testing.assert_close((loss - task).detach().double(), expected, rtol=1e-5, atol=1e-9)
    trainer.specgen.begin_training(None)  # the empirical Fisher needs the labels: found under `target`
    fisher = next(r for r in trainer.regularizers if isinstance(r, EWC)).fisher
    assert sum(f.sum() for f in fisher.values()) > 0
