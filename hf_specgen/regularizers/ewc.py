"""Elastic weight consolidation with a diagonal Fisher estimated at the pre-trained weights."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..anchor import WeightDelta
from .base import WeightRegularizer
from ..batches import reference_inputs, task_labels
from .positions import check_distribution, output_logits, supervised_positions


def estimate_fisher(
    model: nn.Module,
    deltas: Sequence[WeightDelta],
    batches: Iterable[dict[str, Any]],
    *,
    empirical: bool,
    shifts_labels: bool,
    generator: torch.Generator,
    device: torch.device | None = None,
    label_names: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher `F = E_x[(1/n_x) (d/dtheta sum_t log p(y_t | x))^2]` from per-example gradients.

    Per-example gradients (not the square of a mini-batch mean). `y` is sampled from the model's
    own predictive distribution (the true Fisher) or, with `empirical`, taken from the labels.
    Dividing by the number of supervised tokens `n_x` puts F on the scale of the curvature of the
    task loss, which is a per-token mean. Computed and stored in float32 on `device` (default: each
    weight's device); the model is run in eval mode and gradients go to no `.grad`.

    Each weight's gradient is squared into its Fisher in a hook as soon as backward produces it,
    and only the part its delta regularizes is kept (`WeightDelta.local_gradient`): under ZeRO-3,
    where each layer is gathered for its forward and backward only, no whole-model gradient is
    ever held and each rank stores the slice of F it owns.

    Args:
        model: the model whose forward runs through each delta's `fisher_parameter`.
        deltas: the weights to estimate F for.
        batches: collated training examples; one forward per batch and one backward per example
            in it. Collate one example at a time, except for a contrastive model (CLIP), whose
            candidates for an image are the texts of its batch: there a batch is the group of
            examples the task loss sees together, and `y` for image `i` is one of its texts.
        empirical: use the labels (the empirical Fisher) instead of sampling `y`.
        shifts_labels: the task loss shifts token labels (causal LMs).
        generator: the seeded source of the sampled labels.
        device: where F is kept (None: beside each weight).
        label_names: the Trainer's label names, when the labels are not called `labels`.

    Returns:
        F by delta name, each of the delta's `local_shape`.
    """
    params = [d.fisher_parameter() for d in deltas]
    requires_grad = [p.requires_grad for p in params]
    fisher = [
        torch.zeros(d.local_shape, dtype=torch.float32, device=device or p.device) for d, p in zip(deltas, params)
    ]
    weight = [0.0]  # 1 / n_x of the example being differentiated

    def square_into(delta: WeightDelta, acc: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(grad: torch.Tensor) -> torch.Tensor:
            local = delta.local_gradient(grad).to(acc.device, torch.float32)
            acc.addcmul_(local, local, value=weight[0])
            # what autograd.grad returns is unused: a broadcast zero, which takes no memory
            return torch.zeros((), dtype=grad.dtype, device=grad.device).expand(grad.shape)

        return hook

    was_training = model.training
    model.eval()
    count = 0
    hooks = []
    try:
        for p in params:
            p.requires_grad_(True)
        hooks = [p.register_hook(square_into(d, acc)) for d, p, acc in zip(deltas, params, fisher)]
        for batch in batches:
            labels = task_labels(batch, label_names)
            outputs = model(**reference_inputs(model, batch, label_names))
            scores = _example_log_likelihoods(outputs, labels, shifts_labels, empirical, generator)
            for i, (score, n_positions) in enumerate(scores):
                weight[0] = 1.0 / max(n_positions, 1)
                torch.autograd.grad(score, params, allow_unused=True, retain_graph=i < len(scores) - 1)
                count += 1
    finally:
        for handle in hooks:
            handle.remove()
        for p, flag in zip(params, requires_grad):
            p.requires_grad_(flag)
        model.train(was_training)
    if count == 0:
        raise ValueError("EWC needs training examples to estimate the Fisher; the training set is empty")
    return {d.name: acc.div_(count) for d, acc in zip(deltas, fisher)}


def _example_log_likelihoods(
    outputs: Any, labels: torch.Tensor | None, shifts_labels: bool, empirical: bool, generator: torch.Generator
) -> list[tuple[torch.Tensor, int]]:
    """Per example of the batch: `sum_t log p(y_t | x)` over its supervised positions, and their number."""
    logits = output_logits(outputs).float()
    check_distribution(logits, "ewc_lambda (EWC's Fisher)")
    if getattr(outputs, "logits", None) is None:  # contrastive: image i's candidates are the batch's texts
        labels = torch.arange(logits.shape[0], device=logits.device)
    logits, targets, mask = supervised_positions(logits, labels, shifts_labels)
    if empirical and targets is None:
        raise ValueError("ewc_fisher='empirical' needs labels in the training examples")
    scores = []
    for i in range(logits.shape[0]):
        row_logits, row_targets = logits[i], targets[i] if targets is not None else None
        if mask is not None:
            row_logits, row_targets = row_logits[mask[i]], row_targets[mask[i]]
        log_probs = F.log_softmax(row_logits.reshape(-1, logits.shape[-1]), dim=-1)
        y = row_targets.reshape(-1) if empirical else _sample(log_probs.detach(), generator)
        scores.append((log_probs.gather(-1, y.unsqueeze(-1)).sum(), y.numel()))
    return scores


def _sample(log_probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One label per row from `softmax`, by inverse-CDF (much faster than `multinomial` on CPU)."""
    cdf = log_probs.exp().cpu().cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp_max(cdf.shape[-1] - 1).to(log_probs.device)


class EWC(WeightRegularizer):
    """`lambda * sum F_i (theta_i - theta_pre_i)^2`; for LoRA, over the effective delta `scale * B @ A`."""

    name = "ewc"

    def __init__(self, weight: float, num_samples: int = 128, fisher_type: str = "true") -> None:
        super().__init__(weight)
        self.num_samples, self.fisher_type = num_samples, fisher_type
        self.fisher: dict[str, torch.Tensor] | None = None

    @classmethod
    def from_args(cls, args) -> EWC:
        return cls(args.ewc_lambda, args.ewc_num_samples, args.ewc_fisher)

    @torch.no_grad()
    def apply_(self, deltas: Sequence[WeightDelta], grad_scale: float) -> torch.Tensor:
        if self.fisher is None:
            raise RuntimeError("EWC's Fisher has not been estimated yet")
        total = 0.0
        for d in deltas:
            delta = d.delta()
            weighted = self.fisher[d.name].to(delta.device) * delta
            total = total + torch.dot(weighted.reshape(-1), delta.reshape(-1))
            d.add_grad_(weighted, 2.0 * self.weight * grad_scale)
        return self.weight * total

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.fisher is None else {f"fisher.{k}": v for k, v in self.fisher.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        fisher = {k.removeprefix("fisher."): v for k, v in state.items() if k.startswith("fisher.")}
        if fisher:
            self.fisher = fisher
