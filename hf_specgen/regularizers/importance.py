"""Importance-weighted distance to the pre-trained weights, `lambda * sum Omega_i (theta_i - theta_pre_i)^2`.

`Omega` is a diagonal importance estimated once, at the pre-trained weights, from per-example
gradients: EWC's Fisher (squared gradients of the log-likelihood), MAS's sensitivities (absolute
gradients of the output's squared norm). Both share the estimation loop here, the penalty, the
state saved in checkpoints and the memory they report; each says only what it differentiates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..batches import reference_inputs, task_labels
from ..deltas import WeightDelta, scratch
from ..modes import eval_mode
from .base import WeightRegularizer


# outputs, labels, shifts_labels, generator -> per example of the batch: (its scalar score, the weight of its gradient)
ExampleScores = Callable[[Any, "torch.Tensor | None", bool, torch.Generator], list[tuple[torch.Tensor, float]]]


@dataclass
class ImportanceSample:
    """What an importance estimate runs over, prepared by the training loop.

    Attributes:
        model: the module whose forward runs through each delta's `fisher_parameter` (the
            pre-trained model: a `ref_model`, or the model with its adapters disabled).
        deltas: the weights to estimate `Omega` for.
        batches: collated training examples; one forward per batch, one backward per example.
        shifts_labels: the task loss shifts token labels (causal LMs).
        label_names: the Trainer's label names (labels under other names than `labels`).
        generator: the seeded source of anything sampled (EWC's labels).
        device: where `Omega` is kept (None: beside each weight).
    """

    model: nn.Module
    deltas: Sequence[WeightDelta]
    batches: Iterable[dict[str, Any]]
    shifts_labels: bool
    label_names: Sequence[str]
    generator: torch.Generator
    device: torch.device | None = None


def accumulate_importance(
    sample: ImportanceSample, example_scores: ExampleScores, transform: Callable[[torch.Tensor], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """`Omega = mean over examples of weight_x * transform(d score_x / d theta)`, in float32.

    Each weight's gradient is transformed into its accumulator in a hook as soon as backward
    produces it, and only the part its delta regularizes is kept (`WeightDelta.local_gradient`):
    under ZeRO-3, where each layer is gathered for its forward and backward only, no whole-model
    gradient is ever held and each rank stores the slice it owns. The model runs in eval mode and
    no `.grad` is touched.

    Args:
        sample: the model, the deltas and the batches.
        example_scores: per example of a batch's outputs, the scalar to differentiate and its weight.
        transform: what is accumulated of a gradient (`torch.square`, `torch.abs`).

    Returns:
        `Omega` by delta name, each of the delta's `local_shape`.
    """
    model, deltas = sample.model, sample.deltas
    params = [d.fisher_parameter() for d in deltas]
    requires_grad = [p.requires_grad for p in params]
    accumulators = [
        torch.zeros(d.local_shape, dtype=torch.float32, device=sample.device or p.device)
        for d, p in zip(deltas, params)
    ]
    weight = [0.0]  # the weight of the example being differentiated

    def accumulate_into(delta: WeightDelta, acc: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(grad: torch.Tensor) -> torch.Tensor:
            local = delta.local_gradient(grad).to(acc.device, torch.float32)
            acc.add_(transform(local), alpha=weight[0])
            # what autograd.grad returns is unused: a broadcast zero, which takes no memory
            return torch.zeros((), dtype=grad.dtype, device=grad.device).expand(grad.shape)

        return hook

    count = 0
    hooks = []
    with eval_mode(model):
        try:
            for p in params:
                p.requires_grad_(True)
            hooks = [p.register_hook(accumulate_into(d, acc)) for d, p, acc in zip(deltas, params, accumulators)]
            for batch in sample.batches:
                labels = task_labels(batch, sample.label_names)
                outputs = model(**reference_inputs(model, batch, sample.label_names))
                scores = example_scores(outputs, labels, sample.shifts_labels, sample.generator)
                for i, (score, example_weight) in enumerate(scores):
                    weight[0] = example_weight
                    torch.autograd.grad(score, params, allow_unused=True, retain_graph=i < len(scores) - 1)
                    count += 1
        finally:
            for handle in hooks:
                handle.remove()
            for p, flag in zip(params, requires_grad):
                p.requires_grad_(flag)
    if count == 0:
        raise ValueError("the importance estimate needs training examples; the training set is empty")
    return {d.name: acc.div_(count) for d, acc in zip(deltas, accumulators)}


class ImportanceRegularizer(WeightRegularizer):
    """`lambda * sum Omega_i (theta_i - theta_pre_i)^2`; for LoRA, over the effective delta `scale * B @ A`.

    Subclasses say how `Omega` is estimated (`estimate`) and under which key it is saved.

    Args:
        weight: the term's strength, its `<name>_lambda`.
        num_samples: training examples `Omega` is estimated from (`<name>_num_samples`).
    """

    needs_importance: ClassVar[bool] = True
    state_key: ClassVar[str]

    def __init__(self, weight: float, num_samples: int = 128) -> None:
        super().__init__(weight)
        self.num_samples = num_samples
        self.importance: dict[str, torch.Tensor] | None = None

    def estimate(self, sample: ImportanceSample) -> dict[str, torch.Tensor]:
        """`Omega` at the pre-trained weights, by delta name."""
        raise NotImplementedError

    @torch.no_grad()
    def apply_(self, deltas: Sequence[WeightDelta], grad_scale: float) -> torch.Tensor:
        if self.importance is None:
            raise RuntimeError(f"{self.name}: the importance has not been estimated yet")
        totals = []
        for d in deltas:
            importance = self.importance[d.name].reshape(-1)
            for piece in d.pieces():
                difference = piece.difference
                weighted = scratch(difference.device, difference.numel(), slot=1).view_as(difference)
                torch.mul(importance[piece.index].to(difference.device).view_as(difference), difference, out=weighted)
                totals.append(torch.dot(weighted.reshape(-1), difference.reshape(-1)))
                piece.add_grad_(weighted, 2.0 * self.weight * grad_scale)
        return self.weight * (torch.stack(totals).sum() if totals else torch.zeros(()))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.importance is None else {f"{self.state_key}.{k}": v for k, v in self.importance.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        prefix = f"{self.state_key}."
        importance = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        if importance:
            self.importance = importance

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.importance or {}).values())
