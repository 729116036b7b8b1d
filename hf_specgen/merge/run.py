"""Merges, streamed from disk to disk, whatever the method: `merge`, `merge_sweep`, `iter_merge`.

Each input tensor is read once per pass (memory-mapped), merged by the method for every alpha
asked for, and handed to one sharded writer per output, each on a thread of its own (see
`writer`): peak memory is a few tensors and a staging buffer per output, never a whole model or
shard. Output directories are written under a temporary name and renamed at the end, so a failure
(bad input, full disk, Ctrl-C, SIGTERM) leaves no partial output (see `atomic`); where they may be
written, never over an input, is `output`'s. Everything that can be checked without writing is
checked first (alphas and schedules, the method and its parameters, the output path, the inputs,
shapes, method input files), raising a `MergeError`.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_directory
from ..version import __version__
from .card import write_model_card
from .checkpoint import Checkpoint, read_config, resolve
from .chunked import materialize
from .errors import MergeError, MergeWarning, MergeWriteError
from .hub import check_repo_id, push_folder
from .inputs import TensorFile
from .lora import ADAPTER_CONFIG, LoraAdapter, is_lora_adapter, warn_if_other_base
from .methods import BoundMethod
from .options import MergeOptions, check_shard_size
from .output import check_output_dir, write_marker
from .plan import (
    MergePlan,
    attach_input,
    conv1d_modules,
    linear_weights,
    meta_model,
    plan_adapter_scaling,
    plan_lora_merge,
    plan_merge,
    tied_groups,
)
from .schedule import AlphaSchedule, check_alpha
from .writer import ConcurrentWriters, ShardedWriter, header_room


# Side files a model directory needs besides its weights (config, tokenizer, processors).
SIDE_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "chat_template.*",
    "preprocessor_config.json",
    "processor_config.json",
    "image_processor*.json",
    "video_preprocessor*.json",
    "feature_extractor*.json",
]
MERGE_CONFIG = "merge_config.json"
Source = str | os.PathLike


@dataclass
class _Merge:
    """A planned merge: its tensors and method, the directories its side files come from, and what it writes."""

    plan: MergePlan
    method: BoundMethod
    side_dirs: list[Path]  # later ones override earlier ones
    weights_name: str  # "model", or "adapter_model" for --keep-adapter
    pretrained: str
    finetuned: list[str]
    architecture_dir: Path  # where the linear layers are read from
    config: dict[str, Any] | None = None  # what the output's config.json says, before the plan's updates
    inputs: dict[str, str] = field(default_factory=dict)  # the method's input files
    model_names: list[str] | None = None  # an adapter's base model's tensors: where blocks are counted, rules matched

    @property
    def sources(self) -> tuple[str, str | list[str]]:
        """(pretrained, finetuned) as the card and the marker name them: one fine-tuned model as itself."""
        return self.pretrained, self.finetuned[0] if len(self.finetuned) == 1 else list(self.finetuned)

    @functools.cached_property
    def linear(self) -> set[str] | None:
        return linear_weights(meta_model(self.architecture_dir))

    def alphas(self, schedule: AlphaSchedule) -> dict[str, float]:
        """Each output tensor's alpha by schedule name (a `MergeError` where the schedule does not fit)."""
        names = list(dict.fromkeys(t.schedule_name for t in self.plan.tensors))
        alphas = schedule.resolve(names, self.linear if schedule.linear_only else None, self.model_names)
        method = self.method.method
        if method.interpolates_only:
            outside = sorted({a for a in alphas.values() if not 0.0 <= a <= 1.0})
            if outside:
                raise MergeError(
                    f"method {method.name!r} is defined for alphas in [0, 1] only, extrapolate or not; "
                    f"got {outside[0]:g}"
                    + (f" ({method.interpolates_only})" if isinstance(method.interpolates_only, str) else "")
                )
        return alphas

    def plain(self, schedule: AlphaSchedule) -> bool:
        """Plain WiSE-FT (linear, one fine-tuned model, one alpha): written exactly as before methods existed."""
        return self.method.method.name == "linear" and schedule.scalar and len(self.finetuned) == 1


def _output_config(side_dirs: list[Path]) -> dict[str, Any] | None:
    """The config the output gets (the last side directory's), read now: a malformed one is refused
    before anything is written."""
    for directory in reversed(side_dirs):
        config = read_config(directory)
        if config is not None:
            return config
    return None


def _finetuned_list(finetuned: Source | Sequence[Source]) -> list[Source]:
    items = [finetuned] if isinstance(finetuned, (str, os.PathLike)) else list(finetuned)
    if not items:
        raise MergeError("no fine-tuned model given")
    return items


def _prepare(pretrained: Source, finetuned: list[Source], options: MergeOptions) -> _Merge:
    method = options.bound(len(finetuned))
    torch_dtype = options.torch_dtype
    pre_dir, ft_dirs = resolve(pretrained), [resolve(f) for f in finetuned]
    base = Checkpoint(pre_dir)
    names = (str(pretrained), [str(f) for f in finetuned])
    adapters = [str(f) for f, d in zip(finetuned, ft_dirs) if is_lora_adapter(d)]
    if adapters and len(finetuned) > 1:
        raise MergeError(
            f"{adapters[0]}: several fine-tuned models are merged as full models only: merge each adapter into its "
            "base first (specgen merge --alpha 1) and pass the full models"
        )
    if adapters and method.method.delta is None:
        raise MergeError(
            f"{adapters[0]}: method {method.method.name!r} has no exact form on a LoRA adapter: merge the "
            "adapter into the full model first (specgen merge --alpha 1) and pass that"
        )
    if adapters:
        ft_dir = ft_dirs[0]
        architecture = meta_model(pre_dir)
        adapter = LoraAdapter(ft_dir, conv1d_modules(architecture))
        tied = tied_groups(architecture)
        if options.keep_adapter:
            plan, side_dirs, weights_name = (
                plan_adapter_scaling(base, adapter, tied, torch_dtype),
                [ft_dir],
                "adapter_model",
            )
        else:
            plan, side_dirs, weights_name = (
                plan_lora_merge(base, adapter, tied, torch_dtype),
                [pre_dir, ft_dir],
                "model",
            )
        warn_if_other_base(adapter, pretrained, base.config)  # the shapes fit: planning raises otherwise
    elif options.keep_adapter:
        raise MergeError(
            f"keep_adapter needs a LoRA adapter directory as finetuned; {finetuned[0]} has no {ADAPTER_CONFIG}"
        )
    else:
        plan, side_dirs, weights_name = (
            plan_merge(base, [Checkpoint(d) for d in ft_dirs], torch_dtype),
            [ft_dirs[0]],
            "model",
        )
        if not (ft_dirs[0] / "config.json").is_file():  # e.g. a bare state dict: the output must still load
            side_dirs = [pre_dir, ft_dirs[0]]
            if (pre_dir / "config.json").is_file():
                warnings.warn(
                    f"{finetuned[0]}: no config.json; the output takes {pretrained}'s", MergeWarning, stacklevel=4
                )
        for name, path in options.method_inputs.items():
            like = method.method.inputs[name].like
            source = TensorFile(path)
            if source.training_state and like != "pretrained":
                warnings.warn(
                    f"{path}: a training run's EWC Fisher is the pre-trained model's (estimated at theta_pre), "
                    "given as "
                    f"{name} (--{name.replace('_', '-')}); estimate the fine-tuned model's with specgen fisher",
                    MergeWarning,
                    stacklevel=4,
                )
            attach_input(plan, name, source, like, f"{name} ({path})")
        declared = list(method.method.inputs)
        uncovered = [t.key for t in plan.tensors if t.merged() and not set(declared) <= set(t.inputs)]
        if uncovered and method.method.fallback is None:  # nothing to merge them with
            raise MergeError(
                f"method {method.method.name!r} has no fallback method: its inputs ({', '.join(declared)}) must cover "
                f"every merged tensor; they lack {', '.join(uncovered[:8])}{' ...' if len(uncovered) > 8 else ''}"
            )
    config = _output_config(side_dirs) if weights_name == "model" else None  # an adapter gets no config.json
    if weights_name == "model" and config is None:
        warnings.warn(
            f"neither {pretrained} nor {finetuned[0]} has a config.json: from_pretrained cannot load the output",
            MergeWarning,
            stacklevel=4,
        )
    inputs = {name: str(path) for name, path in options.method_inputs.items()}
    model_names = base.keys() if adapters else None
    return _Merge(plan, method, side_dirs, weights_name, *names, pre_dir, config, inputs, model_names)


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


def _record(merge: _Merge, schedule: AlphaSchedule, alphas: dict[str, float]) -> dict[str, Any]:
    """What `merge_config.json` says: the method, its parameters and inputs, the schedule and every
    merged tensor's alpha (copied tensors, e.g. integer buffers or LoRA's A factors, have none)."""
    method = merge.method
    fallback = [t.key for t in merge.plan.tensors if t.merged() and not set(method.method.inputs) <= set(t.inputs)]
    pretrained, finetuned = merge.sources
    record = {
        "written_by": "hf_specgen",
        "version": __version__,
        "method": method.method.name,
        "formula": method.method.formula,
        "parameters": dict(method.params),
        "weights": list(method.weights),
        "inputs": merge.inputs,
        "pretrained": pretrained,
        "finetuned": finetuned,
        "schedule": schedule.describe(),
        "alphas": {t.key: alphas[t.schedule_name] for t in merge.plan.tensors if t.merged()},
    }
    if fallback:
        by_key = {t.key: t for t in merge.plan.tensors}
        missing = {name: sum(name not in by_key[key].inputs for key in fallback) for name in method.method.inputs}
        record["fallback"] = {
            "method": method.fallback().method.name,
            "tensors": fallback,
            "missing": {name: count for name, count in missing.items() if count},
        }
    return record


def _write(
    merge: _Merge,
    schedules: list[AlphaSchedule],
    directories: list[Path],
    *,
    dtype: str | None,
    max_shard_size: str | int,
    scores: str | None = None,
) -> None:
    """One pass over the input tensors, every output written beside the others."""
    limit = check_shard_size(max_shard_size)
    tables = [merge.alphas(schedule) for schedule in schedules]
    room = header_room([tensor.key for tensor in merge.plan.tensors])
    writers = ConcurrentWriters([ShardedWriter(d, limit, merge.weights_name, room) for d in directories])
    try:
        for tensor in merge.plan.tensors:
            alphas = [table[tensor.schedule_name] for table in tables]
            writers.add_outputs(tensor.key, tensor.compute(alphas, merge.method, chunked=True))
        writers.close()
    except BaseException:
        writers.abort()
        raise
    for directory, schedule, table in zip(directories, schedules, tables):
        _copy_side_files(merge, directory, dtype)
        if merge.plain(schedule):
            write_model_card(directory, *merge.sources, alpha=schedule.alpha, scores=scores)
            write_marker(directory, *merge.sources, alpha=schedule.alpha)
            continue
        record = _record(merge, schedule, table)
        (directory / MERGE_CONFIG).write_text(json.dumps(record, indent=2) + "\n")
        write_model_card(directory, *merge.sources, alpha=schedule.mean, scores=scores, record=record)
        write_marker(
            directory, *merge.sources, alpha=schedule.mean, method=record["method"], schedule=record["schedule"]
        )


def _schedule(alpha: float | AlphaSchedule) -> AlphaSchedule:
    return alpha if isinstance(alpha, AlphaSchedule) else AlphaSchedule(alpha=alpha)


def _protected(pretrained: Source, finetuned: list[Source], options: MergeOptions) -> list[Source]:
    """Every input a merge must never write over or into: models, adapters, method input files."""
    return [pretrained, *finetuned, *options.method_inputs.values()]


def merge(
    pretrained: Source,
    finetuned: Source | Sequence[Source],
    alpha: float | AlphaSchedule,
    output_dir: Source,
    options: MergeOptions | None = None,
    *,
    push_to_hub: str | None = None,
    private: bool = False,
    scores: str | None = None,
    hub_api: Any = None,
) -> Path:
    """Writes a merge to `output_dir` and optionally pushes it to the Hub.

    Everything that can be checked without writing is checked first, raising a `MergeError`; the
    output is written under a temporary name and renamed at the end, so a failure leaves nothing
    behind.

    Args:
        pretrained: the pre-trained model: a directory or a Hub id.
        finetuned: the fine-tuned model or LoRA adapter, or several fine-tunes of `pretrained`.
        alpha: one alpha for every tensor (0: pre-trained, 1: fine-tuned), or an `AlphaSchedule`
            (per group of blocks, per name rule, linear layers only).
        output_dir: the directory to write; never an input, nor inside or around one.
        options: the method, its parameters and inputs, weights, dtype, shard size, overwrite...
        push_to_hub: a Hub repository id to upload the merge to (checked before merging).
        private: create that repository private.
        scores: a Markdown table (e.g. the speciality/generality report's) for the model card.
        hub_api: an `HfApi`-like object (default: `huggingface_hub.HfApi()`, whose token comes
            from `HF_TOKEN` or the login).

    Returns:
        `output_dir`. Besides the weights and side files it holds the model card `README.md`,
        `specgen_merge.json` and, unless the merge is plain WiSE-FT (linear, one fine-tuned model,
        one alpha), `merge_config.json` with every tensor's alpha.
    """
    options = options or MergeOptions()
    finetuned = _finetuned_list(finetuned)
    schedule = _schedule(alpha)
    schedule.check(options.extrapolate)
    options.bound(len(finetuned))
    check_shard_size(options.max_shard_size)
    if push_to_hub is not None:
        check_repo_id(push_to_hub, "push_to_hub (--push-to-hub)")
    output_dir = Path(output_dir)
    check_output_dir(output_dir, _protected(pretrained, finetuned, options), options.overwrite)
    planned = _prepare(pretrained, finetuned, options)
    planned.alphas(schedule)  # a schedule that does not fit the tensors is refused before writing
    with atomic_directory(output_dir, what="the merge", error=MergeWriteError) as temporary:
        _write(
            planned, [schedule], [temporary], dtype=options.dtype, max_shard_size=options.max_shard_size, scores=scores
        )
    if push_to_hub is not None:
        what = "WiSE-FT merge," if planned.plain(schedule) else f"{options.method} merge, mean"
        push_folder(output_dir, push_to_hub, private=private, api=hub_api, message=f"{what} alpha={schedule.mean:g}")
    return output_dir


def alpha_dirname(alpha: float) -> str:
    """The name of a sweep's directory for `alpha`, e.g. `alpha-0.5`.

    Args:
        alpha: the alpha (a mean alpha for a group shape).

    Returns:
        `alpha-<alpha>`, the alpha in its shortest form (`:g`).
    """
    return f"alpha-{alpha:g}"


def _sweep_schedules(
    alphas: Sequence[float], shape: AlphaSchedule | None, extrapolate: bool
) -> tuple[list[float], list[AlphaSchedule]]:
    """The alphas as given (they name the outputs) and the schedule at each: a group shape scaled to a mean
    holds that mean up to rounding."""
    if not alphas:
        raise MergeError("no alpha given")
    values = [check_alpha(a, extrapolate) for a in alphas]
    if len(set(values)) != len(values):
        raise MergeError(f"alphas repeat: {list(alphas)}")
    names = [alpha_dirname(a) for a in values]
    if len(set(names)) != len(names):  # alphas equal to 6 significant digits would share a directory
        raise MergeError(f"alphas {values} give the same output directory names: {names}")
    shape = shape or AlphaSchedule(alpha=0.0)
    schedules = [shape.at_mean(a) for a in values]
    for mean, schedule in zip(values, schedules):
        try:
            schedule.check(extrapolate)
        except MergeError as error:
            if shape.group_alphas is None:
                raise
            scaled = ", ".join(f"{a:g}" for a in schedule.group_alphas)
            raise MergeError(f"the group shape scaled to mean alpha {mean:g} is {scaled}: {error}") from None
    return values, schedules


def merge_sweep(
    pretrained: Source,
    finetuned: Source | Sequence[Source],
    alphas: Sequence[float],
    output_dir: Source,
    options: MergeOptions | None = None,
    *,
    shape: AlphaSchedule | None = None,
) -> dict[float, Path]:
    """Writes one merge per (mean) alpha to `output_dir/alpha-<alpha>/`, reading each input tensor once.

    Args:
        pretrained: as in `merge`.
        finetuned: as in `merge`.
        alphas: the alphas, distinct; with a `shape` that has group alphas, their means.
        output_dir: the sweep's root; `options.overwrite` applies to it as in `merge`.
        options: as in `merge`.
        shape: the schedule every alpha is applied to (`AlphaSchedule.at_mean`): group alphas
            scaled to each mean (their ratios kept), or rules and linear-only with each alpha as
            the default. None: one alpha for every tensor.

    Returns:
        Each alpha's output directory.
    """
    options = options or MergeOptions()
    finetuned = _finetuned_list(finetuned)
    means, schedules = _sweep_schedules(alphas, shape, options.extrapolate)
    options.bound(len(finetuned))
    check_shard_size(options.max_shard_size)
    output_dir = Path(output_dir)
    check_output_dir(output_dir, _protected(pretrained, finetuned, options), options.overwrite)
    planned = _prepare(pretrained, finetuned, options)
    for schedule in schedules:
        planned.alphas(schedule)
    with atomic_directory(output_dir, what="the merge", error=MergeWriteError) as temporary:
        directories = [temporary / alpha_dirname(a) for a in means]
        for d in directories:
            d.mkdir()
        _write(planned, schedules, directories, dtype=options.dtype, max_shard_size=options.max_shard_size)
        details: dict[str, Any] = {"alphas": means}
        if not all(planned.plain(s) for s in schedules):  # the swept alpha: None in the shape
            swept = replace(shape, alpha=None) if shape is not None and shape.group_alphas is None else shape
            details.update(method=options.method, shape=swept.describe() if swept is not None else None)
        write_marker(temporary, *planned.sources, **details)
    return {a: output_dir / alpha_dirname(a) for a in means}


def iter_merge(
    pretrained: Source,
    finetuned: Source | Sequence[Source],
    alphas: Sequence[float | AlphaSchedule],
    options: MergeOptions | None = None,
) -> Iterator[tuple[float | AlphaSchedule, dict[str, torch.Tensor]]]:
    """Yields `(alpha, state_dict)` for each alpha or schedule, in memory, for evaluation without writing.

    One merged state dict at a time: load it with `model.load_state_dict(state_dict, strict=False)`
    (tied weights appear once) into a model built from the fine-tuned (or base) directory. Each
    state dict reads the inputs again (a sweep on disk reads them once).

    Args:
        pretrained: as in `merge`.
        finetuned: as in `merge`.
        alphas: alphas or `AlphaSchedule`s.
        options: as in `merge` (`keep_adapter` is ignored: full models only).

    Yields:
        `(alpha, state_dict)`: the alpha or schedule as given and the merged tensors by name.
    """
    options = options or MergeOptions()
    finetuned = _finetuned_list(finetuned)
    schedules = [_schedule(a) for a in alphas]
    if not schedules:
        raise MergeError("no alpha given")
    for schedule in schedules:
        schedule.check(options.extrapolate)
    planned = _prepare(pretrained, finetuned, replace(options, keep_adapter=False))
    tables = [planned.alphas(s) for s in schedules]
    for given, table in zip(alphas, tables):
        state = {
            t.key: materialize(next(t.compute([table[t.schedule_name]], planned.method, chunked=True)))
            for t in planned.plan.tensors
        }
        yield given, state
