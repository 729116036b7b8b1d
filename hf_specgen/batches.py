"""What a forward of the pre-trained reference sees of a training batch.

The teacher (KD, feature protection) and EWC's Fisher run the reference model on the inputs of
the task loss, without its labels (no loss is computed), and with the decoder inputs an
encoder-decoder model (T5, BART) would have made from them: its forward builds
`decoder_input_ids` by shifting `labels` only when it receives the labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft model (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(unwrap_peft(model), "config", None), "is_encoder_decoder", False))


def task_labels(inputs: dict[str, Any], label_names: Sequence[str] = ()) -> torch.Tensor | None:
    """The labels the task loss supervises: the Trainer's single `label_names` entry, else `labels`."""
    names = list(label_names)
    if len(names) == 1 and names[0] in inputs:
        return inputs[names[0]]
    return inputs.get("labels")


def reference_inputs(model: nn.Module, inputs: dict[str, Any], label_names: Sequence[str] = ()) -> dict[str, Any]:
    """`inputs` for a forward of `model` (or its frozen copy) that computes no loss.

    Args:
        model: the model being fine-tuned, or a module of the same architecture.
        inputs: a training batch, as the Trainer hands it to the model.
        label_names: the Trainer's `label_names` (labels under other names than `labels`).

    Returns:
        The batch without its labels, with `decoder_input_ids` made from them for an
        encoder-decoder model that was not given any.
    """
    dropped = {"labels", *label_names}
    kept = {k: v for k, v in inputs.items() if k not in dropped}
    labels = task_labels(inputs, label_names)
    if (
        is_encoder_decoder(model)
        and labels is not None
        and not {"decoder_input_ids", "decoder_inputs_embeds"} & set(kept)
    ):
        base = unwrap_peft(model)
        if not hasattr(base, "prepare_decoder_input_ids_from_labels"):
            raise ValueError(
                f"{type(base).__name__} is an encoder-decoder model without prepare_decoder_input_ids_from_labels: "
                "put decoder_input_ids in the training batches"
            )
        kept["decoder_input_ids"] = base.prepare_decoder_input_ids_from_labels(labels=labels)
    return kept


def right_padded(
    rows: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """A causal LM batch from token rows: `input_ids` right-padded with `pad_id`, `attention_mask`,
    and `labels` (each row's own, e.g. -100 on a prompt) with -100 on the padding.

    Args:
        rows: token ids, one list per example.
        labels: one list per example, as long as its row.
        pad_id: the padding token id.

    Returns:
        `{"input_ids", "attention_mask", "labels"}`, long tensors of shape (examples, longest row).
    """
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    padded_labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, label) in enumerate(zip(rows, labels)):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
        padded_labels[i, : len(label)] = torch.tensor(label, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": padded_labels}
