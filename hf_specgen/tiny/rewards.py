"""The tiny world's rule-based reward, registered into `hf_specgen.alignment` under its Hub-style name
(`names.TINY_INSTRUCTION_REWARD`); the reward registry imports this module on its first lookup."""

from __future__ import annotations

from ..alignment.reward import RewardFunction, register_rule
from .names import TINY_INSTRUCTION_REWARD


def instruction_reward() -> RewardFunction:
    """The rule-based reward of tiny instructions (`preferences.InstructionReward`), made on demand so that
    looking its name up loads no data set.

    Returns:
        A new `InstructionReward`.
    """
    from .preferences import InstructionReward

    return InstructionReward()


register_rule(TINY_INSTRUCTION_REWARD, instruction_reward)
