"""Elastic weight consolidation with a diagonal Fisher estimated at the pre-trained weights."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .importance import ImportanceRegularizer, ImportanceSample, accumulate_importance
from .positions import check_distribution, output_logits, supervised_positions


class EWC(ImportanceRegularizer):
    """`lambda * sum F_i (theta_i - theta_pre_i)^2`, F the diagonal Fisher at the pre-trained weights:

    `F = E_x[(1/n_x) (d/dtheta sum_t log p(y_t | x))^2]` from per-example gradients (not the square
    of a mini-batch mean). `y` is sampled from the model's own predictive distribution (the true
    Fisher) or, with `fisher_type="empirical"`, taken from the labels. Dividing by the number of
    supervised tokens `n_x` puts F on the scale of the curvature of the task loss, a per-token mean.
    A contrastive model's (CLIP's) candidates for image `i` are the texts of its batch, and its
    label is text `i`.

    Args:
        weight: `ewc_lambda`.
        num_samples: training examples the Fisher is estimated from (`ewc_num_samples`).
        fisher_type: `"true"` (labels sampled from the pre-trained model) or `"empirical"` (the data's
            labels), `ewc_fisher`.
    """

    name = "ewc"
    state_key = "fisher"
    compares_distributions = True

    def __init__(self, weight: float, num_samples: int = 128, fisher_type: str = "true") -> None:
        super().__init__(weight, num_samples)
        self.fisher_type = fisher_type

    @classmethod
    def from_args(cls, args: Any) -> EWC:
        return cls(args.ewc_lambda, args.ewc_num_samples, args.ewc_fisher)

    @property
    def fisher(self) -> dict[str, torch.Tensor] | None:
        return self.importance

    @fisher.setter
    def fisher(self, value: dict[str, torch.Tensor] | None) -> None:
        self.importance = value

    def estimate(self, sample: ImportanceSample) -> dict[str, torch.Tensor]:
        empirical = self.fisher_type == "empirical"

        def scores(outputs: Any, labels: torch.Tensor | None, shifts_labels: bool, generator: torch.Generator):
            return _log_likelihoods(outputs, labels, shifts_labels, empirical, generator)

        return accumulate_importance(sample, scores, torch.square)


def _log_likelihoods(
    outputs: Any, labels: torch.Tensor | None, shifts_labels: bool, empirical: bool, generator: torch.Generator
) -> list[tuple[torch.Tensor, float]]:
    """Per example: `sum_t log p(y_t | x)` over its supervised positions, weighted `1 / n_x`."""
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
        scores.append((log_probs.gather(-1, y.unsqueeze(-1)).sum(), 1.0 / max(y.numel(), 1)))
    return scores


def _sample(log_probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One label per row from `softmax`, by inverse-CDF (much faster than `multinomial` on CPU)."""
    cdf = log_probs.exp().cpu().cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp_max(cdf.shape[-1] - 1).to(log_probs.device)
