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
