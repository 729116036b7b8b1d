"""What the tiny foundations' forgetting measurements share: the Trainer settings of a quiet CPU
fine-tuning, and the three models every measurement scores (base, fine-tuned, WiSE-FT merge)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from hf_specgen.args import SpecGenTrainingArguments
from hf_specgen.merge import wise_ft


WISE_FT_ALPHA = 0.5
_QUIET_CPU = {"use_cpu": True, "save_strategy": "no", "report_to": [], "disable_tqdm": True}
Scores = TypeVar("Scores")


def finetuning_arguments(
    output_dir: Path, seed: int, defaults: Mapping[str, Any], overrides: Mapping[str, Any]
) -> SpecGenTrainingArguments:
    """`defaults` (a foundation's hyper-parameters) under `overrides` (the caller's, e.g. a
    regularizer's weight), for a CPU run that saves nothing but the final model."""
    return SpecGenTrainingArguments(
        **{"output_dir": str(output_dir / "trainer"), "seed": seed, **_QUIET_CPU, **defaults, **overrides}
    )


def score_with_wise_ft(
    base: Path, base_name: str, finetuned: Path, workdir: Path, score: Callable[[Path], Scores]
) -> dict[str, Scores]:
    """Merges WiSE-FT at `WISE_FT_ALPHA` and scores `{base_name, "fine-tuned", "wise-ft-0.5"}`."""
    merged = wise_ft(base, finetuned, WISE_FT_ALPHA, workdir / f"wise-ft-{WISE_FT_ALPHA}", overwrite=True)
    models = {base_name: base, "fine-tuned": finetuned, f"wise-ft-{WISE_FT_ALPHA}": merged}
    return {name: score(Path(path)) for name, path in models.items()}
