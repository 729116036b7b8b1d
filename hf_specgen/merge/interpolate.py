"""WiSE-FT: `theta = (1 - alpha) * theta_pre + alpha * theta_ft`, streamed from disk to disk.

The `linear` merge method with one alpha for every tensor, under the names and keywords it had
before merge methods existed: `wise_ft`, `wise_ft_sweep`, `iter_wise_ft`. Each is `merge`,
`merge_sweep` or `iter_merge` (`run`) with a `MergeOptions` made of its keywords.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .options import MergeOptions
from .output import Overwrite
from .run import alpha_dirname, iter_merge, merge, merge_sweep


__all__ = ["alpha_dirname", "iter_wise_ft", "wise_ft", "wise_ft_sweep"]


def wise_ft(
    pretrained: str | os.PathLike,
    finetuned: str | os.PathLike,
    alpha: float,
    output_dir: str | os.PathLike,
    push_to_hub: str | None = None,
    *,
    private: bool = False,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: Overwrite = False,
    extrapolate: bool = False,
    keep_adapter: bool = False,
    scores: str | None = None,
    hub_api: Any = None,
) -> Path:
    """Writes the WiSE-FT merge at `alpha` to `output_dir` and optionally pushes it to the Hub.

    Everything that can be checked without writing is checked first (alpha, output directory,
    inputs, shapes), raising a `MergeError`; the output is written under a temporary name and
    renamed at the end, so a failure leaves nothing behind.

    Args:
        pretrained: the pre-trained model: a directory or a Hub id.
        finetuned: the fine-tuned model, or a LoRA adapter directory (giving the full model
            `W0 + alpha * scale * B @ A`, or with `keep_adapter` an adapter of that effect).
        alpha: 0 is the pre-trained model, 1 the fine-tuned one; outside [0, 1] needs `extrapolate`.
        output_dir: the directory to write; never an input, nor inside or around one.
        push_to_hub: a Hub repository id to upload the merge to (checked before merging).
        private: create that repository private.
        dtype: as in `MergeOptions`.
        max_shard_size: as in `MergeOptions`.
        overwrite: as in `MergeOptions`.
        extrapolate: as in `MergeOptions`.
        keep_adapter: as in `MergeOptions`.
        scores: a Markdown table (e.g. the speciality/generality report's) for the model card.
        hub_api: an `HfApi`-like object (default: `huggingface_hub.HfApi()`, whose token comes
            from `HF_TOKEN` or the login).

    Returns:
        `output_dir`.
    """
    options = MergeOptions(
        dtype=dtype,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        extrapolate=extrapolate,
        keep_adapter=keep_adapter,
    )
    return merge(
        pretrained,
        finetuned,
        alpha,
        output_dir,
        options,
        push_to_hub=push_to_hub,
        private=private,
        scores=scores,
        hub_api=hub_api,
    )


def wise_ft_sweep(
    pretrained: str | os.PathLike,
    finetuned: str | os.PathLike,
    alphas: Sequence[float],
    output_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: Overwrite = False,
    extrapolate: bool = False,
    keep_adapter: bool = False,
) -> dict[float, Path]:
    """Writes one merge per alpha to `output_dir/alpha-<alpha>/`, reading each input tensor once.

    Args:
        pretrained: as in `wise_ft`.
        finetuned: as in `wise_ft`.
        alphas: the alphas, distinct.
        output_dir: the sweep's root.
        dtype: as in `wise_ft`.
        max_shard_size: as in `wise_ft`.
        overwrite: applies to `output_dir` as in `wise_ft`.
        extrapolate: as in `wise_ft`.
        keep_adapter: as in `wise_ft`.

    Returns:
        Each alpha's output directory.
    """
    options = MergeOptions(
        dtype=dtype,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        extrapolate=extrapolate,
        keep_adapter=keep_adapter,
    )
    return merge_sweep(pretrained, finetuned, alphas, output_dir, options)


def iter_wise_ft(
    pretrained: str | os.PathLike,
    finetuned: str | os.PathLike,
    alphas: Sequence[float],
    *,
    dtype: str | None = None,
    extrapolate: bool = False,
) -> Iterator[tuple[float, dict[str, torch.Tensor]]]:
    """Yields `(alpha, state_dict)` for each alpha, in memory, for evaluation without writing.

    One merged state dict at a time: load it with `model.load_state_dict(state_dict, strict=False)`
    (tied weights appear once) into a model built from the fine-tuned (or base) directory.

    Args:
        pretrained: the pre-trained model: a directory or a Hub id.
        finetuned: the fine-tuned model, or a LoRA adapter directory.
        alphas: the alphas, 0 the pre-trained model, 1 the fine-tuned one.
        dtype: as in `MergeOptions`.
        extrapolate: as in `MergeOptions`.

    Yields:
        `(alpha, state_dict)`: the alpha and the merged tensors by name.
    """
    yield from iter_merge(pretrained, finetuned, alphas, MergeOptions(dtype=dtype, extrapolate=extrapolate))
