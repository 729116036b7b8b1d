"""The implicit reward of a DPO policy, r(x, y) = beta * (log pi(y | x) - log pi_ref(y | x)), and how
often it prefers the chosen answer of a held-out preference pair: a measure of what alignment
learned that needs no generation and no reward model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..data.preferences import common_prefix_length
from ..modes import eval_mode
from .reward import check_pairs


def completion_logps(
    model: Any, tokenizer: Any, prompts: Sequence[str], completions: Sequence[str], *, batch_size: int = 16
) -> list[float]:
    """The log-probability of each completion after its prompt, summed over the completion's tokens.

    Tokenized as TRL's DPO does for text: `prompt` and `prompt + completion` (with the end-of-text
    token appended), the completion's tokens being those after the two's common prefix.

    Args:
        model: a causal LM (evaluation mode for the call).
        tokenizer: its tokenizer.
        prompts: the prompts.
        completions: one completion per prompt.
        batch_size: sequences per forward pass.

    Returns:
        One sum of log-probabilities per pair, in order.
    """
    check_pairs(prompts, completions)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rows = []
    for prompt, completion in zip(prompts, completions):
        prompt_ids = tokenizer(prompt)["input_ids"]
        ids = tokenizer(prompt + completion)["input_ids"] + eos
        start = common_prefix_length(prompt_ids, ids)
        if start == 0 or start == len(ids):
            raise ValueError(f"pair {len(rows)}: the prompt or the completion tokenizes to nothing")
        rows.append((ids, start))
    logps = []
    with eval_mode(model):
        for begin in range(0, len(rows), batch_size):
            logps += _batch_logps(model, rows[begin : begin + batch_size], pad=tokenizer.pad_token_id or 0)
    return logps


def _batch_logps(model: Any, rows: list[tuple[list[int], int]], pad: int) -> list[float]:
    """Summed log-probabilities of the tokens from each row's `start` on (right-padded batch)."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    scored = torch.zeros((len(rows), width - 1), dtype=torch.bool)  # target positions (token t predicted at t-1)
    for i, (ids, start) in enumerate(rows):
        input_ids[i, : len(ids)], attention[i, : len(ids)] = torch.tensor(ids), 1
        scored[i, start - 1 : len(ids) - 1] = True
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits[:, :-1].float()
    token_logps = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:, None].to(device))[..., 0]
    return (token_logps * scored.to(device)).sum(-1).tolist()


def implicit_reward_accuracy(
    chosen: Sequence[float], rejected: Sequence[float], ref_chosen: Sequence[float], ref_rejected: Sequence[float]
) -> float:
    """How often the implicit DPO reward ranks a pair's chosen answer above its rejected one: the
    share of pairs with log pi(y_w) - log pi_ref(y_w) > log pi(y_l) - log pi_ref(y_l), a tie counting
    1/2 (so the reference itself scores 0.5). DPO's beta scales both sides alike: it does not matter.

    Args:
        chosen: the policy's `completion_logps` of each pair's chosen answer.
        rejected: the policy's `completion_logps` of each pair's rejected answer.
        ref_chosen: the reference's (the SFT model's) `completion_logps` of each chosen answer.
        ref_rejected: the reference's `completion_logps` of each rejected answer.

    Returns:
        The accuracy, in [0, 1].
    """
    n = len(chosen)
    if not n or any(len(side) != n for side in (rejected, ref_chosen, ref_rejected)):
        raise ValueError("implicit_reward_accuracy needs >= 1 pair and one value per pair on each side")
    margins = [(c - rc) - (r - rr) for c, r, rc, rr in zip(chosen, rejected, ref_chosen, ref_rejected)]
    return sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins) / n
