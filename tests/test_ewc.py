"""EWC: the diagonal Fisher from per-example gradients at the pre-trained weights, and the penalty."""

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

import datasets
from conftest import lm_dataset, perturb_, snapshot, tiny_opt
from hf_specgen import SpecGenTrainer


def fisher_of(trainer):
    trainer._prepare_regularizers(None)
    return trainer._weight_terms[0].fisher


def test_empirical_fisher_is_the_mean_of_per_example_squared_gradients(args_factory):
    data = lm_dataset(6)
    model = tiny_opt()
    trainer = SpecGenTrainer(
        model=model, args=args_factory(ewc_lambda=1.0, ewc_fisher="empirical", ewc_num_samples=6), train_dataset=data
    )
    fisher = fisher_of(trainer)
    # By hand: the loss of one example is its per-token mean NLL over n supervised tokens, so
    # d/dtheta sum_t log p = -n * d(loss)/dtheta and F = mean_x n * (d loss / dtheta)^2.
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    batch_grad_mean = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    model.eval()
    for i in range(len(data)):
        example = {k: torch.tensor([data[i][k]]) for k in data.column_names}
        n_tokens = int((example["labels"][:, 1:] != -100).sum())
        model.zero_grad()
        model(**example).loss.backward()
        for name, p in model.named_parameters():
            expected[name] += n_tokens * p.grad.pow(2) / len(data)
            batch_grad_mean[name] += p.grad / len(data)
    assert set(fisher) == set(expected)
    for name in expected:
        assert torch.allclose(fisher[name], expected[name], rtol=1e-4, atol=1e-10), name
    # per-example squares, not the square of a mini-batch mean
    name = "model.decoder.layers.0.fc1.weight"
    assert not torch.allclose(fisher[name], 12 * batch_grad_mean[name].pow(2), rtol=0.1)
    assert all(f.dtype == torch.float32 for f in fisher.values())


class SoftmaxRegression(nn.Module):
    """p(y | x) = softmax(W x): its true Fisher for W[c, j] is x_j^2 p_c (1 - p_c)."""

    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, classes, bias=False)

    def forward(self, x, labels=None):
        logits = self.linear(x)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def test_true_fisher_samples_labels_from_the_model(args_factory):
    torch.manual_seed(0)
    model = SoftmaxRegression(3, 4)
    x = torch.tensor([1.0, -2.0, 0.5])
    n = 3000
    # every label is 0: the empirical Fisher would use it, the true Fisher must not
    data = datasets.Dataset.from_dict({"x": [x.tolist()] * n, "labels": [0] * n})
    trainer = SpecGenTrainer(
        model=model, args=args_factory(ewc_lambda=1.0, ewc_num_samples=n), train_dataset=data
    )
    fisher = fisher_of(trainer)["linear.weight"]
    p = torch.softmax(model.linear.weight.detach() @ x, dim=0)
    analytic = (p * (1 - p))[:, None] * x.pow(2)[None, :]
    # Monte-Carlo error: g^2 / x_j^2 is (1 - p_c)^2 with probability p_c, else p_c^2
    second_moment = p * (1 - p).pow(4) + (1 - p) * p.pow(4)
    std_error = ((second_moment - (p * (1 - p)).pow(2)) / n).sqrt()[:, None] * x.pow(2)[None, :]
    assert ((fisher - analytic).abs() <= 4 * std_error).all()
    empirical_for_label_0 = ((torch.nn.functional.one_hot(torch.tensor(0), 4) - p)[:, None] * x[None, :]).pow(2)
    assert not torch.allclose(fisher, empirical_for_label_0, rtol=0.3)


def test_true_fisher_is_reproducible_from_the_seed(args_factory):
    data = lm_dataset(8)
    fishers = []
    for _ in range(2):
        trainer = SpecGenTrainer(model=tiny_opt(), args=args_factory(ewc_lambda=1.0, ewc_num_samples=4), train_dataset=data)
        fishers.append(fisher_of(trainer))
    assert all(torch.equal(fishers[0][k], fishers[1][k]) for k in fishers[0])


def test_penalty_value_and_gradient(args_factory):
    lam = 3.0
    data = lm_dataset(8)
    model = tiny_opt()
    pre = snapshot(model)
    trainer = SpecGenTrainer(model=model, args=args_factory(ewc_lambda=lam, ewc_num_samples=8), train_dataset=data)
    fisher = fisher_of(trainer)
    assert all(f.min() >= 0 for f in fisher.values()) and sum(f.sum() for f in fisher.values()) > 0
    perturb_(model)
    model.zero_grad()
    term = trainer._weight_terms[0].apply_(trainer.deltas, grad_scale=1.0)
    expected = lam * sum((fisher[n] * (p.detach() - pre[n]).pow(2)).sum() for n, p in model.named_parameters())
    assert torch.allclose(term, expected, rtol=1e-5)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, 2 * lam * fisher[name] * (p.detach() - pre[name]), atol=1e-7), name


def test_fisher_needs_a_training_set(args_factory):
    trainer = SpecGenTrainer(model=tiny_opt(), args=args_factory(ewc_lambda=1.0))
    with pytest.raises(ValueError, match="train_dataset"):
        trainer._prepare_regularizers(None)
