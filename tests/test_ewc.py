"""EWC: the diagonal Fisher from per-example gradients at the pre-trained weights, and the penalty."""

import datasets
import pytest
import torch
from conftest import fisher_of, lm_dataset, perturb_, snapshot, tiny_opt
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_specgen import SpecGenTrainer


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
    trainer = SpecGenTrainer(model=model, args=args_factory(ewc_lambda=1.0, ewc_num_samples=n), train_dataset=data)
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
        trainer = SpecGenTrainer(
            model=tiny_opt(), args=args_factory(ewc_lambda=1.0, ewc_num_samples=4), train_dataset=data
        )
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
    term = trainer.specgen.weight_terms[0].apply_(trainer.deltas, grad_scale=1.0)
    expected = lam * sum((fisher[n] * (p.detach() - pre[n]).pow(2)).sum() for n, p in model.named_parameters())
    assert torch.allclose(term, expected, rtol=1e-5)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, 2 * lam * fisher[name] * (p.detach() - pre[name]), atol=1e-7), name


def test_fisher_needs_a_training_set(args_factory):
    trainer = SpecGenTrainer(model=tiny_opt(), args=args_factory(ewc_lambda=1.0))
    with pytest.raises(ValueError, match="train_dataset"):
        trainer.specgen.begin_training(None)


def test_fisher_is_estimated_at_ref_model_not_at_the_trained_model(args_factory):
    """With `ref_model` the Fisher (and the labels it samples) come from the reference: a perturbed model
    given the pre-trained one as ref_model gets exactly the Fisher of an unperturbed model."""
    data = lm_dataset(6)
    args = args_factory(ewc_lambda=1.0, ewc_num_samples=6)
    unperturbed = fisher_of(SpecGenTrainer(model=tiny_opt(), args=args, train_dataset=data))
    perturbed = tiny_opt()
    perturb_(perturbed, scale=0.2)
    with_ref = fisher_of(SpecGenTrainer(model=perturbed, args=args, train_dataset=data, ref_model=tiny_opt()))
    at_perturbed = fisher_of(SpecGenTrainer(model=perturbed, args=args, train_dataset=data))
    assert set(with_ref) == set(unperturbed)
    for name in unperturbed:
        torch.testing.assert_close(with_ref[name], unperturbed[name], rtol=1e-5, atol=1e-12)
    assert not all(torch.allclose(at_perturbed[k], unperturbed[k], rtol=1e-2) for k in unperturbed)


def test_lora_fisher_is_estimated_at_ref_model(args_factory):
    """A peft model whose base is not the pre-trained model (as after a base-rewriting initialisation):
    with the pre-trained model as ref_model, each LoRA layer's Fisher is the pre-trained weight's."""
    from peft import LoraConfig, get_peft_model

    data = lm_dataset(4)
    args = args_factory(ewc_lambda=1.0, ewc_num_samples=4)
    config = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    plain = fisher_of(
        SpecGenTrainer(model=get_peft_model(tiny_opt(), LoraConfig(**config)), args=args, train_dataset=data)
    )
    rewritten = tiny_opt()
    perturb_(rewritten, scale=0.2)
    model = get_peft_model(rewritten, LoraConfig(**config))
    with_ref = fisher_of(SpecGenTrainer(model=model, args=args, train_dataset=data, ref_model=tiny_opt()))
    assert sorted(with_ref) == sorted(plain) and len(plain) == 4
    for name in plain:
        torch.testing.assert_close(with_ref[name], plain[name], rtol=1e-5, atol=1e-12)


class OneLogitRegression(nn.Module):
    """A regression head without a config: its single logit gives a constant softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 1)

    def forward(self, x, labels=None):
        logits = self.linear(x)
        loss = nn.functional.mse_loss(logits.squeeze(-1), labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


@pytest.mark.parametrize("term", ["ewc_lambda", "kd_lambda"])
def test_a_single_output_head_is_refused_for_kd_and_ewc(args_factory, term):
    """num_labels=1 (regression): KD and EWC were silently 0 at every step."""
    from transformers import OPTForSequenceClassification

    config = tiny_opt().config
    config.num_labels = 1
    with pytest.raises(ValueError, match=rf"{term} > 0 compares the model's output distributions.*1 output"):
        SpecGenTrainer(model=OPTForSequenceClassification(config), args=args_factory(**{term: 1.0}))


def test_a_single_output_without_a_config_is_refused_when_first_seen(args_factory):
    data = datasets.Dataset.from_dict({"x": [[1.0, 2.0, 3.0]] * 4, "labels": [0.5] * 4})
    trainer = SpecGenTrainer(model=OneLogitRegression(), args=args_factory(ewc_lambda=1.0), train_dataset=data)
    with pytest.raises(ValueError, match="ewc_lambda .* 1 outcome per position"):
        trainer.specgen.begin_training(None)
    trainer = SpecGenTrainer(model=OneLogitRegression(), args=args_factory(kd_lambda=1.0))
    batch = {"x": torch.ones(2, 3), "labels": torch.zeros(2)}
    with pytest.raises(ValueError, match="kd_lambda .* 1 outcome per position"):
        trainer.compute_loss(trainer.model.train(), batch)
