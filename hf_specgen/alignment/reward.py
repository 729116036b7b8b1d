"""Rewards of completions: a reward model's scores, a rule's, and the win rate of one policy's
completions against another's under the same reward.

Rule-based rewards are named in `REWARD_RULES`, which `register_rule` fills: the tiny world's rule
(`hf_specgen/tiny-instruction-reward`) is registered by `hf_specgen.tiny.rewards`, a provider the
registry imports on its first lookup, so this package does not import the tiny foundations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from ..registry import Registry


Prompt = str | list[dict[str, str]]  # text, or messages (a conversational prompt)


class RewardFunction(Protocol):
    """Scores completions: `reward(prompts, completions) -> [float, ...]`, one per pair (TRL's reward
    function signature, without its keyword extras); a prompt is text or a list of messages."""

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]: ...


# Rule-based rewards by name: a factory that makes the rule (takes no options). Their providers: modules that
# register rules when imported.
REWARD_RULES: Registry[Callable[[], RewardFunction]] = Registry("reward rule", ("hf_specgen.tiny.rewards",))


def register_rule(name: str, factory: Callable[[], RewardFunction]) -> Callable[[], RewardFunction]:
    """Names a rule-based reward, so that `load_reward(name)` makes it and `is_rule(name)` holds.

    Args:
        name: the name a configuration gives (as `reward_model_name_or_path`).
        factory: makes the reward, without options (e.g. the rule's class).

    Returns:
        `factory`, so that `register_rule(name, ...)` can decorate a class.

    Raises:
        ValueError: another rule has the name.
    """
    return REWARD_RULES.register(name, factory)


class SequenceClassifierReward:
    """A reward model (`AutoModelForSequenceClassification` with one output) as a `RewardFunction`:
    the score of `prompt + completion`, read at the last token, in batches. A conversational prompt
    (messages) is rendered with the completion as the assistant's answer through the reward model's own
    chat template, the format it was trained on.

    Args:
        model_name_or_path: the reward model, Hub id or directory.
        batch_size: texts per forward pass.
        max_length: texts are truncated to this many tokens from the left (the completion's end is
            what the score reads); None: the tokenizer's `model_max_length`.
        device: where the model runs (default: CUDA when available).
    """

    def __init__(
        self,
        model_name_or_path: str | Path,
        *,
        batch_size: int = 16,
        max_length: int | None = None,
        device: str | None = None,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
            self.model = AutoModelForSequenceClassification.from_pretrained(model_name_or_path)
        except (OSError, ValueError) as error:  # not found, offline, not a model
            raise ValueError(f"reward model {str(model_name_or_path)!r} cannot be loaded: {error}") from error
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"reward model {model_name_or_path!r} has {self.model.config.num_labels} outputs; a reward "
                "model scores with one (num_labels=1)"
            )
        if self.tokenizer.pad_token is None:  # padding is masked; the score reads the last real token
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size, self.max_length = batch_size, max_length
        self.model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()

    @property
    def takes_messages(self) -> bool:
        """Whether conversational prompts can be scored (the reward model's tokenizer has a chat template)."""
        return self.tokenizer.chat_template is not None

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
        """The reward model's score of each `prompt + completion`.

        Args:
            prompts: the prompts: text as the policy saw it, or messages (`takes_messages` needed).
            completions: the policy's text after each prompt.

        Returns:
            One score per pair, in order.
        """
        check_pairs(prompts, completions)
        texts = [self._text(p, c) for p, c in zip(prompts, completions)]
        tokenizer, scores = self.tokenizer, []
        side, truncation = tokenizer.padding_side, tokenizer.truncation_side
        tokenizer.padding_side, tokenizer.truncation_side = "right", "left"
        try:
            for start in range(0, len(texts), self.batch_size):
                encoded = tokenizer(
                    texts[start : start + self.batch_size],
                    return_tensors="pt",
                    padding=True,
                    truncation=self.max_length is not None,
                    max_length=self.max_length,
                )
                with torch.no_grad():
                    logits = self.model(**{k: v.to(self.model.device) for k, v in encoded.items()}).logits
                scores += logits[:, 0].float().tolist()
        finally:
            tokenizer.padding_side, tokenizer.truncation_side = side, truncation
        return scores

    def _text(self, prompt: Prompt, completion: str) -> str:
        if isinstance(prompt, str):
            return prompt + completion
        if not self.takes_messages:
            raise ValueError(
                "a conversational prompt, but the reward model's tokenizer has no chat template to render it"
            )
        return self.tokenizer.apply_chat_template(
            [*prompt, {"role": "assistant", "content": completion}], tokenize=False
        )


def load_reward(name: str, **options: Any) -> RewardFunction:
    """The reward named.

    Args:
        name: a rule's (`REWARD_RULES`, e.g. `hf_specgen/tiny-instruction-reward`, the tiny world's; a rule
            takes no options), or a reward model's Hub id or directory.
        options: `SequenceClassifierReward`'s (`batch_size`, `max_length`, `device`).

    Returns:
        A `RewardFunction`.

    Raises:
        ValueError: options for the rule, or a reward model that cannot be loaded or has more than one output.
    """
    if is_rule(name):
        if options:
            raise ValueError(f"{name} is a rule: it takes no options, got {sorted(options)}")
        return REWARD_RULES[name]()
    return SequenceClassifierReward(name, **options)


def is_rule(name: str) -> bool:
    """Whether `name` is a rule-based reward (`REWARD_RULES`: the tiny world's), not a reward model to load.

    Args:
        name: `reward_model_name_or_path`.

    Returns:
        True for a rule's name.
    """
    return name in REWARD_RULES


def check_reward(name: str, *, messages: bool = False) -> None:
    """Checks, before any training, that the reward named can score: a rule can; a reward model's configuration
    loads and has one output, and with `messages` (conversational prompts) its tokenizer has a chat template.

    Args:
        name: as `load_reward` takes it.
        messages: the prompts it will score are messages.

    Raises:
        ValueError: naming `name` and the problem.
    """
    if is_rule(name):
        return
    from transformers import AutoConfig, AutoTokenizer

    try:
        labels = AutoConfig.from_pretrained(name).num_labels
        template = AutoTokenizer.from_pretrained(name).chat_template if messages else ""
    except (OSError, ValueError) as error:  # not found, offline, not a model
        raise ValueError(f"{name!r} cannot be loaded: {error}") from error
    if labels != 1:
        raise ValueError(f"{name!r} has {labels} outputs; a reward model scores with one (num_labels=1)")
    if template is None:
        raise ValueError(f"{name!r} has no chat template to render conversational prompts")


def win_rate(rewards: Sequence[float], baseline: Sequence[float]) -> float:
    """How often a policy's completion out-scores the baseline's completion of the same prompt: a win
    counts 1, a tie 1/2, a loss 0 (the baseline against itself: 0.5).

    Args:
        rewards: the policy's reward per prompt.
        baseline: the baseline's (e.g. the SFT model's) reward per prompt, same order.

    Returns:
        The mean, in [0, 1].
    """
    if len(rewards) != len(baseline) or not rewards:
        raise ValueError(
            f"win_rate needs one baseline reward per reward (>= 1), got {len(rewards)} and {len(baseline)}"
        )
    if not all(math.isfinite(r) for r in (*rewards, *baseline)):
        raise ValueError("win_rate: a reward is not a finite number (NaN or infinite): nothing to compare")
    return sum(1.0 if r > b else 0.5 if r == b else 0.0 for r, b in zip(rewards, baseline)) / len(rewards)


def check_pairs(prompts: Sequence[Prompt], completions: Sequence[str]) -> None:
    """Stops on prompts and completions of different lengths (one completion per prompt)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions: one completion per prompt")
