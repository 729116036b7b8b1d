"""A module's train / eval mode, switched for a block and restored after it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[Any]:
    """Eval mode (no dropout) for the block; the module's previous mode is restored on exit, even on an error.

    Torch-free itself: it only calls the module's `eval` and `train` (a `torch.nn.Module`'s, or anything alike).

    Args:
        model: the module (e.g. a `torch.nn.Module`, a peft model).

    Returns:
        A context manager that yields `model`.
    """
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
