"""Best-of-n sampling scored by a reward: the data of reward-ranked fine-tuning (RSF, "RAFT"), the
alignment-tax paper's main RLHF algorithm: sample n answers per prompt, keep the highest-rewarded
one, fine-tune on the kept answers (`SpecGenSFTTrainer`, so the regularizers apply to it too)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..data.preferences import prompt_text
from .reward import Prompt, RewardFunction


def best_of_n(completions: Sequence[tuple[str, str]], rewards: Sequence[float], n: int) -> list[dict[str, Any]]:
    """Each prompt's highest-rewarded completion (ties: the first sampled).

    Args:
        completions: `(prompt, completion)` pairs, each prompt's `n` samples consecutive (as
            `generate_completions(..., num_samples=n)` returns them).
        rewards: one reward per pair.
        n: samples per prompt.

    Returns:
        One `{"prompt", "completion", "reward"}` row per prompt, in order (TRL's prompt-completion format).
    """
    if n < 1 or len(completions) != len(rewards) or len(completions) % n:
        raise ValueError(
            f"best_of_n needs n >= 1 samples per prompt and one reward per sample; got n={n}, "
            f"{len(completions)} samples, {len(rewards)} rewards"
        )
    rows = []
    for start in range(0, len(completions), n):
        best = max(range(start, start + n), key=lambda i: (rewards[i], -i))
        if any(prompt != completions[start][0] for prompt, _ in completions[start : start + n]):
            raise ValueError(f"samples {start}-{start + n - 1} are not {n} samples of one prompt")
        rows.append(
            {"prompt": completions[best][0], "completion": completions[best][1], "reward": float(rewards[best])}
        )
    return rows


def sample_best_of_n(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    reward: RewardFunction,
    *,
    n: int = 8,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    seed: int = 0,
    stop: str | None = None,
) -> list[dict[str, Any]]:
    """Samples `n` completions per prompt from `model`, scores them with `reward`, keeps each prompt's best.

    Args:
        model: the policy to sample from (the SFT model, for one round of RSF).
        tokenizer: its tokenizer.
        prompts: the training prompts, text or messages (generated after through the tokenizer's chat template).
        reward: scores `(prompts, completions)`, given the prompts as they are.
        n: samples per prompt (>= 1).
        temperature: sampling temperature (> 0 for n > 1; `generate_completions` checks it, n and the prompts).
        top_p: nucleus sampling's mass.
        max_new_tokens: tokens per sample at most.
        batch_size: prompts per `generate` call.
        seed: seeds the sampling.
        stop: each sample is cut where this text first occurs.

    Returns:
        `best_of_n`'s rows: one `{"prompt", "completion", "reward"}` per prompt (the prompt as given).
    """
    from ..merge.proxy import generate_completions

    texts = [prompt_text(prompt, tokenizer) for prompt in prompts]
    pairs = generate_completions(
        model,
        tokenizer,
        texts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        num_samples=n,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=stop,
    )
    given = [prompt for prompt in prompts for _ in range(n)]  # the reward and the rows get the prompts as given
    rewards = reward(given, [completion for _, completion in pairs])
    return best_of_n(list(zip(given, (completion for _, completion in pairs))), rewards, n)
