"""Memory Aware Synapses (Aljundi et al., 2018): importance from the output's sensitivity, no labels."""

from __future__ import annotations

from typing import Any

import torch

from .importance import ImportanceRegularizer, ImportanceSample, accumulate_importance
from .positions import output_logits, supervised_positions


class MAS(ImportanceRegularizer):
    """`lambda * sum Omega_i (theta_i - theta_pre_i)^2` with `Omega_i = E_x |d g(x) / d theta_i|`,
    `g(x) = (1/n_x) sum_t ||f_t(x)||^2` the squared L2 norm of the output logits, averaged over the
    example's `n_x` supervised (or completion) positions, at the pre-trained weights.

    It differentiates the model's own output, not a likelihood of labels: it needs no labels
    (positions only) and works where none exist (preference pairs, sampled completions) and for
    one-output heads. The per-position mean keeps `Omega` on one scale whatever the length.
    """

    name = "mas"
    state_key = "omega"

    @classmethod
    def from_args(cls, args: Any) -> MAS:
        return cls(args.mas_lambda, args.mas_num_samples)

    def estimate(self, sample: ImportanceSample) -> dict[str, torch.Tensor]:
        return accumulate_importance(sample, _output_sensitivities, torch.abs)


def _output_sensitivities(
    outputs: Any, labels: torch.Tensor | None, shifts_labels: bool, _generator: torch.Generator
) -> list[tuple[torch.Tensor, float]]:
    """Per example: `sum_t ||f_t(x)||^2` over its supervised positions, weighted `1 / n_x`."""
    logits, _, mask = supervised_positions(output_logits(outputs).float(), labels, shifts_labels)
    scores = []
    for i in range(logits.shape[0]):
        row = logits[i][mask[i]] if mask is not None else logits[i]
        row = row.reshape(-1, logits.shape[-1])
        scores.append((row.pow(2).sum(), 1.0 / max(row.shape[0], 1)))
    return scores
