"""WiSE-FT: `theta = (1 - alpha) * theta_pre + alpha * theta_ft`, streamed from disk to disk.

Each input tensor is read once per pass (memory-mapped), interpolated for every alpha asked
for, and handed to one sharded writer per alpha, each on a thread of its own (see `writer`):
peak memory is a few tensors and a staging buffer per alpha, never a whole model or shard.
Output directories are written under a temporary name and renamed at the end, so a failure
(bad input, full disk, Ctrl-C, SIGTERM) leaves no partial output (see `atomic`); where they may be
written, never over an input, is `output`'s.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.utils.hub import convert_file_size_to_int

from .atomic import atomic_directory
from .card import write_model_card
from .checkpoint import Checkpoint, read_config, resolve
from .errors import MergeError, MergeWarning
from .hub import check_repo_id, push_folder
from .lora import ADAPTER_CONFIG, LoraAdapter, is_lora_adapter, warn_if_other_base
from .output import Overwrite, check_output_dir, write_marker
from .plan import MergePlan, conv1d_modules, meta_model, plan_adapter_scaling, plan_lora_merge, plan_merge, tied_groups
from .writer import ConcurrentWriters, ShardedWriter, header_room

# Side files a model directory needs besides its weights (config, tokenizer, processors).
SIDE_FILES = [
    "config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
    "vocab.*", "merges.txt", "*.model", "*.tiktoken", "chat_template.*", "preprocessor_config.json",
    "processor_config.json", "image_processor*.json", "video_preprocessor*.json", "feature_extractor*.json",
]  # fmt: skip
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class _Merge:
    """A planned merge: its tensors, the directories its side files come from, and what it writes."""

    plan: MergePlan
    side_dirs: list[Path]  # later ones override earlier ones
    weights_name: str  # "model", or "adapter_model" for --keep-adapter
    sources: tuple[str, str]
    config: dict[str, Any] | None = None  # what the output's config.json says, before the plan's updates


def _output_config(side_dirs: list[Path]) -> dict[str, Any] | None:
    """The config the output gets (the last side directory's), read now: a malformed one is refused
    before anything is written."""
    for directory in reversed(side_dirs):
        config = read_config(directory)
        if config is not None:
            return config
    return None


def _prepare(pretrained: str | os.PathLike, finetuned: str | os.PathLike, dtype: str | None, keep_adapter: bool) -> _Merge:
    if dtype is not None and dtype not in _DTYPES:
        raise MergeError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    torch_dtype = _DTYPES[dtype] if dtype else None
    pre_dir, ft_dir = resolve(pretrained), resolve(finetuned)
    base = Checkpoint(pre_dir)
    sources = (str(pretrained), str(finetuned))
    if is_lora_adapter(ft_dir):
        architecture = meta_model(pre_dir)
        adapter = LoraAdapter(ft_dir, conv1d_modules(architecture))
        tied = tied_groups(architecture)
        if keep_adapter:
            plan, side_dirs, weights_name = plan_adapter_scaling(base, adapter, tied, torch_dtype), [ft_dir], "adapter_model"
        else:
            plan, side_dirs, weights_name = plan_lora_merge(base, adapter, tied, torch_dtype), [pre_dir, ft_dir], "model"
        warn_if_other_base(adapter, pretrained, base.config)  # the shapes fit: planning raises otherwise
    elif keep_adapter:
        raise MergeError(f"keep_adapter needs a LoRA adapter directory as finetuned; {finetuned} has no {ADAPTER_CONFIG}")
    else:
        plan, side_dirs, weights_name = plan_merge(base, Checkpoint(ft_dir), torch_dtype), [ft_dir], "model"
        if not (ft_dir / "config.json").is_file():  # e.g. a bare state dict: the output must still load
            side_dirs = [pre_dir, ft_dir]
            if (pre_dir / "config.json").is_file():
                warnings.warn(f"{finetuned}: no config.json; the output takes {pretrained}'s", MergeWarning, stacklevel=3)
    config = _output_config(side_dirs) if weights_name == "model" else None  # an adapter gets no config.json
    if weights_name == "model" and config is None:
        warnings.warn(
            f"neither {pretrained} nor {finetuned} has a config.json: from_pretrained cannot load the output",
            MergeWarning, stacklevel=3,
        )  # fmt: skip
    return _Merge(plan, side_dirs, weights_name, sources, config)


def _check_alphas(alphas: Sequence[float], extrapolate: bool) -> list[float]:
    if not alphas:
        raise MergeError("no alpha given")
    for alpha in alphas:
        if not math.isfinite(alpha) or abs(alpha) > torch.finfo(torch.float32).max:  # torch.lerp would raise
            raise MergeError(f"alpha must be a finite number within float32 range (tensors are interpolated in float32), got {alpha}")
        if not extrapolate and not 0.0 <= alpha <= 1.0:
            raise MergeError(f"alpha must be in [0, 1] (0: pretrained, 1: finetuned), got {alpha}; pass extrapolate=True (--extrapolate) to go beyond")
    if len(set(alphas)) != len(alphas):
        raise MergeError(f"alphas repeat: {list(alphas)}")
    return [float(a) for a in alphas]


def _check_shard_size(max_shard_size: str | int) -> int:
    """Bytes, from e.g. "5GB", "500MB" or an int; anything else, or not positive, is a `MergeError`."""
    problem = MergeError(
        f"max_shard_size (--max-shard-size) must be a positive size such as 5GB or 500MB, got {max_shard_size!r}"
    )
    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, (str, int)):
        raise problem
    if isinstance(max_shard_size, str) and max_shard_size.strip().isdigit():  # bytes, as an int would say
        max_shard_size = int(max_shard_size)
    try:
        limit = convert_file_size_to_int(max_shard_size)
    except (ValueError, OverflowError):
        raise problem from None
    if limit <= 0:
        raise problem
    return limit


def _copy_side_files(merge: _Merge, directory: Path, dtype: str | None) -> None:
    patterns = [ADAPTER_CONFIG] if merge.weights_name == "adapter_model" else SIDE_FILES
    for source in merge.side_dirs:
        for file in sorted(source.iterdir()):
            if file.is_file() and any(fnmatch.fnmatch(file.name, p) for p in patterns):
                shutil.copyfile(file, directory / file.name)  # permissions from the umask, not the source's
    if merge.config is not None and (dtype is not None or merge.plan.config_updates):
        config = {**merge.config, **merge.plan.config_updates}
        if dtype is not None:
            config.update({k: dtype for k in [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]})
        (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write(
    merge: _Merge, alphas: list[float], directories: list[Path], *, dtype: str | None, max_shard_size: str | int,
    scores: str | None = None,
) -> None:  # fmt: skip
    """One pass over the input tensors, every alpha written beside the others."""
    limit = _check_shard_size(max_shard_size)
    room = header_room([tensor.key for tensor in merge.plan.tensors])
    writers = ConcurrentWriters([ShardedWriter(d, limit, merge.weights_name, room) for d in directories])
    try:
        for tensor in merge.plan.tensors:
            for index, merged in enumerate(tensor.compute(alphas)):
                writers.add(index, tensor.key, merged)
        writers.close()
    except BaseException:
        writers.abort()
        raise
    for directory, alpha in zip(directories, alphas):
        _copy_side_files(merge, directory, dtype)
        write_model_card(directory, *merge.sources, alpha=alpha, scores=scores)
        write_marker(directory, *merge.sources, alpha=alpha)


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
        dtype: "float32", "bfloat16" or "float16"; default: the fine-tuned model's.
        max_shard_size: the largest output shard, e.g. "5GB", "500MB" or a number of bytes.
        overwrite: False: refuse an existing `output_dir`; True: replace it if a previous merge
            wrote it (it holds `specgen_merge.json`) or it is empty; "any": replace whatever it is.
        extrapolate: allow alpha outside [0, 1].
        keep_adapter: with a LoRA adapter, write an adapter whose effect is scaled by alpha.
        scores: a Markdown table (e.g. the speciality/generality report's) for the model card.
        hub_api: an `HfApi`-like object (default: `huggingface_hub.HfApi()`, whose token comes
            from `HF_TOKEN` or the login).

    Returns:
        `output_dir`.
    """
    (alpha,) = _check_alphas([alpha], extrapolate)
    _check_shard_size(max_shard_size)
    if push_to_hub is not None:
        check_repo_id(push_to_hub, "push_to_hub (--push-to-hub)")
    output_dir = Path(output_dir)
    check_output_dir(output_dir, [pretrained, finetuned], overwrite)
    merge = _prepare(pretrained, finetuned, dtype, keep_adapter)
    with atomic_directory(output_dir) as temporary:
        _write(merge, [alpha], [temporary], dtype=dtype, max_shard_size=max_shard_size, scores=scores)
    if push_to_hub is not None:
        push_folder(output_dir, push_to_hub, private=private, api=hub_api, message=f"WiSE-FT merge, alpha={alpha:g}")
    return output_dir


def alpha_dirname(alpha: float) -> str:
    return f"alpha-{alpha:g}"


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
        pretrained, finetuned, dtype, max_shard_size, extrapolate, keep_adapter: as in `wise_ft`.
        alphas: the alphas, distinct.
        output_dir: the sweep's root; `overwrite` applies to it as in `wise_ft`.

    Returns:
        Each alpha's output directory.
    """
    alphas = _check_alphas(list(alphas), extrapolate)
    names = [alpha_dirname(a) for a in alphas]
    if len(set(names)) != len(names):  # alphas equal to 6 significant digits would share a directory
        raise MergeError(f"alphas {alphas} give the same output directory names: {names}")
    _check_shard_size(max_shard_size)
    output_dir = Path(output_dir)
    check_output_dir(output_dir, [pretrained, finetuned], overwrite)
    merge = _prepare(pretrained, finetuned, dtype, keep_adapter)
    with atomic_directory(output_dir) as temporary:
        directories = [temporary / alpha_dirname(a) for a in alphas]
        for d in directories:
            d.mkdir()
        _write(merge, alphas, directories, dtype=dtype, max_shard_size=max_shard_size)
        write_marker(temporary, *merge.sources, alphas=alphas)
    return {a: output_dir / alpha_dirname(a) for a in alphas}


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
    """
    alphas = _check_alphas(list(alphas), extrapolate)
    merge = _prepare(pretrained, finetuned, dtype, keep_adapter=False)
    for alpha in alphas:
        yield alpha, {tensor.key: next(tensor.compute([alpha])) for tensor in merge.plan.tensors}
