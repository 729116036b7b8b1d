"""Preference alignment measured on its own axis: rewards, win rates, the implicit DPO reward's
accuracy, and best-of-n samples for reward-ranked fine-tuning (RSF).

    from hf_specgen.alignment import load_reward, win_rate, implicit_reward_accuracy, best_of_n

A reward is any `RewardFunction`: `(prompts, completions) -> list[float]`, the signature of TRL's
reward functions; `load_reward` makes one from a sequence-classification reward model (Hub id or
directory) or from a rule-based reward's name (`hf_specgen/tiny-instruction-reward`; `register_rule` names
another rule).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_getattr


_LAZY = {
    "RewardFunction": ".reward",
    "SequenceClassifierReward": ".reward",
    "load_reward": ".reward",
    "check_reward": ".reward",
    "is_rule": ".reward",
    "REWARD_RULES": ".reward",
    "register_rule": ".reward",
    "win_rate": ".reward",
    "completion_logps": ".implicit",
    "implicit_reward_accuracy": ".implicit",
    "best_of_n": ".rsf",
    "sample_best_of_n": ".rsf",
}

if TYPE_CHECKING:
    from .implicit import completion_logps, implicit_reward_accuracy
    from .reward import (
        REWARD_RULES,
        RewardFunction,
        SequenceClassifierReward,
        check_reward,
        is_rule,
        load_reward,
        register_rule,
        win_rate,
    )
    from .rsf import best_of_n, sample_best_of_n

__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = list(_LAZY)
