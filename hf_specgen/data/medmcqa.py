"""MedMCQA: the prompt, the answer and the answer-only training labels, in one place.

Training and evaluation must show the model the same prompt, so both read it from here: the
question, the four options, then `Answer:`; the model is trained on, and scored by the
log-likelihood of, the *text* of the correct option (a letter answer is much slower to learn,
see DESIGN.md).
"""

from __future__ import annotations

from typing import Any, Mapping

from transformers import PreTrainedTokenizerBase


OPTION_KEYS = ("opa", "opb", "opc", "opd")
TRAINING_COLUMNS = ("question", *OPTION_KEYS, "cop")  # what the prompt and the answer read
COLUMNS = ("id", "question", "opa", "opb", "opc", "opd", "cop", "choice_type", "exp", "subject_name", "topic_name")
IGNORE_INDEX = -100


def doc_to_text(doc: Mapping[str, Any]) -> str:
    """The prompt: question and lettered options, ending in `Answer:`.

    Args:
        doc: a MedMCQA row.

    Returns:
        The prompt.
    """
    options = "\n".join(f"{letter}. {doc[key]}" for letter, key in zip("ABCD", OPTION_KEYS))
    return f"Question: {doc['question']}\nOptions:\n{options}\nAnswer:"


def doc_to_choice(doc: Mapping[str, Any]) -> list[str]:
    """The four options' texts, the choices lm-eval scores after the prompt.

    Args:
        doc: a MedMCQA row.

    Returns:
        The texts of options A to D.
    """
    return [doc[key] for key in OPTION_KEYS]


def answer(doc: Mapping[str, Any]) -> str:
    """The text of the correct option (`cop` is 0-3 in the Hub data set).

    Args:
        doc: a MedMCQA row.

    Returns:
        The correct option's text.
    """
    return doc[OPTION_KEYS[doc["cop"]]]


def tokenize_for_training(
    doc: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, max_length: int = 512
) -> dict[str, list[int]]:
    """`input_ids` of prompt + " answer" + end of line, with `labels` on the answer only.

    Args:
        doc: a MedMCQA row.
        tokenizer: the model's tokenizer.
        max_length: tokens at most: the sequence is cut at the end (the answer's tokens first).

    Returns:
        `input_ids`, `attention_mask` and `labels` (-100 outside the answer).
    """
    prompt = tokenizer(doc_to_text(doc), add_special_tokens=False)["input_ids"]
    target = tokenizer(f" {answer(doc)}\n", add_special_tokens=False)["input_ids"]
    input_ids = (prompt + target)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + target)[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}
