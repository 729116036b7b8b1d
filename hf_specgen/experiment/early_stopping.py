"""Early stopping as a baseline: the model saved at fractions of training, scored as extra points
of its method (no extra training). The seed papers compare regularizers and merges against
simply stopping fine-tuning earlier.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from accelerate import PartialState
from transformers import TrainerCallback

from ..atomic import distributed_atomic_directory


CHECKPOINT_INFO = "specgen_checkpoint.json"  # in each saved directory: {"fraction", "step", "steps"}


def check_fractions(fractions: Sequence[float]) -> list[float]:
    """`eval_fractions`: each in (0, 1), none twice; else a `ValueError` naming the option.

    Args:
        fractions: shares of the training's optimizer steps.

    Returns:
        The fractions, sorted.
    """
    for fraction in fractions:
        if not (isinstance(fraction, (int, float)) and math.isfinite(fraction) and 0.0 < fraction < 1.0):
            raise ValueError(
                f"eval_fractions must lie in (0, 1) (1 is the fine-tuned model itself), got {list(fractions)}"
            )
    if len(set(fractions)) != len(fractions):
        raise ValueError(f"eval_fractions {list(fractions)} repeat a value")
    return sorted(fractions)


def fraction_step(fraction: float, max_steps: int) -> int:
    """The optimizer step at `fraction` of `max_steps`: rounded, at least 1."""
    return max(1, round(fraction * max_steps))


def checkpoint_directory(root: Path, fraction: float) -> Path:
    return Path(root) / f"fraction-{fraction:g}"


class EarlyCheckpoints(TrainerCallback):
    """Saves the model at `fractions` of training into `root/fraction-<f>/` (with `CHECKPOINT_INFO`).

    Args:
        save: writes the model (every process calls it: under ZeRO-3 saving gathers), e.g. the trainer's
            `save_model`, or one that saves a moving average of the weights.
        fractions: shares of the training's optimizer steps, each in (0, 1).
        root: where the directories go; each is written aside and renamed in once complete
            (`distributed_atomic_directory`), so an interrupted save leaves no directory that looks finished.
    """

    def __init__(self, save: Callable[[str], Any], fractions: Sequence[float], root: str | Path) -> None:
        self.save, self.fractions, self.root = save, check_fractions(fractions), Path(root)
        self.steps: dict[int, list[float]] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.steps = {}
        for fraction in self.fractions:
            self.steps.setdefault(fraction_step(fraction, state.max_steps), []).append(fraction)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for fraction in self.steps.get(state.global_step, []):
            self._save(fraction, state.global_step, state.max_steps)

    def _save(self, fraction: float, step: int, steps: int) -> None:
        target = checkpoint_directory(self.root, fraction)  # a resumed run saves it again, the same weights
        with distributed_atomic_directory(target) as temporary:
            self.save(str(temporary))  # every process: ZeRO-3 gathers the weights to write them
            if PartialState().is_main_process:
                info = {"fraction": fraction, "step": step, "steps": steps}
                (temporary / CHECKPOINT_INFO).write_text(json.dumps(info))


def saved_checkpoint(root: Path, fraction: float) -> dict[str, Any] | None:
    """`{"fraction", "step", "steps"}` of the model saved at `fraction` under `root`, or None if there is none."""
    info = checkpoint_directory(root, fraction) / CHECKPOINT_INFO
    return json.loads(info.read_text()) if info.is_file() else None
