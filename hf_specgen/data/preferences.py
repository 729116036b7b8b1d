"""Preference data sets in the one shape the alignment recipe trains and scores on: `prompt`,
`chosen`, `rejected` (TRL's explicit-prompt preference format).

Four shapes are read: explicit text (`prompt`, `chosen`, `rejected` strings: the tiny set), explicit
conversational (a `prompt` list of messages, `chosen` / `rejected` lists holding the answer: TRL's
format), conversational with the dialogue in the answers (`chosen` / `rejected` message lists ending
with the assistant's answer, as `HuggingFaceH4/ultrafeedback_binarized`: the prompt is the messages
before it) and implicit text (`chosen` / `rejected` whole dialogues sharing a prefix, as
`Anthropic/hh-rlhf`: the prompt is the shared text up to and including the last `Assistant:` turn).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


COLUMNS = ("prompt", "chosen", "rejected")
ASSISTANT_MARKER = "\n\nAssistant:"  # hh-rlhf's turn marker

Messages = list[dict[str, str]]


def explicit_prompt(row: dict[str, Any]) -> dict[str, Any]:
    """`row` with its prompt split from its answers (`prompt`, `chosen`, `rejected`); conversational rows
    stay messages (TRL applies the chat template), text rows stay text.

    Args:
        row: one pair in any of the module's four shapes (other columns are ignored).

    Returns:
        `{"prompt", "chosen", "rejected"}`: text, or messages (the prompt's, then one answer message each).

    Raises:
        ValueError: an answer missing, empty or of another type than text or messages, or a pair whose
            answers cannot be told from its prompt.
    """
    chosen, rejected, prompt = row.get("chosen"), row.get("rejected"), row.get("prompt")
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(answer, (str, list)) or not answer:
            raise ValueError(f"{name} must be non-empty text or a list of messages, got {answer!r}")
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise ValueError("chosen and rejected must both be text or both be messages")
    if isinstance(chosen, list):
        return _conversational(prompt, chosen, rejected)
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"prompt must be non-empty text with text answers, got {prompt!r}")
        if chosen.startswith(prompt) and rejected.startswith(prompt):  # answers that repeat their prompt
            chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    end = chosen[: common_prefix_length(chosen, rejected)].rfind(ASSISTANT_MARKER)
    if end < 0:
        raise ValueError(
            f"a pair without a prompt column shares no {ASSISTANT_MARKER!r} turn: its prompt cannot be found"
        )
    end += len(ASSISTANT_MARKER)
    return {"prompt": chosen[:end], "chosen": chosen[end:], "rejected": rejected[end:]}


def _conversational(prompt: Any, chosen: Messages, rejected: Messages) -> dict[str, Messages]:
    """Messages split into the prompt's and one answer each: a `prompt` list as given (answers that repeat
    it lose it), otherwise the messages before each answer's last one (the same on both sides)."""
    if isinstance(prompt, list) and prompt:
        n = len(prompt)
        chosen, rejected = (side[n:] if side[:n] == prompt else side for side in (chosen, rejected))
        if not chosen or not rejected:
            raise ValueError("chosen or rejected holds the prompt's messages only: no answer")
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if chosen[-1].get("role") != "assistant" or rejected[-1].get("role") != "assistant":
        raise ValueError("a conversational pair must end with the assistant's answer on both sides")
    if chosen[:-1] != rejected[:-1]:
        raise ValueError("chosen and rejected differ before their answers: the prompt is ambiguous")
    if not chosen[:-1]:
        raise ValueError("a conversational pair without prompt messages: give a prompt column or the user's turn")
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}


def common_prefix_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    """How many leading items (characters, token ids) `a` and `b` share.

    Args:
        a: a sequence.
        b: another.

    Returns:
        The length of their common prefix.
    """
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def is_conversational(prompt: Any) -> bool:
    """Whether a prompt is messages (rendered through a chat template) rather than text.

    Args:
        prompt: a prompt, text or messages.

    Returns:
        True for messages.
    """
    return isinstance(prompt, list)


def prompt_text(prompt: str | Messages, tokenizer: Any) -> str:
    """The text a model generates after: a text prompt as it is, messages through the tokenizer's chat
    template with the generation prompt.

    Args:
        prompt: a text prompt or messages.
        tokenizer: the model's tokenizer (its chat template for messages).

    Returns:
        The prompt's text.
    """
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def answer_text(answer: str | Messages) -> str:
    """An answer's text: a text answer as it is, the content of a one-message answer.

    Args:
        answer: a text answer or one message.

    Returns:
        The answer's text.
    """
    return answer if isinstance(answer, str) else answer[-1]["content"]
