"""Logit distillation and feature protection on a causal LM, against direct computations."""

import copy

import pytest
import torch
from conftest import kd_by_hand, lm_batch, perturb_, tiny_opt
from transformers import OPTForCausalLM

from hf_specgen import SpecGenTrainer


def term_and_grads(trainer, batch, **kwargs):
    """The regularizers' share of `compute_loss` and of the gradient (task loss and gradient subtracted)."""
    model = trainer.model.train()
    model.zero_grad()
    trainer.specgen.log_sums = {}
    loss = trainer.compute_loss(model, dict(batch), **kwargs)
    assert torch.allclose(loss, sum(trainer.specgen.log_sums.values()), rtol=1e-6)  # the logged terms add up
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    task = model(**batch).loss
    task.backward()
    diff = {n: grads[n] - p.grad for n, p in model.named_parameters()}
    model.zero_grad()
    assert torch.allclose(task, trainer.specgen.log_sums.pop("loss_task"))
    return sum(trainer.specgen.log_sums.values()), diff


def manual_kd(model, teacher, batch, temperature, denominator=None):
    """`kd_by_hand` of the model and the teacher on a causal LM batch (the logits before each supervised
    token), differentiable in the model's weights, in float32 as the trainer's term."""
    s = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return kd_by_hand(s, t, batch["labels"][:, 1:] != -100, temperature, denominator).float()


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kd_matches_kl_to_the_frozen_pretrained_model(args_factory, temperature):
    lam = 0.8
    model = tiny_opt()
    teacher = copy.deepcopy(model).eval()
    trainer = SpecGenTrainer(model=model, args=args_factory(kd_lambda=lam, kd_temperature=temperature))
    assert trainer.teacher.module is not model and not trainer.teacher.module.training  # no dropout
    assert not any(p.requires_grad for p in trainer.teacher.module.parameters())
    batch = lm_batch()
    zero, zero_grads = term_and_grads(trainer, batch)
    assert abs(zero) < 1e-6 and all(g.abs().max() < 1e-6 for g in zero_grads.values())

    perturb_(model)
    term, grads = term_and_grads(trainer, batch)
    model.zero_grad()
    expected = lam * manual_kd(model, teacher, batch, temperature)
    expected.backward()
    assert torch.allclose(term, expected.detach(), rtol=1e-5)
    for name, p in model.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-6), name
    assert trainer.anchor_memory()["teacher"] == sum(p.numel() * 4 for p in model.parameters())


def test_kd_is_normalized_like_the_task_loss(args_factory):
    """With `num_items_in_batch` (the whole accumulated batch's token count) both are sums over it."""
    model = tiny_opt()
    teacher = copy.deepcopy(model)
    trainer = SpecGenTrainer(model=model, args=args_factory(kd_lambda=1.0))
    perturb_(model)
    batch = lm_batch()
    n_items = torch.tensor(100)
    model.train()
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=n_items)
    task = model(**batch, num_items_in_batch=n_items).loss
    assert torch.allclose(loss - task, manual_kd(model, teacher, batch, 1.0, n_items), rtol=1e-5)


def test_feature_protection_matches_hidden_state_distance(args_factory):
    lam, layers = 0.5, [1, -1]
    model = tiny_opt()
    teacher = copy.deepcopy(model).eval()
    trainer = SpecGenTrainer(model=model, args=args_factory(feature_lambda=lam, feature_layers=layers))
    perturb_(model)
    batch = lm_batch()
    batch["attention_mask"][0, -4:] = 0  # padded positions are not protected
    term, grads = term_and_grads(trainer, batch)
    model.zero_grad()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "output_hidden_states": True}
    hs = model(**inputs).hidden_states
    with torch.no_grad():
        ht = teacher(**inputs).hidden_states
    mask = batch["attention_mask"].bool()
    expected = lam * torch.stack([(hs[i] - ht[i]).pow(2).sum(-1)[mask].mean() for i in layers]).mean()
    expected.backward()
    assert torch.allclose(term, expected.detach(), rtol=1e-5)
    for name, p in model.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-6), name


def test_feature_layer_out_of_range_is_refused(args_factory):
    with pytest.raises(ValueError, match="feature_layers entry 3 is out of range"):
        SpecGenTrainer(model=tiny_opt(), args=args_factory(feature_lambda=1.0, feature_layers=[0, 3]))
    with pytest.raises(ValueError, match="feature_layers entry -4"):
        SpecGenTrainer(model=tiny_opt(), args=args_factory(feature_lambda=1.0, feature_layers=[-4]))
    SpecGenTrainer(model=tiny_opt(), args=args_factory(feature_lambda=1.0, feature_layers=[-3, 2]))


def test_kd_between_different_vocabularies_is_refused(args_factory):
    with pytest.raises(ValueError, match="same vocabulary.*64 != 80"):
        SpecGenTrainer(model=tiny_opt(), args=args_factory(kd_lambda=1.0), ref_model=tiny_opt(vocab_size=80))


def test_ref_model_is_the_reference_for_weights_and_logits(args_factory):
    """A user-given pre-trained model: the anchor reads its weights, KD its logits; nothing is copied."""
    reference = tiny_opt(seed=0)
    model = tiny_opt(seed=0)
    perturb_(model)
    trainer = SpecGenTrainer(model=model, args=args_factory(l2_lambda=1.0, kd_lambda=1.0), ref_model=reference)
    assert trainer.anchor_memory()["weights"] == 0 and trainer.teacher.module is reference
    expected = sum((p.detach() - q).pow(2).sum() for p, q in zip(model.parameters(), reference.parameters()))
    assert torch.allclose(trainer.specgen.weight_terms[0].apply_(trainer.deltas, grad_scale=1.0), expected, rtol=1e-6)
    term, _ = term_and_grads(trainer, lm_batch())
    assert torch.allclose(term, manual_kd(model, reference, lm_batch(), 1.0), rtol=1e-5)


def test_ref_model_of_another_architecture_is_refused_saying_what_differs(args_factory):
    """It used to fail inside the model's forward with a raw AttributeError."""
    from conftest import tiny_clip

    with pytest.raises(ValueError, match="ref_model is CLIPModel, the model OPTForCausalLM"):
        SpecGenTrainer(model=tiny_opt(), args=args_factory(kd_lambda=1.0), ref_model=tiny_clip())
    config = tiny_opt().config
    config.hidden_size = config.word_embed_proj_dim = 32
    with pytest.raises(ValueError, match="ref_model's hidden_size is 32 and the model's 16"):
        SpecGenTrainer(model=tiny_opt(), args=args_factory(feature_lambda=1.0), ref_model=OPTForCausalLM(config))


def test_anchor_device_is_checked_before_anything_is_copied(args_factory):
    with pytest.raises(ValueError, match="anchor_device must be 'auto' or a torch device"):
        args_factory(kd_lambda=1.0, anchor_device="bogus")


def test_ref_model_must_be_a_model_and_is_said_unused_without_a_regularizer(args_factory):
    with pytest.raises(ValueError, match="ref_model must be a model .* got str 'facebook/opt-125m': load it first"):
        SpecGenTrainer(model=tiny_opt(), args=args_factory(kd_lambda=1.0), ref_model="facebook/opt-125m")
    with pytest.warns(UserWarning, match="ref_model is given but no regularizer is on"):
        SpecGenTrainer(model=tiny_opt(), args=args_factory(), ref_model=tiny_opt())
