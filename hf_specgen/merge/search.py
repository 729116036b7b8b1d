"""HMA's layer-group ratio search: the K group alphas, at a fixed mean, that make the merge most
likely to produce what the fine-tuned model produces ("Mitigating the Alignment Tax of RLHF").

The merge is `theta(alpha) = theta_pre + alpha_k (theta_ft - theta_pre)` for the tensors of group
k (contiguous blocks, as `AlphaSchedule(group_alphas=...)` splits them; tensors outside the blocks
at the mean). The ratios are `alpha_k = mean * K * w_k / sum_j w_j` with `w_k = sigmoid(s_k) + eps`
(held at 1 where that would pass 1, the excess spread over the other groups: `ratios`),
so their mean is the mean alpha at every step, and `s` is what is optimized (Adam), on the
token-level negative log-likelihood of samples (prompts masked). The gradient with respect to
`alpha_k` is the ordinary weight gradient dotted with `theta_ft - theta_pre` over group k's
tensors: one forward and one backward per batch, no functional transform of the model. Memory:
the model plus two copies of its parameters (`theta_pre` and the difference), in float32.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..batches import right_padded
from .checkpoint import Checkpoint, resolve
from .errors import MergeError
from .schedule import block_counts, find_block


Sample = str | tuple[str, str]  # a text, or (prompt, completion): only the completion is scored
Batch = dict[str, torch.Tensor]
Loss = Callable[[torch.nn.Module, Batch], torch.Tensor]  # (model, batch) -> the mean loss of the batch


def causal_lm_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The mean negative log-likelihood per scored token of `batch` (labels -100 are not scored)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    logits = logits[:, :-1].flatten(0, 1)
    logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    return torch.nn.functional.cross_entropy(logits, labels.flatten(), ignore_index=-100, reduction="mean")


@dataclass
class GroupSearch:
    """The result of `search_group_alphas`.

    Attributes:
        group_alphas: the chosen ratios, input side first (mean `mean_alpha`); merge with
            `merge(pretrained, finetuned, AlphaSchedule(group_alphas=...), out)`.
        mean_alpha: the fixed mean.
        held_out_loss: the held-out negative log-likelihood per token at the chosen ratios
            (the training loss where nothing is held out).
        uniform_loss: the same at uniform ratios (every group at the mean), for comparison.
        history: one entry per step: `{"step", "loss", "group_alphas"}`, and `"held_out_loss"`
            where it was measured.
        state_bytes: the bytes of the two parameter copies the search holds besides the model.
    """

    group_alphas: tuple[float, ...]
    mean_alpha: float
    held_out_loss: float
    uniform_loss: float
    history: list[dict[str, Any]] = field(default_factory=list)
    state_bytes: int = 0


class GroupAlphaObjective:
    """The merged model at given group alphas, its loss on samples and the loss's gradient with
    respect to the alphas (a separate class so that the gradient can be checked on its own).

    Args:
        model: the pre-trained model (its parameters are overwritten with the merge).
        finetuned: the fine-tuned model's parameters by name (same names and shapes).
        groups: the number of groups of contiguous blocks.
        loss: `(model, batch) -> mean loss`, what the ratios minimize: by default a causal LM's
            negative log-likelihood per scored token (`causal_lm_loss`); a recipe gives its own,
            e.g. a classifier's cross-entropy against the fine-tuned model's predictions.
    """

    def __init__(
        self, model: torch.nn.Module, finetuned: dict[str, torch.Tensor], groups: int, loss: Loss = causal_lm_loss
    ) -> None:
        self.model, self.loss_function = model, loss
        self.params = dict(model.named_parameters())  # tied weights once
        missing = sorted(set(self.params) - set(finetuned))
        if missing:
            raise MergeError(f"the fine-tuned model lacks {', '.join(missing[:5])}")
        for name, param in self.params.items():
            if tuple(finetuned[name].shape) != tuple(param.shape):
                raise MergeError(
                    f"{name}: shape {tuple(param.shape)} in pretrained, {tuple(finetuned[name].shape)} in finetuned"
                )
        counts = check_groups(list(self.params), groups)
        self.groups = groups
        self.group_of: dict[str, int | None] = {}
        for name in self.params:
            found = find_block(name)
            self.group_of[name] = None if found is None else found[1] * groups // counts[found[0]]
        with torch.no_grad():
            # at least float32 (float64 models stay float64: the gradient is checked against finite differences)
            dtype = {name: torch.promote_types(param.dtype, torch.float32) for name, param in self.params.items()}
            self.pre = {name: param.detach().to(dtype[name], copy=True) for name, param in self.params.items()}
            self.delta = {
                name: finetuned[name].to(self.pre[name].device, dtype[name]) - self.pre[name] for name in self.params
            }
        self.state_bytes = sum(t.numel() * t.element_size() for t in [*self.pre.values(), *self.delta.values()])

    def set_alphas(self, alphas: Sequence[float], mean: float) -> None:
        """Writes `theta_pre + alpha (theta_ft - theta_pre)` into the model, each group at its alpha,
        tensors outside the blocks at `mean`."""
        with torch.no_grad():
            for name, param in self.params.items():
                group = self.group_of[name]
                alpha = mean if group is None else alphas[group]
                param.copy_(torch.add(self.pre[name], self.delta[name], alpha=float(alpha)))

    def loss(self, batch: Batch) -> torch.Tensor:
        """The loss of the model as it stands (the last `set_alphas`) on `batch`."""
        return self.loss_function(self.model, batch)

    def loss_and_gradient(self, batch: Batch, alphas: Sequence[float], mean: float) -> tuple[float, list[float]]:
        """The loss at `alphas` and `dloss/dalpha_k = sum over group k of <dloss/dtheta, theta_ft - theta_pre>`."""
        self.set_alphas(alphas, mean)
        self.model.zero_grad(set_to_none=True)
        loss = self.loss(batch)
        loss.backward()
        gradient = [0.0] * self.groups
        for name, param in self.params.items():
            group = self.group_of[name]
            if group is not None and param.grad is not None:
                gradient[group] += float(torch.dot(param.grad.flatten().double(), self.delta[name].flatten().double()))
        return float(loss.detach()), gradient


def check_groups(names: Sequence[str], groups: int) -> dict[str, int]:
    """The blocks of each stack in `names`; a `MergeError` where there are none or fewer than `groups`."""
    counts = block_counts(names)
    if not counts:
        raise MergeError("no transformer blocks found in the parameter names (layers.N., h.N., blocks.N., ...)")
    small = [(stack, n) for stack, n in counts.items() if n < groups]
    if small:
        raise MergeError(f"{groups} groups, but {small[0][0]} has only {small[0][1]} blocks")
    return counts


def ratios(scores: torch.Tensor, mean: float, eps: float) -> torch.Tensor:
    """K ratios in [0, 1] whose mean is `mean`: `alpha_k = c * w_k`, `w = sigmoid(scores) + eps`, `c`
    rescaling them to the mean (HMA's parameterization), except that a ratio that would pass 1 is
    held at 1 and its excess spread over the others in proportion to their weights (at a mean of
    0.5 with 3 groups, the plain rescaling reaches 1.5: a merge beyond the fine-tuned model)."""
    weights = torch.sigmoid(scores) + eps
    if len(scores) == 1:  # the mean itself, exactly (mean / w * w can round off it), with a zero gradient
        return weights * 0 + mean
    total = mean * len(scores)
    capped = torch.zeros(len(scores), dtype=torch.bool)
    while True:  # at most K rounds: each caps at least one more group
        if bool(capped.all()):
            return torch.ones_like(weights)
        scale = (total - int(capped.sum())) / weights[~capped].sum()
        over = (scale * weights > 1) & ~capped
        if not bool(over.any()):
            return torch.where(capped, torch.ones_like(weights), scale * weights)
        capped |= over


def search_group_alphas(
    pretrained: str | os.PathLike,
    finetuned: str | os.PathLike,
    samples: Sequence[Sample],
    *,
    groups: int = 3,
    mean_alpha: float = 0.2,
    eps: float = 0.05,
    steps: int = 50,
    learning_rate: float = 0.1,
    batch_size: int = 8,
    max_length: int = 256,
    held_out: float = 0.2,
    patience: int = 10,
    middle_penalty: float = 0.0,
    seed: int = 0,
    device: str | None = None,
) -> GroupSearch:
    """Searches HMA's K group alphas at a fixed mean by gradient on the samples' likelihood.

    Args:
        pretrained: a causal LM directory (or Hub id).
        finetuned: a causal LM directory (or Hub id) with the same parameters; the tokenizer is
            the fine-tuned model's (or the pre-trained one's).
        samples: texts, or `(prompt, completion)` pairs of which only the completion is scored,
            e.g. the fine-tuned model's answers to training prompts (the paper's proxy).
        groups: K, the number of groups of contiguous blocks (input side first).
        mean_alpha: the mean of the ratios, fixed (0: pre-trained, 1: fine-tuned).
        eps: the floor of each group's weight (`sigmoid(s) + eps`): how small a group's share can get.
        steps: optimizer steps at most.
        learning_rate: Adam's learning rate on the scores `s`.
        batch_size: samples per step.
        max_length: tokens per sample at most.
        held_out: the share of samples held out for early stopping (0: none; the training loss decides).
        patience: stop when the held-out loss has not improved for this many steps.
        middle_penalty: `lambda * sum over middle groups of (alpha_k - mean)^2`, keeping them near the mean.
        seed: the order of the samples.
        device: where the model, the two parameter copies and the batches live (default: CUDA when
            available, else the CPU).

    Returns:
        The `GroupSearch`: the ratios with the lowest held-out loss, and the path to them.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_search_options(groups, mean_alpha, eps=eps, learning_rate=learning_rate, middle_penalty=middle_penalty)
    if not 0.0 <= held_out < 1.0:
        raise MergeError(f"held_out must be in [0, 1), got {held_out!r}")
    if len(samples) < (2 if held_out else 1):
        raise MergeError(f"search_group_alphas needs samples (got {len(samples)}; with held_out, at least 2)")
    check_groups(Checkpoint(resolve(pretrained)).keys(), groups)  # before loading anything
    tokenizer = _tokenizer(AutoTokenizer, finetuned, pretrained)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=torch.float32).to(device)
    tuned = AutoModelForCausalLM.from_pretrained(finetuned, dtype=torch.float32)
    objective = GroupAlphaObjective(model, {n: p.detach() for n, p in tuned.named_parameters()}, groups)
    del tuned

    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = max(1, round(len(samples) * held_out)) if held_out else 0
    held, train = [samples[i] for i in order[:cut]], [samples[i] for i in order[cut:]]
    held_batch = _encode(
        tokenizer, held or train, max_length, device
    )  # without held-out samples: the training loss decides
    encoded: dict[int, Batch] = {}  # by the first sample's index: a pass over the samples repeats its batches

    def train_batch(step: int) -> Batch:
        first = step * batch_size % len(train)
        if first not in encoded:
            rows = [train[(first + i) % len(train)] for i in range(min(batch_size, len(train)))]
            encoded[first] = _encode(tokenizer, rows, max_length, device)
        return encoded[first]

    return optimize_group_alphas(
        objective,
        train_batch,
        held_batch,
        mean_alpha=mean_alpha,
        eps=eps,
        steps=steps,
        learning_rate=learning_rate,
        patience=patience,
        middle_penalty=middle_penalty,
    )


def row_batches(
    rows: Batch, *, held_out: float = 0.2, batch_size: int = 8, seed: int = 0
) -> tuple[Callable[[int], Batch], Batch]:
    """Splits a batch of equal-length rows (e.g. images and their labels) into the search's step
    batches and its held-out batch, in a seeded order, for `optimize_group_alphas`.

    Args:
        rows: tensors with one row per sample along their first dimension.
        held_out: the share of rows held out (at least one row when > 0; 0: none, the training rows
            are the held-out batch too).
        batch_size: rows per step; the steps cycle over the training rows.
        seed: the order of the rows.

    Returns:
        `(train_batch, held_batch)`: the batch of step `i`, and the held-out batch.
    """
    count = len(next(iter(rows.values())))
    if any(len(value) != count for value in rows.values()):
        raise MergeError("row_batches: the tensors differ in their number of rows")
    if count < (2 if held_out else 1):
        raise MergeError(f"the ratio search needs samples (got {count}; with held_out, at least 2)")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    cut = max(1, round(count * held_out)) if held_out else 0
    held, train = order[:cut], order[cut:]
    size = min(batch_size, len(train))

    def train_batch(step: int) -> Batch:
        first = step * size % len(train)
        index = train[(torch.arange(size) + first) % len(train)]
        return {key: value[index] for key, value in rows.items()}

    return train_batch, {key: value[held if cut else train] for key, value in rows.items()}


def check_search_options(groups: int, mean_alpha: float, **nonnegative: float) -> None:
    """One `MergeError` per bad option of a ratio search: `groups` an integer >= 1, `mean_alpha`
    in (0, 1], and each of `nonnegative` a finite number >= 0 (`learning_rate` > 0)."""
    if isinstance(groups, bool) or not (isinstance(groups, int) and groups >= 1):
        raise MergeError(f"groups must be an integer >= 1, got {groups!r}")
    if isinstance(mean_alpha, bool) or not (isinstance(mean_alpha, (int, float)) and 0.0 < mean_alpha <= 1.0):
        raise MergeError(f"mean_alpha must be in (0, 1], got {mean_alpha!r}")
    for name, value in nonnegative.items():
        positive = name == "learning_rate"
        if not (isinstance(value, (int, float)) and math.isfinite(value) and (value > 0 if positive else value >= 0)):
            raise MergeError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")


def optimize_group_alphas(
    objective: GroupAlphaObjective,
    train_batch: Callable[[int], Batch],
    held_batch: Batch,
    *,
    mean_alpha: float,
    eps: float = 0.05,
    steps: int = 50,
    learning_rate: float = 0.1,
    patience: int = 10,
    middle_penalty: float = 0.0,
) -> GroupSearch:
    """The search itself, over any model and loss: Adam on the ratio scores, early-stopped on `held_batch`.

    Args:
        objective: the model, the fine-tuned weights, the groups and the loss.
        train_batch: the batch of an optimizer step (0, 1, ...).
        held_batch: the batch whose loss chooses the ratios and stops the search.
        mean_alpha, eps, steps, learning_rate, patience, middle_penalty: as in `search_group_alphas`.

    Returns:
        The `GroupSearch`: the ratios with the lowest held-out loss, and the path to them.
    """
    groups = objective.groups
    check_search_options(groups, mean_alpha, eps=eps, learning_rate=learning_rate, middle_penalty=middle_penalty)
    objective.model.eval()  # no dropout: the same loss for the same ratios

    def held_loss(alphas: Sequence[float]) -> float:
        objective.set_alphas(alphas, mean_alpha)
        with torch.no_grad():
            return float(objective.loss(held_batch))

    scores = torch.zeros(groups, dtype=torch.float64, requires_grad=True)  # K = 1: exactly the mean
    optimizer = torch.optim.Adam([scores], lr=learning_rate)
    uniform = [float(mean_alpha)] * groups
    best_loss, best = held_loss(uniform), uniform  # the start: sigmoid(0) for every group is uniform
    result = GroupSearch(tuple(uniform), float(mean_alpha), best_loss, best_loss, state_bytes=objective.state_bytes)
    stale = 0
    for step in range(steps):
        alphas = ratios(scores, mean_alpha, eps)
        loss, gradient = objective.loss_and_gradient(train_batch(step), alphas.tolist(), mean_alpha)
        optimizer.zero_grad()
        surrogate = torch.dot(
            alphas, torch.tensor(gradient, dtype=torch.float64)
        )  # d/ds of the loss through the ratios
        if middle_penalty and groups > 2:
            surrogate = surrogate + middle_penalty * ((alphas[1:-1] - mean_alpha) ** 2).sum()
        surrogate.backward()
        optimizer.step()
        current = ratios(scores.detach(), mean_alpha, eps).tolist()
        entry: dict[str, Any] = {"step": step + 1, "loss": loss, "group_alphas": current}
        entry["held_out_loss"] = value = held_loss(current)
        result.history.append(entry)
        if value < best_loss - 1e-9:
            best_loss, best, stale = value, current, 0
        else:
            stale += 1
            if stale >= patience:
                break
    result.group_alphas, result.held_out_loss = tuple(best), best_loss
    objective.set_alphas(best, mean_alpha)  # the model left at the chosen ratios
    return result


def _tokenizer(auto: Any, *directories: str | os.PathLike) -> Any:
    for directory in directories:
        try:
            tokenizer = auto.from_pretrained(directory)
        except (OSError, ValueError):
            continue
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    raise MergeError(f"no tokenizer in {', '.join(map(str, directories))}")


def _encode(
    tokenizer: Any, samples: Sequence[Sample], max_length: int, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (prompt and padding at -100)."""
    rows, labels = [], []
    for sample in samples:
        prompt, completion = ("", sample) if isinstance(sample, str) else sample
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        ids = (prompt_ids + completion_ids)[:max_length]
        rows.append(ids)
        labels.append(([-100] * len(prompt_ids) + completion_ids)[:max_length])
    if max(map(len, rows)) < 2 or all(all(label == -100 for label in row[1:]) for row in labels):
        raise MergeError("the samples have no completion tokens to score")
    return {key: value.to(device) for key, value in right_padded(rows, labels, tokenizer.pad_token_id).items()}
