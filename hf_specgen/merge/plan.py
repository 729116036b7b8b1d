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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
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

    def compute(self, alphas: Sequence[float]) -> list[torch.Tensor]:
        base = self.base()
        other = self.finetuned() if self.finetuned is not None else None
        if not torch.is_floating_point(base):
            if other is not None and not torch.equal(base, other):
                raise MergeError(f"{self.key}: integer/bool tensors differ between the two models; cannot interpolate")
            return [base for _ in alphas]
        dtype = self.dtype or (other.dtype if other is not None else base.dtype)
        return [self._check_finite(self._at(alpha, base, other), dtype) for alpha in alphas]

    def _at(self, alpha: float, base: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
        if self.delta is not None:
            return base if alpha == 0 else base.float() + alpha * self.delta()
        if other is None or (alpha == 0 and self.new_rows_from is None):
            return base  # bit-exact copies at the ends
        if alpha == 1:
            return other
        rows = self.new_rows_from or base.shape[0]
        mixed = torch.lerp(base.float(), other[:rows].float(), alpha)
        return torch.cat([mixed, other[rows:].float()]) if self.new_rows_from is not None else mixed

    def _check_finite(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        tensor = tensor.to(dtype)
        if not torch.isfinite(tensor).all():
            raise MergeError(f"{self.key}: the merged tensor has NaN or inf values")
        return tensor


def tied_groups(directory: Any) -> list[list[str]]:
    """Groups of parameter names that share one tensor in the model of `directory` (e.g. tied
    input and output embeddings), read off the architecture built on the meta device."""
    import transformers
    from accelerate.utils import find_tied_parameters

    try:
        config = transformers.AutoConfig.from_pretrained(directory)
        model_class = getattr(transformers, (config.architectures or [""])[0], None)
        if model_class is None:
            return []
        with torch.device("meta"):
            model = model_class._from_config(config)
    except Exception:  # noqa: BLE001 - a model transformers cannot build has no known ties
        return []
    return find_tied_parameters(model)


class _Source:
    """A checkpoint's tensors, where a key missing from the file can be read through its tied partner."""

    def __init__(self, checkpoint: Checkpoint, groups: list[list[str]], role: str) -> None:
        self.checkpoint, self.role = checkpoint, role
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
    for field in ("model_type", "architectures"):
        if pretrained.get(field) != finetuned.get(field):
            raise MergeError(
                f"mismatched architectures: pretrained has {field}={pretrained.get(field)!r}, "
                f"finetuned has {field}={finetuned.get(field)!r}"
            )


def _vocab_size(config: dict | None) -> int | None:
    if config is None:
        return None
    return config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))


def plan_merge(pretrained: Checkpoint, finetuned: Checkpoint, dtype: torch.dtype | None = None) -> list[MergedTensor]:
    """The merge of two full checkpoints, key by key in the fine-tuned checkpoint's order."""
    _check_same_architecture(pretrained.config, finetuned.config)
    pre = _Source(pretrained, tied_groups(pretrained.directory), "pretrained")
    ft = _Source(finetuned, tied_groups(finetuned.directory), "finetuned")
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
    plan = []
    for key in finetuned.keys():
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
    return plan


def plan_lora_merge(base: Checkpoint, adapter: LoraAdapter, dtype: torch.dtype | None = None) -> list[MergedTensor]:
    """The full model `W0 + alpha * scale * B @ A` for each adapted weight; the adapter's full
    tensors (`modules_to_save`, trained biases) interpolated from the base's; the rest copied."""
    source = _Source(base, tied_groups(base.directory), "pretrained")
    unknown = [k for k in [*adapter.deltas, *adapter.full] if source.locate(k) is None and k not in adapter.base]
    if unknown:
        raise MergeError(f"the adapter changes weights the base model does not have: {', '.join(unknown[:8])}")
    keys = list(dict.fromkeys([*base.keys(), *adapter.base]))
    plan = []
    for key in keys:
        base_loader = (
            (lambda k=adapter.base[key]: adapter.checkpoint.get(k)) if key in adapter.base else source.loader(key)
        )
        shape = adapter.checkpoint.shape(adapter.base[key]) if key in adapter.base else base.shape(key)
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
            plan.append(MergedTensor(key, base_loader, dtype=dtype if base.dtype(key).is_floating_point else None))
    return plan


def plan_adapter_scaling(base: Checkpoint, adapter: LoraAdapter, dtype: torch.dtype | None = None) -> list[MergedTensor]:
    """An adapter whose effect is `alpha * scale * B @ A`: B scaled by alpha, A kept; full tensors
    (`modules_to_save`, biases) interpolated from the base's; saved base weights kept."""
    source = _Source(base, tied_groups(base.directory), "pretrained")
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
    return plan
