"""CLIP: feature protection on the image embeddings and KD on `logits_per_image`, against
independent computations with a frozen copy of the pre-trained model."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import clip_batch, perturb_, tiny_clip
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from hf_specgen import SpecGenTrainer


def image_embeddings(model, pixel_values):
    """The projected image embedding: transformers 5's `get_image_features` returns a
    `BaseModelOutputWithPooling` whose `pooler_output` it is (older versions: the tensor)."""
    out = model.get_image_features(pixel_values=pixel_values)
    embeds = out if torch.is_tensor(out) else out.pooler_output
    assert embeds.shape == (pixel_values.shape[0], model.config.projection_dim)
    return embeds


def feature_by_hand(student, teacher):
    return (student.double() - teacher.double()).pow(2).sum(-1).mean()


def kd_by_hand(student_logits, teacher_logits, temperature):
    """T^2 * mean over rows of KL(softmax(t / T) || softmax(s / T))."""
    s, t = student_logits.double() / temperature, teacher_logits.double() / temperature
    kl_rows = (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1)
    return temperature**2 * kl_rows.mean()


def test_clip_feature_term_is_image_embedding_distance(args_factory):
    lam = 0.7
    model = tiny_clip()
    pretrained = copy.deepcopy(model).eval()
    trainer = SpecGenTrainer(model=model, args=args_factory(feature_lambda=lam))
    perturb_(model)
    model.train()
    batch = clip_batch()
    task = model(**batch).loss.detach()
    loss = trainer.compute_loss(model, dict(batch))
    with torch.no_grad():
        expected = lam * feature_by_hand(
            image_embeddings(model, batch["pixel_values"]), image_embeddings(pretrained, batch["pixel_values"])
        )
    assert expected > 1e-4
    torch.testing.assert_close((loss.detach() - task).double(), expected, rtol=1e-4, atol=1e-8)
    assert trainer.anchor_memory()["teacher"] == sum(p.numel() * 4 for p in model.parameters())


def tiny_clip_vision(seed=0):
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        image_size=16,
        patch_size=8,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        projection_dim=8,
    )
    return CLIPVisionModelWithProjection(config)


def embedding_regression_loss(outputs, labels, num_items_in_batch=None):
    """The task for a vision tower without a loss of its own: regress the image embeddings onto targets."""
    return F.mse_loss(outputs.image_embeds, labels)


def test_clip_vision_with_projection_feature_term(args_factory):
    lam = 0.5
    model = tiny_clip_vision()
    pretrained = copy.deepcopy(model).eval()
    trainer = SpecGenTrainer(
        model=model, args=args_factory(feature_lambda=lam), compute_loss_func=embedding_regression_loss
    )
    perturb_(model)
    model.train()
    g = torch.Generator().manual_seed(3)
    pixel_values, targets = torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 8, generator=g)
    loss = trainer.compute_loss(model, {"pixel_values": pixel_values, "labels": targets})
    student = model(pixel_values=pixel_values).image_embeds
    with torch.no_grad():
        teacher = pretrained(pixel_values=pixel_values).image_embeds
    task = F.mse_loss(student, targets).detach()
    expected = lam * feature_by_hand(student.detach(), teacher)
    assert expected > 1e-4
    torch.testing.assert_close((loss.detach() - task).double(), expected, rtol=1e-4, atol=1e-8)


def test_clip_kd_on_logits_per_image(args_factory):
    lam, temperature = 0.9, 2.0
    model = tiny_clip()
    pretrained = copy.deepcopy(model).eval()
    trainer = SpecGenTrainer(model=model, args=args_factory(kd_lambda=lam, kd_temperature=temperature))
    perturb_(model)
    model.train()
    batch = clip_batch()
    student = model(**batch)
    loss = trainer.compute_loss(model, dict(batch))
    with torch.no_grad():
        teacher = pretrained(**batch)
    assert student.logits_per_image.shape == (4, 4)
    expected = lam * kd_by_hand(student.logits_per_image.detach(), teacher.logits_per_image, temperature)
    # not logits_per_text: KL is not symmetric in the logit matrix's transpose
    other = lam * kd_by_hand(student.logits_per_text.detach(), teacher.logits_per_text, temperature)
    assert expected > 1e-4 and abs(expected - other) > 1e-3 * expected
    torch.testing.assert_close((loss - student.loss).detach().double(), expected, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("kwargs", [dict(kd_lambda=1.0, kd_temperature=2.0), dict(feature_lambda=1.0)])
def test_terms_and_their_gradients_vanish_at_construction(args_factory, kwargs):
    model = tiny_clip()
    trainer = SpecGenTrainer(model=model, args=args_factory(**kwargs))
    model.train()
    batch = clip_batch()
    params = [p for p in model.parameters() if p.requires_grad]
    task = model(**batch).loss
    task_grads = torch.autograd.grad(task, params)
    loss = trainer.compute_loss(model, dict(batch))
    (name,) = [n for n in trainer.specgen.log_sums if n != "loss_task"]
    assert trainer.specgen.log_sums[name].item() == 0.0  # the term itself, as it is logged
    assert loss.item() == task.item()
    grads = torch.autograd.grad(loss, params)
    added = torch.cat([(g - t).flatten() for g, t in zip(grads, task_grads)])
    if "feature_lambda" in kwargs:
        assert torch.equal(added, torch.zeros_like(added))  # d/ds ||s - t||^2 = 2 (s - t) = 0 exactly
    else:
        # d/ds KL = (softmax(s / T) - softmax(t / T)) / T up to the rounding of sum(softmax) = 1
        reference = torch.cat([t.flatten() for t in task_grads]).norm()
        assert added.norm() <= 1e-6 * reference, (added.norm(), reference)

    # and the term is switched on for real: after a perturbation it is positive
    perturb_(model)
    trainer.specgen.log_sums = {}
    trainer.compute_loss(model, dict(batch))
    assert trainer.specgen.log_sums[name].item() > 1e-6


class PairDataset(torch.utils.data.Dataset):
    def __init__(self, n=8, seed=0):
        self.rows = clip_batch(n, seed)
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {k: self.rows[k][i] for k in ("input_ids", "attention_mask", "pixel_values")}


def contrastive_collator(rows):
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    return {**batch, "return_loss": True}  # CLIPModel computes its contrastive loss only when asked


def test_clip_train_end_to_end_logs_feature_term(args_factory):
    model = tiny_clip()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = args_factory(feature_lambda=1.0, remove_unused_columns=False, max_steps=3, learning_rate=1e-2)
    trainer = SpecGenTrainer(model=model, args=args, train_dataset=PairDataset(), data_collator=contrastive_collator)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    for entry in logs:
        assert "loss_feature" in entry and "loss_task" in entry
        # the logged loss is the task loss plus the feature term
        assert entry["loss"] == pytest.approx(entry["loss_task"] + entry["loss_feature"], rel=1e-4, abs=1e-6)
    assert logs[0]["loss_feature"] == 0.0  # step 1 runs at the pre-trained weights
    assert logs[-1]["loss_feature"] > 0.0  # later steps have moved the image embeddings
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_clip_fisher_scores_each_image_against_the_texts_of_its_batch(args_factory):
    """Contrastive CLIP: one example alone has one candidate text (logits 1 x 1, F = 0 everywhere, as it
    was); the Fisher groups the examples as the task loss does, and image i's label is text i among them."""
    import datasets

    n, group = 8, 4
    rows = clip_batch(n)
    data = datasets.Dataset.from_dict({k: v.tolist() for k, v in rows.items() if k != "return_loss"})
    model = tiny_clip()
    args = args_factory(ewc_lambda=1.0, ewc_fisher="empirical", ewc_num_samples=n, per_device_train_batch_size=group)
    trainer = SpecGenTrainer(model=model, args=args, train_dataset=data)
    trainer.specgen.begin_training(None)
    fisher = trainer.specgen.weight_terms[0].fisher
    # by hand: the Fisher's seeded order, groups of 4, per-image gradients of log p(text i | image i, batch texts)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))
    params = dict(model.named_parameters())
    by_hand = {k: torch.zeros_like(p) for k, p in params.items()}
    model.eval()
    for start in range(0, n, group):
        idx = order[start : start + group]
        logits = model(**{k: v[idx] for k, v in rows.items() if k != "return_loss"}).logits_per_image
        for i in range(group):
            score = F.log_softmax(logits[i], -1)[i]
            for k, g in zip(
                params, torch.autograd.grad(score, list(params.values()), retain_graph=True, allow_unused=True)
            ):
                if g is not None:
                    by_hand[k] += g.pow(2) / n
    assert sum(f.sum() for f in fisher.values()) > 0
    for k in fisher:
        torch.testing.assert_close(fisher[k], by_hand[k], rtol=1e-4, atol=1e-10)
    one = SpecGenTrainer(
        model=tiny_clip(), args=args_factory(ewc_lambda=1.0, per_device_train_batch_size=1), train_dataset=data
    )
    with pytest.raises(ValueError, match="per_device_train_batch_size >= 2"):
        one.specgen.begin_training(None)


def test_clip_kd_over_a_batch_of_one_is_refused(args_factory):
    trainer = SpecGenTrainer(model=tiny_clip(), args=args_factory(kd_lambda=1.0))
    with pytest.raises(ValueError, match="kd_lambda .* 1 outcome per position"):
        trainer.compute_loss(trainer.model.train(), clip_batch(1))
