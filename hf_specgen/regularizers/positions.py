"""Which outputs the task loss supervises: the logits, and the positions whose label is not -100."""

from __future__ import annotations

from typing import Any

import torch


def output_logits(outputs: Any) -> torch.Tensor:
    """The logits of a model output: `logits`, or CLIP's `logits_per_image`."""
    for key in ("logits", "logits_per_image"):
        logits = getattr(outputs, key, None)
        if logits is not None:
            return logits
    raise ValueError(f"{type(outputs).__name__} has neither `logits` nor `logits_per_image`")


def supervised_positions(
    logits: torch.Tensor, labels: torch.Tensor | None, shifts_labels: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The logits (a view) and labels aligned as the task loss aligns them, and the mask of the
    supervised positions (None: every row).

    Token logits `[B, T, V]` are shifted as the causal-LM loss shifts them and masked where the
    label is -100; classifier logits `[B, C]`, or logits without labels, keep every row.
    """
    if logits.dim() == 2 or labels is None:
        return logits, labels, None
    if shifts_labels:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return logits, labels, labels != -100


def is_contrastive(model: Any) -> bool:
    """Whether `model` scores images against the texts of its batch (CLIP-like `logits_per_image`):
    its candidates are the batch's texts, not a fixed set of classes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return all(hasattr(base, name) for name in ("logit_scale", "get_image_features", "get_text_features"))


def output_classes(model: Any) -> int | None:
    """How many outcomes the model's output distributes over, where the architecture says it: the
    rows of the output embeddings (a vocabulary) or a classifier's `num_labels`; None where it is
    not fixed (contrastive models: the batch) or not known."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if is_contrastive(base):
        return None
    embeddings = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return int(getattr(embeddings.weight, "ds_shape", embeddings.weight.shape)[0])
    config = getattr(base, "config", None)
    if getattr(config, "problem_type", None) == "regression":
        return 1
    return getattr(config, "num_labels", None)


def check_distribution(logits: torch.Tensor, term: str) -> None:
    """Refuses a term that compares output distributions over fewer than 2 outcomes (always 0)."""
    if logits.shape[-1] < 2:
        raise ValueError(
            f"{term} compares output distributions, but the model's logits have {logits.shape[-1]} outcome per "
            "position (a regression head, or a contrastive batch of one): the term would be 0"
        )
