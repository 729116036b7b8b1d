"""Preference data sets in the one shape the alignment recipe trains and scores on: `prompt`,
`chosen`, `rejected` (TRL's explicit-prompt preference format).

Three shapes are read: explicit text (`prompt`, `chosen`, `rejected` strings: the tiny set),
conversational (`chosen` / `rejected` lists of messages ending with the assistant's answer, as
`HuggingFaceH4/ultrafeedback_binarized`: the prompt is the messages before it) and implicit text
(`chosen` / `rejected` whole dialogues sharing a prefix, as `Anthropic/hh-rlhf`: the prompt is the
shared text up to and including the last `Assistant:` turn marker).
"""

from __future__ import annotations

from typing import Any

COLUMNS = ("prompt", "chosen", "rejected")
ASSISTANT_MARKER = "\n\nAssistant:"  # hh-rlhf's turn marker


def explicit_prompt(row: dict[str, Any]) -> dict[str, Any]:
    """`row` with its prompt split from its answers (`prompt`, `chosen`, `rejected`); conversational rows
    stay messages (TRL applies the chat template), text rows stay text.

    Raises:
        ValueError: a row whose answers cannot be told from its prompt.
    """
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, list):  # messages: the prompt is everything before the last (assistant) message
        if not chosen or not rejected or chosen[-1].get("role") != "assistant" or rejected[-1].get("role") != "assistant":
            raise ValueError("a conversational pair must end with the assistant's answer on both sides")
        return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}
    if row.get("prompt"):
        prompt = row["prompt"]
        if isinstance(prompt, str) and chosen.startswith(prompt) and rejected.startswith(prompt):
            chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]  # answers that repeat their prompt
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    end = _shared_prefix(chosen, rejected).rfind(ASSISTANT_MARKER)
    if end < 0:
        raise ValueError(f"a pair without a prompt column shares no {ASSISTANT_MARKER!r} turn: its prompt cannot be found")
    end += len(ASSISTANT_MARKER)
    return {"prompt": chosen[:end], "chosen": chosen[end:], "rejected": rejected[end:]}


def _shared_prefix(a: str, b: str) -> str:
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return a[:n]


def prompt_text(prompt: str | list[dict[str, str]], tokenizer: Any) -> str:
    """The text a model generates after: a text prompt as it is, messages through the tokenizer's chat
    template with the generation prompt."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def answer_text(answer: str | list[dict[str, str]]) -> str:
    """An answer's text: a text answer as it is, the content of a one-message answer."""
    return answer if isinstance(answer, str) else answer[-1]["content"]
