"""The tiny world's preference data and reward: aligning the tiny Galactica to an instruction it was
never taught, the organism of the alignment-tax recipe.

The foundation is pre-trained on four letter instructions (`lm_data.OPERATIONS`: reverse, repeat,
drop the first, sort). The preference set asks for a fifth, "drop the last letter x y z": the chosen
answer is its correct output, the rejected one the plausible wrong answer a model that knows only
the pre-training would give, the output of "drop the first letter". (A preference for a style over
correct plain answers teaches DPO to push correct answers down; a wrong rejected answer does not.)

The reward (`InstructionReward`) checks any tiny instruction's answer by rule: 1.0 when the first
line of the completion is the instruction's output, else 0.0. It has the signature of a reward
model scorer (`hf_specgen.alignment.RewardFunction`), so the recipe treats it like one.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Callable, Sequence

import datasets

from ..alignment.reward import Prompt, check_pairs
from .lm_data import LETTERS, OPERATIONS, instruction_prompt


ALIGNED_INSTRUCTION = "drop the last letter"
ALIGNED_OPERATION: Callable[[list[str]], list[str]] = lambda s: s[:-1]  # noqa: E731
REJECTED_INSTRUCTION = "drop the first letter"  # whose output is the rejected answer
INSTRUCTIONS = {**OPERATIONS, ALIGNED_INSTRUCTION: ALIGNED_OPERATION}
PREFERENCE_SPLITS = {"train": 300, "test": 60}  # pairs per split, over distinct letter triples
_PROMPT = re.compile(r"Instruction: (?P<name>[a-z ]+?) (?P<letters>(?:[a-z] )*[a-z])\nResponse:\s*$")


def preference_pairs(seed: int = 0) -> datasets.DatasetDict:
    """The preference splits (`prompt`, `chosen`, `rejected`: TRL's explicit-prompt format): each
    prompt asks to drop the last of three letters; train and test draw disjoint letter triples."""
    triples = list(itertools.permutations(LETTERS, 3))
    random.Random(seed + 7).shuffle(triples)
    splits, start = {}, 0
    for split, n in PREFERENCE_SPLITS.items():
        rows = [
            {
                "prompt": instruction_prompt(ALIGNED_INSTRUCTION, letters),
                "chosen": " " + " ".join(ALIGNED_OPERATION(list(letters))),
                "rejected": " " + " ".join(OPERATIONS[REJECTED_INSTRUCTION](list(letters))),
            }
            for letters in triples[start : start + n]
        ]
        splits[split], start = datasets.Dataset.from_list(rows), start + n
    return datasets.DatasetDict(splits)


class InstructionReward:
    """The rule-based reward of tiny instructions: 1.0 when a completion's first line (stripped) is
    the instruction's output, 0.0 otherwise (and for a prompt that is no tiny instruction)."""

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
        """Rewards of `completions`, one per (prompt, completion) pair.

        Args:
            prompts: tiny instruction prompts (`instruction_prompt`), as text or as a message holding it.
            completions: the model's text after each prompt.

        Returns:
            One reward in {0.0, 1.0} per pair.
        """
        check_pairs(prompts, completions)
        answers = [self.answer(prompt) for prompt in prompts]
        return [float(a is not None and c.split("\n")[0].strip() == a) for a, c in zip(answers, completions)]

    @staticmethod
    def answer(prompt: str | list[dict[str, str]]) -> str | None:
        """The correct output of a tiny instruction prompt (text, or messages: the last one's); None when the
        prompt is not one."""
        if isinstance(prompt, list):
            prompt = prompt[-1].get("content", "") if prompt else ""
        match = _PROMPT.search(prompt)
        if match is None or match["name"] not in INSTRUCTIONS:
            return None
        return " ".join(INSTRUCTIONS[match["name"]](match["letters"].split(" ")))
