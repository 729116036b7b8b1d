"""What each output tensor of a WiSE-FT merge is, decided and checked before anything is written.

A merge is a list of `MergedTensor`s, each computing its output for every alpha from tensors it
reads lazily; `plan_merge` builds that list for two checkpoints, or for a base model and a LoRA
adapter, and raises a `MergeError` on anything that does not fit (missing keys, shapes, dtypes,
architectures) while nothing has been read or written yet.

The interpolation is `theta = (1 - alpha) * theta_pre + alpha * theta_ft`: alpha = 0 is the
pre-trained model, alpha = 1 the fine-tuned one (the WiSE-FT paper's own script has the reverse
convention). Floating tensors are interpolated in float32; integer and bool tensors must be equal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .checkpoint import Checkpoint
from .errors import MergeError
from .lora import LoraAdapter

Loader = Callable[[], torch.Tensor]


@dataclass
class MergedTensor:
    """One output tensor: `base` interpolated toward `finetuned`, or `base + alpha * delta` (LoRA)."""

    key: str
    base: Loader
    finetuned: Loader | None = None
    delta: Loader | None = None
    dtype: torch.dtype | None = None  # output dtype of floating tensors; None: the fine-tuned tensor's
    new_rows_from: int | None = None  # vocabulary growth: rows from here on come from the fine-tuned model

    def compute(self, alphas: Sequence[float]) -> Iterator[torch.Tensor]:
        """The output at each alpha in turn: inputs read once, one output alive at a time."""
        base = self.base()
        other = self.finetuned() if self.finetuned is not None else None
        if not torch.is_floating_point(base):
            if other is not None and not torch.equal(base, other):
                raise MergeError(f"{self.key}: integer/bool tensors differ between the two models; cannot interpolate")
            yield from (base for _ in alphas)
            return
        dtype = self.dtype or (other.dtype if other is not None else base.dtype)
        delta = self.delta() if self.delta is not None else None  # once for every alpha: a sweep reads A and B once
        for alpha in alphas:
            yield self._check_finite(self._at(alpha, base, other, delta), dtype, alpha)

    def _at(self, alpha: float, base: torch.Tensor, other: torch.Tensor | None, delta: torch.Tensor | None) -> torch.Tensor:
        if delta is not None:
            return base if alpha == 0 else base.float() + alpha * delta
        if other is None or (alpha == 0 and self.new_rows_from is None):
            return base  # bit-exact copies at the ends
        if alpha == 1:
            return other
        if self.new_rows_from is None:  # also 0-dim tensors (CLIP's logit_scale), which have no rows
            return torch.lerp(base.float(), other.float(), alpha)
        rows = self.new_rows_from
        mixed = torch.lerp(base.float(), other[:rows].float(), alpha)
        return torch.cat([mixed, other[rows:].float()])

    def _inputs_finite(self) -> bool:
        """Whether the tensors this one is made of are finite (read again: only on the way to an error)."""
        loaders = [f for f in (self.base, self.finetuned, self.delta) if f is not None]
        return all(bool(torch.isfinite(t).all()) for t in (load() for load in loaders) if torch.is_floating_point(t))

    def _check_finite(self, tensor: torch.Tensor, dtype: torch.dtype, alpha: float) -> torch.Tensor:
        tensor = tensor.to(dtype)
        # min and max in one pass, no full-size temporary: NaN propagates into them, inf is one of them
        if tensor.numel() and not torch.isfinite(torch.stack(tensor.aminmax())).all():
            where = "the inputs hold NaN or inf" if not self._inputs_finite() else f"{dtype} overflows"
            raise MergeError(f"{self.key}: the merged tensor at alpha={alpha:g} has NaN or inf values ({where})")
        return tensor


def meta_model(directory: Any) -> torch.nn.Module | None:
    """The architecture of the model in `directory`, built on the meta device (no memory), or None
    where transformers cannot build it."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(directory)
        model_class = getattr(transformers, (config.architectures or [""])[0], None)
        if model_class is None:
            return None
        with torch.device("meta"):
            return model_class._from_config(config)
    except Exception:  # noqa: BLE001 - a model transformers cannot build has no known structure
        return None


def tied_groups(model: torch.nn.Module | None) -> list[list[str]]:
    """Groups of parameter names that share one tensor (e.g. tied input and output embeddings)."""
    from accelerate.utils import find_tied_parameters

    return find_tied_parameters(model) if model is not None else []


def conv1d_modules(model: torch.nn.Module | None) -> set[str] | None:
    """Names of GPT-2 style `Conv1D` modules, whose weights are stored (in, out): LoRA's `fan_in_fan_out`."""
    from transformers.pytorch_utils import Conv1D

    return {name for name, m in model.named_modules() if isinstance(m, Conv1D)} if model is not None else None


class _Source:
    """A checkpoint's tensors, where a key missing from the file can be read through its tied partner."""

    def __init__(self, checkpoint: Checkpoint, groups: list[list[str]]) -> None:
        self.checkpoint = checkpoint
        self.alias = {k: g for g in groups for k in g}

    def locate(self, key: str) -> str | None:
        if key in self.checkpoint:
            return key
        return next((k for k in self.alias.get(key, []) if k in self.checkpoint), None)

    def loader(self, key: str) -> Loader:
        return lambda: self.checkpoint.get(key)


def _check_same_architecture(pretrained: dict | None, finetuned: dict | None) -> None:
    if pretrained is None or finetuned is None:
        return
    for name in ("model_type", "architectures"):
        if pretrained.get(name) != finetuned.get(name):
            raise MergeError(
                f"mismatched architectures: pretrained has {name}={pretrained.get(name)!r}, "
                f"finetuned has {name}={finetuned.get(name)!r}"
            )


def _vocab_size(config: dict | None) -> int | None:
    if config is None:
        return None
    return config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))


@dataclass
class MergePlan:
    """The output tensors, and what the copied config must say differently (e.g. untied weights)."""

    tensors: list[MergedTensor]
    config_updates: dict[str, Any] = field(default_factory=dict)


def plan_merge(pretrained: Checkpoint, finetuned: Checkpoint, dtype: torch.dtype | None = None) -> MergePlan:
    """The merge of two full checkpoints, key by key in the fine-tuned checkpoint's order."""
    _check_same_architecture(pretrained.config, finetuned.config)
    pre = _Source(pretrained, tied_groups(meta_model(pretrained.directory)))
    ft = _Source(finetuned, tied_groups(meta_model(finetuned.directory)))
    missing_pre = [k for k in finetuned.keys() if pre.locate(k) is None]
    missing_ft = [k for k in pretrained.keys() if ft.locate(k) is None]
    if missing_pre or missing_ft:
        raise MergeError(
            "the checkpoints do not have the same tensors: "
            + "; ".join(
                f"missing in {role}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                for role, keys in (("pretrained", missing_pre), ("finetuned", missing_ft))
                if keys
            )
        )
    pre_vocab, ft_vocab = _vocab_size(pretrained.config), _vocab_size(finetuned.config)
    plan, planned = [], set()
    for key in finetuned.keys():
        if any(k in planned for k in ft.alias.get(key, [])):
            continue  # a tied weight stored twice (a torch.save'd state dict): written once, as save_pretrained does
        planned.add(key)
        pre_key = pre.locate(key)
        pre_shape, ft_shape = pretrained.shape(pre_key), finetuned.shape(key)
        pre_float, ft_float = pretrained.dtype(pre_key).is_floating_point, finetuned.dtype(key).is_floating_point
        if pre_float != ft_float:
            raise MergeError(f"{key}: floating in one model, integer/bool in the other")
        new_rows_from = None
        if pre_shape != ft_shape:
            grown = (
                pre_vocab is not None
                and ft_vocab is not None
                and pre_shape[0] == pre_vocab < ft_shape[0] == ft_vocab
                and pre_shape[1:] == ft_shape[1:]
            )
            if not grown:
                raise MergeError(f"{key}: shape {pre_shape} in pretrained, {ft_shape} in finetuned")
            new_rows_from = pre_vocab  # added tokens: their rows come from the fine-tuned model
        plan.append(
            MergedTensor(key, pre.loader(pre_key), ft.loader(key), dtype=dtype if ft_float else None,
                         new_rows_from=new_rows_from)
        )  # fmt: skip
    return MergePlan(plan)


def plan_lora_merge(
    base: Checkpoint, adapter: LoraAdapter, tied: list[list[str]], dtype: torch.dtype | None = None
) -> MergePlan:
    """The full model `W0 + alpha * scale * B @ A` for each adapted weight; the adapter's full
    tensors (`modules_to_save`, trained biases) interpolated from the base's; the rest copied.

    A weight tied to one the adapter changes (e.g. an adapted `lm_head` tied to the input
    embeddings) no longer equals it: every member of such a group is written, and the config
    says `tie_word_embeddings: false`.
    """
    source = _Source(base, tied)
    changed = [*adapter.deltas, *adapter.full]
    unknown = [k for k in changed if source.locate(k) is None and k not in adapter.base]
    if unknown:
        raise MergeError(f"the adapter changes weights the base model does not have: {', '.join(unknown[:8])}")
    untied = [g for g in tied if any(k in changed for k in g)]
    keys = list(dict.fromkeys([*base.keys(), *adapter.base, *(k for g in untied for k in g)]))
    plan = []
    for key in keys:
        stored = source.locate(key)
        if key in adapter.base:
            base_loader: Loader = lambda k=adapter.base[key]: adapter.checkpoint.get(k)  # noqa: E731
            shape = adapter.checkpoint.shape(adapter.base[key])
        else:
            base_loader, shape = source.loader(stored), base.shape(stored)
        if key in adapter.deltas:
            d = adapter.deltas[key]
            rows, cols = adapter.checkpoint.shape(d.b_key)[0], adapter.checkpoint.shape(d.a_key)[1]
            if ((cols, rows) if d.transposed else (rows, cols)) != shape:
                raise MergeError(f"{key}: the LoRA delta is {rows}x{cols}, the base weight {shape}")
            plan.append(MergedTensor(key, base_loader, delta=lambda k=key: adapter.delta(k), dtype=dtype))
        elif key in adapter.full:
            if adapter.checkpoint.shape(adapter.full[key]) != shape:
                raise MergeError(f"{key}: shape {adapter.checkpoint.shape(adapter.full[key])} in the adapter, {shape} in the base")
            trained = lambda k=adapter.full[key]: adapter.checkpoint.get(k)  # noqa: E731
            plan.append(MergedTensor(key, base_loader, trained, dtype=dtype))
        else:
            plan.append(MergedTensor(key, base_loader, dtype=dtype if base.dtype(stored).is_floating_point else None))
    return MergePlan(plan, {"tie_word_embeddings": False} if untied else {})


def plan_adapter_scaling(
    base: Checkpoint, adapter: LoraAdapter, tied: list[list[str]], dtype: torch.dtype | None = None
) -> MergePlan:
    """An adapter whose effect is `alpha * scale * B @ A`: B scaled by alpha, A kept; full tensors
    (`modules_to_save`, biases) interpolated from the base's; saved base weights kept."""
    source = _Source(base, tied)
    full = {key: base_key for base_key, key in adapter.full.items()}
    scaled = {d.b_key for d in adapter.deltas.values()}
    plan = []
    for key in adapter.checkpoint.keys():
        trained = (lambda k=key: adapter.checkpoint.get(k))
        if key in scaled:
            zeros = lambda k=key: torch.zeros(adapter.checkpoint.shape(k), dtype=adapter.checkpoint.dtype(k))  # noqa: E731
            plan.append(MergedTensor(key, zeros, trained, dtype=dtype))
        elif key in full:
            base_key = source.locate(full[key])
            if base_key is None:
                raise MergeError(f"the adapter trains {full[key]}, which the base model does not have")
            plan.append(MergedTensor(key, source.loader(base_key), trained, dtype=dtype))
        else:
            plan.append(MergedTensor(key, trained, dtype=dtype))
    return MergePlan(plan)
