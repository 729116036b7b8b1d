"""Proxy samples for the ratio search: prompts answered by the fine-tuned model.

The alignment-tax paper's HMA scores a merge by how likely it makes what the fine-tuned model
itself says ("proxy distillation"), not the training targets: the fine-tuned model's greedy
answers to the training prompts. `generate_completions` makes those `(prompt, completion)` pairs,
which `search_group_alphas` scores on the completion only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..modes import eval_mode
from .errors import MergeError


def generate_completions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    num_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: str | None = None,
) -> list[tuple[str, str]]:
    """The model's greedy completion of each prompt (or `num_samples` sampled ones), as `(prompt, completion)` pairs.

    Args:
        model: a causal LM (e.g. the fine-tuned model), in evaluation mode for the call.
        tokenizer: its tokenizer; prompts are left-padded in batches (its padding side is restored).
        prompts: the prompts, each non-empty.
        max_new_tokens: tokens generated per prompt at most (fewer where the model ends its answer).
        batch_size: prompts per `generate` call.
        num_samples: completions per prompt (> 1 needs sampling: `temperature` > 0).
        temperature: 0 decodes greedily; > 0 samples at this temperature.
        top_p: nucleus sampling's probability mass, in (0, 1] (sampling only).
        seed: seeds torch's generator before sampling (the same seed, model and prompts give the same samples).
        stop: each completion is cut where this text first occurs (it excluded), e.g. a newline for one-line answers.

    Returns:
        `num_samples` pairs per prompt, in the prompts' order; the completion is the decoded new tokens without
        special tokens.

    Raises:
        MergeError: no prompts, an empty prompt, or a bad `max_new_tokens` / `batch_size`.
    """
    if not prompts:
        raise MergeError("generate_completions needs prompts (got none)")
    empty = [i for i, prompt in enumerate(prompts) if not isinstance(prompt, str) or not prompt.strip()]
    if empty:
        raise MergeError(f"prompt {empty[0]} is empty or not a string: every prompt needs text to answer")
    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size), ("num_samples", num_samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MergeError(f"{name} must be an integer >= 1, got {value!r}")
    if not temperature >= 0 or not 0 < top_p <= 1:  # `not >=`: NaN fails too
        raise MergeError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature!r} and {top_p!r}")
    if num_samples > 1 and temperature == 0:
        raise MergeError(f"num_samples {num_samples} needs sampling: give a temperature > 0 (0 decodes greedily)")
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    )
    side, pad_token = tokenizer.padding_side, tokenizer.pad_token
    if pad_token is None:
        if tokenizer.eos_token is None:
            raise MergeError("the tokenizer has neither a padding nor an end-of-text token to pad prompts with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation continues every row from its last real token
    pairs = []
    if seed is not None:
        torch.manual_seed(seed)
    with eval_mode(model):
        try:
            for start in range(0, len(prompts), batch_size):
                chunk = list(prompts[start : start + batch_size])
                encoded = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
                encoded = {key: value.to(model.device) for key, value in encoded.items()}
                with torch.no_grad():
                    output = model.generate(
                        **encoded,
                        max_new_tokens=max_new_tokens,
                        num_return_sequences=num_samples,
                        pad_token_id=tokenizer.pad_token_id,
                        **sampling,
                    )
                new = output[:, encoded["input_ids"].shape[1] :]  # each prompt's samples are consecutive rows
                prompts_of_rows = [prompt for prompt in chunk for _ in range(num_samples)]
                texts = tokenizer.batch_decode(new, skip_special_tokens=True)
                pairs += zip(prompts_of_rows, (text.split(stop)[0] if stop else text for text in texts))
        finally:
            tokenizer.padding_side, tokenizer.pad_token = side, pad_token
    return pairs
