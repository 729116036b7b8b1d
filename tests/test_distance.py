"""L1 and L2-SP: values and gradients against the closed forms, decoupled decay, clipping, dtypes."""

import pytest
import torch
from conftest import lm_batch, lm_dataset, perturb_, snapshot, step_and_grads, tiny_opt

from hf_specgen import SpecGenTrainer


def task_loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.detach(), grads


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_value_and_gradient_match_closed_form(args_factory, kind):
    lam = 0.7
    model = tiny_opt()
    model.model.decoder.layers[0].fc1.weight.requires_grad_(False)  # frozen weights are not penalized
    pre = snapshot(model)
    trainer = SpecGenTrainer(model=model, args=args_factory(**{f"{kind}_lambda": lam}))
    perturb_(model)
    batch = lm_batch()
    loss, grads = step_and_grads(trainer, batch)
    task, task_grads = task_loss_and_grads(model, batch)

    # named_parameters() yields the tied lm_head / embed_tokens weight once
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert "lm_head.weight" not in trainable and "model.decoder.embed_tokens.weight" in trainable
    deltas = {n: p.detach().double() - pre[n].double() for n, p in trainable.items()}
    expected = lam * sum((d.abs() if kind == "l1" else d.pow(2)).sum() for d in deltas.values())
    assert torch.allclose((loss - task).double(), expected, rtol=1e-5)
    for name, delta in deltas.items():
        penalty_grad = lam * (delta.sign() if kind == "l1" else 2 * delta)
        assert torch.allclose(grads[name].double() - task_grads[name].double(), penalty_grad, atol=1e-6), name
    assert "model.decoder.layers.0.fc1.weight" not in grads
    assert trainer.anchor_memory()["weights"] == sum(p.numel() * 4 for p in trainable.values())


def test_penalty_is_zero_at_the_pretrained_weights(args_factory):
    model = tiny_opt()
    trainer = SpecGenTrainer(model=model, args=args_factory(l1_lambda=1.0, l2_lambda=1.0))
    batch = lm_batch()
    loss, grads = step_and_grads(trainer, batch)
    task, task_grads = task_loss_and_grads(model, batch)
    assert loss == task
    assert all(torch.equal(grads[n], task_grads[n]) for n in grads)


def test_low_precision_anchor_and_weights_take_the_difference_in_float32(args_factory):
    model = tiny_opt().to(torch.bfloat16)
    pre = snapshot(model)
    trainer = SpecGenTrainer(model=model, args=args_factory(l2_lambda=1.0))  # 'auto': a lossless bf16 snapshot
    perturb_(model, scale=1e-2)
    expected = sum((p.detach().float() - pre[n].float()).pow(2).sum() for n, p in model.named_parameters())
    term = trainer.specgen.weight_terms[0].apply_(trainer.deltas, grad_scale=1.0)
    assert term.dtype == torch.float32
    assert torch.allclose(term, expected, rtol=1e-6)
    n_params = sum(p.numel() for p in model.parameters())
    assert trainer.anchor_memory()["weights"] == 2 * n_params

    half = SpecGenTrainer(model=tiny_opt(), args=args_factory(l2_lambda=1.0, anchor_dtype="bfloat16"))
    assert half.anchor_memory()["weights"] == 2 * n_params
    assert all(d.reference.dtype == torch.bfloat16 for d in half.deltas)


def test_decoupled_mode_decays_toward_pretrained_in_the_optimizer_step(args_factory):
    lam, lr = 0.5, 0.1
    model = tiny_opt()
    pre = snapshot(model)
    trainer = SpecGenTrainer(model=model, args=args_factory(l2_lambda=lam, l2_mode="decoupled", learning_rate=lr))
    assert trainer.specgen.weight_terms == []  # not a loss term
    perturb_(model)
    before = snapshot(model)
    optimizer = trainer.create_optimizer()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # Adam's own update is then exactly zero
    optimizer.step()
    for name, p in model.named_parameters():
        expected = before[name] - lr * lam * (before[name] - pre[name])
        assert torch.allclose(p.detach(), expected, atol=1e-7), name
    logged = trainer.specgen.log_sums["l2_distance"]
    assert torch.allclose(logged, sum((before[n] - pre[n]).pow(2).sum() for n in pre), rtol=1e-5)


def test_penalty_gradient_is_clipped_with_the_task_gradient(args_factory):
    lam, lr, clip = 2.0, 0.1, 1e-3
    model = tiny_opt()
    pre = snapshot(model)
    data = lm_dataset(4)
    trainer = SpecGenTrainer(
        model=model,
        args=args_factory(
            l2_lambda=lam, optim="sgd", learning_rate=lr, max_grad_norm=clip, max_steps=1, lr_scheduler_type="constant"
        ),
        train_dataset=data,
    )
    perturb_(model)
    start = snapshot(model)
    batch = {k: torch.tensor(data[k]) for k in data.column_names}
    _, task_grads = task_loss_and_grads(model, batch)
    full = {n: task_grads[n] + 2 * lam * (start[n] - pre[n]) for n in task_grads}
    norm = torch.sqrt(sum(g.pow(2).sum() for g in full.values()))
    assert norm > 100 * clip
    trainer.train()
    for name, p in model.named_parameters():
        expected = start[name] - lr * clip * full[name] / norm
        assert torch.allclose(p.detach(), expected, atol=1e-7), name
    log = trainer.state.log_history[0]
    assert log["loss_l2"] == pytest.approx(lam * sum((start[n] - pre[n]).pow(2).sum().item() for n in pre), rel=1e-5)


def test_closed_form_gradients_follow_the_fp16_loss_scale(args_factory):
    """Under fp16 the task gradients are multiplied by the GradScaler's scale; the penalty's must be too."""
    model = tiny_opt()
    trainer = SpecGenTrainer(
        model=model,
        args=args_factory(l1_lambda=0.3, l2_lambda=0.7, ewc_lambda=2.0, ewc_num_samples=4),
        train_dataset=lm_dataset(4),
    )
    trainer.specgen.begin_training(None)
    perturb_(model)
    batch = lm_batch()
    loss, grads = step_and_grads(trainer, batch)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaled_loss, scaled_grads = step_and_grads(trainer, batch)
    assert torch.allclose(scaled_loss, loss)  # the reported loss is unscaled
    for name, grad in grads.items():
        assert torch.allclose(scaled_grads[name], 8.0 * grad, rtol=1e-5, atol=1e-6), name


def test_decoupled_decay_is_hooked_once_into_a_user_optimizer(args_factory):
    lam, lr = 0.5, 0.1
    model = tiny_opt()
    pre = snapshot(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    trainer = SpecGenTrainer(
        model=model,
        args=args_factory(l2_lambda=lam, l2_mode="decoupled", max_steps=1),
        optimizers=(optimizer, None),
        train_dataset=lm_dataset(8),
    )
    perturb_(model)
    before = snapshot(model)
    assert trainer.create_optimizer() is optimizer and trainer.create_optimizer() is optimizer
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        assert torch.allclose(p.detach(), before[name] - lr * lam * (before[name] - pre[name]), atol=1e-7), name
    trainer.train()
    trainer.args.max_steps = 2
    trainer.train()  # a second train() finds Accelerate's wrapper around the hooked optimizer
    assert len(optimizer._optimizer_step_pre_hooks) == 1


@pytest.mark.parametrize("anchor_dtype", ["bfloat16", "float16"])
def test_coarse_anchor_has_a_dead_zone_of_its_rounding_step(args_factory, anchor_dtype):
    """A bf16 / fp16 anchor of fp32 weights: at the pre-trained weights (and anywhere the weight still rounds
    to its anchor value) every term and its gradient are exactly 0; beyond, the difference to the anchor."""
    lam = dict(l1_lambda=0.5, l2_lambda=2.0, ewc_lambda=3.0, ewc_num_samples=2)
    model = tiny_opt()
    trainer = SpecGenTrainer(
        model=model, args=args_factory(anchor_dtype=anchor_dtype, **lam), train_dataset=lm_dataset(4)
    )
    trainer.specgen.begin_training(None)
    dtype = getattr(torch, anchor_dtype)
    assert all(d.reference.dtype == dtype for d in trainer.deltas)
    assert any((p.detach() != p.detach().to(dtype).float()).any() for p in model.parameters())  # rounding is lossy

    def values_and_grads():
        out = []
        for reg in trainer.specgen.weight_terms:
            model.zero_grad()
            value = reg.apply_(trainer.deltas, grad_scale=1.0)
            out.append((value, [p.grad.clone() for p in model.parameters()]))
        return out

    for value, grads in values_and_grads():  # step 0
        assert value == 0 and all(not g.any() for g in grads)
    with torch.no_grad():  # moved off the pre-trained value, but inside the anchor value's rounding cell: still 0
        for d in trainer.deltas:
            d.param.copy_(d.reference.float() * (1 + torch.finfo(dtype).eps / 8))
    assert any((d.param != d.reference.float()).any() for d in trainer.deltas)
    assert all(value == 0 for value, _ in values_and_grads())

    perturb_(model, scale=0.05)
    pre = {d.name: d.reference.float() for d in trainer.deltas}
    diffs = {}
    for name, p in model.named_parameters():
        moved = p.detach().to(dtype).float() != pre[name]
        diffs[name] = torch.where(moved, p.detach() - pre[name], torch.zeros_like(p))
    l1 = next(r for r in trainer.specgen.weight_terms if r.name == "l1")
    model.zero_grad()
    value = l1.apply_(trainer.deltas, grad_scale=1.0)
    torch.testing.assert_close(value, lam["l1_lambda"] * sum(d.abs().sum() for d in diffs.values()), rtol=1e-5, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, lam["l1_lambda"] * diffs[name].sign())
