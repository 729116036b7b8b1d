"""What each output tensor of a merge is, decided and checked before anything is written.

A merge is a list of `MergedTensor`s: each says which tensors its output is made of (read lazily:
the pre-trained tensor, the fine-tuned one or ones, a LoRA delta, per-tensor method inputs such as
Fisher diagonals), its output dtype, the name the alpha schedule knows it by and how its
vocabulary grew; `compute` hands those tensors to a merge method (`methods`) once per alpha.
`plan_merge` builds that list for full checkpoints (one fine-tuned model, or several fine-tunes of
one base), `plan_lora_merge` and `plan_adapter_scaling` for a base model and a LoRA adapter, and
each raises a `MergeError` on anything that does not fit (missing keys, shapes, dtypes,
architectures) while nothing has been read or written yet. The plan is the same whatever the
method: names, shapes, dtypes, tied weights (written once) and vocabulary growth (rows beyond the
pre-trained vocabulary come from the fine-tuned model, or the weighted mean of several).

Floating tensors are merged by the method (in float32) and cast to the output dtype; integer and
bool tensors must be equal in every model and are copied.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .checkpoint import Checkpoint
from .chunked import ChunkedTensor
from .errors import MergeError
from .lora import LoraAdapter
from .methods import BoundMethod, weighted_average


Loader = Callable[[], torch.Tensor]


class TensorSource(Protocol):
    """Tensors by name, read lazily: a `Checkpoint`, or a file of per-tensor method inputs."""

    def keys(self) -> list[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def dtype(self, key: str) -> torch.dtype: ...
    def get(self, key: str) -> torch.Tensor: ...


@dataclass
class MergedTensor:
    """One output tensor and what it is made of (see the module's docstring)."""

    key: str
    base: Loader
    finetuned: tuple[Loader, ...] = ()
    delta: Loader | None = None  # a LoRA adapter's `scale * B @ A` on `base`
    dtype: torch.dtype | None = None  # output dtype of floating tensors; None: the fine-tuned tensor's
    new_rows_from: int | None = None  # vocabulary growth: rows from here on come from the fine-tuned model(s)
    inputs: dict[str, Loader] = field(default_factory=dict)  # the method's per-tensor inputs (e.g. Fisher diagonals)
    name: str | None = None  # what the alpha schedule calls it (an adapter's factor: its base weight); default `key`
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # "pretrained", "finetuned": input shapes
    floating: bool = True  # False: an integer or bool tensor, copied whatever the alpha

    @property
    def schedule_name(self) -> str:
        return self.name or self.key

    def merged(self) -> bool:
        """Whether the output depends on alpha (floating, with a fine-tuned side or a delta)."""
        return self.floating and (bool(self.finetuned) or self.delta is not None)

    def compute(
        self, alphas: Sequence[float], method: BoundMethod, chunked: bool = False
    ) -> Iterator[torch.Tensor | ChunkedTensor]:
        """The output at each of `alphas` in turn: inputs read once, one output alive at a time.

        Args:
            alphas: the alphas.
            method: the merge method.
            chunked: where the method is elementwise and the tensor a plain merge (no LoRA delta,
                no added vocabulary rows), yield `ChunkedTensor`s computed as they are written.

        Yields:
            The output at each alpha: a tensor, or a `ChunkedTensor`.
        """
        base = self.base()
        tuned = [load() for load in self.finetuned]
        if not torch.is_floating_point(base):
            if any(not torch.equal(base, other) for other in tuned):
                raise MergeError(f"{self.key}: integer/bool tensors differ between the models; cannot interpolate")
            yield from (base for _ in alphas)
            return
        dtype = self.dtype or (tuned[0].dtype if tuned else base.dtype)
        delta = self.delta() if self.delta is not None else None  # once for every alpha: a sweep reads A and B once
        inputs = {name: load() for name, load in self.inputs.items()}
        if method.method.non_negative_inputs:
            for name, tensor in inputs.items():
                low, high = tensor.aminmax() if tensor.numel() else (tensor.new_zeros(()), tensor.new_zeros(()))
                if not (bool(torch.isfinite(high)) and bool(low >= 0)):  # NaN fails both comparisons
                    raise MergeError(
                        f"{self.key}: {name} (--{name.replace('_', '-')}) holds negative, NaN or inf values (min "
                        f"{low.item():g}, max {high.item():g}); method {method.method.name!r} needs finite, "
                        "non-negative ones"
                    )
        if chunked and method.method.elementwise and tuned and delta is None and self.new_rows_from is None:
            yield from (self._chunked(method, alpha, base, tuned, inputs, dtype) for alpha in alphas)
            return
        for alpha in alphas:
            yield self._check_finite(self._at(method, alpha, base, tuned, delta, inputs), dtype, alpha)

    def _chunked(
        self,
        method: BoundMethod,
        alpha: float,
        base: torch.Tensor,
        tuned: list[torch.Tensor],
        inputs: dict[str, torch.Tensor],
        dtype: torch.dtype,
    ) -> ChunkedTensor:
        """The output at `alpha`, the method applied to flat slices of the inputs as it is written."""
        flat_base, flat_tuned = base.reshape(-1), [t.reshape(-1) for t in tuned]
        flat_inputs = {name: tensor.reshape(-1) for name, tensor in inputs.items()}

        def piece(start: int, stop: int) -> torch.Tensor:
            sliced = {name: tensor[start:stop] for name, tensor in flat_inputs.items()}
            merged = method(flat_base[start:stop], [t[start:stop] for t in flat_tuned], alpha, sliced)
            return self._check_finite(merged, dtype, alpha)

        return ChunkedTensor(tuple(tuned[0].shape), dtype, piece)

    def _at(
        self,
        method: BoundMethod,
        alpha: float,
        base: torch.Tensor,
        tuned: list[torch.Tensor],
        delta: torch.Tensor | None,
        inputs: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        if delta is not None:
            return method.method.delta(base, delta, alpha)  # planning refuses adapters for methods without one
        if not tuned:
            return base  # copied
        rows = self.new_rows_from
        if rows is None:  # also 0-dim tensors (CLIP's logit_scale), which have no rows
            return method(base, tuned, alpha, inputs)
        mixed = method(base, [t[:rows] for t in tuned], alpha, {k: v[:rows] for k, v in inputs.items()})
        added = weighted_average([t[rows:] for t in tuned], method.weights)
        return torch.cat([mixed, added.to(mixed.dtype)])

    def _inputs_finite(self) -> bool:
        """Whether the tensors this one is made of are finite (read again: only on the way to an error)."""
        loaders = [self.base, *self.finetuned, *self.inputs.values(), *([self.delta] if self.delta else [])]
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

    from .. import compat

    try:
        config = transformers.AutoConfig.from_pretrained(directory)
        model_class = getattr(transformers, (config.architectures or [""])[0], None)
        if model_class is None:
            return None
        with torch.device("meta"):
            return compat.from_config(model_class, config)
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


def linear_weights(model: torch.nn.Module | None) -> set[str] | None:
    """The weights of the linear layers (`nn.Linear`, GPT-2's `Conv1D`), by parameter name; None
    where the architecture is unknown. A tied weight is written once, under the name the checkpoint
    stores it by, and is linear or not by that name: OPT's `lm_head.weight`, tied to and stored as
    `model.decoder.embed_tokens.weight`, is an embedding."""
    from transformers.pytorch_utils import Conv1D

    if model is None:
        return None
    return {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}


class _Source:
    """A checkpoint's tensors, where a key missing from the file can be read through its tied partner.

    The tied groups come from the model's architecture, which costs importing transformers' modeling
    code (seconds): they are looked up only where a checkpoint lacks a key, stores `.bin` weights
    (a `torch.save`d state dict holds both members of a tied group) or a method input names a tensor
    the checkpoints do not store. Two safetensors checkpoints with the same keys never need them.
    """

    def __init__(self, checkpoint: Checkpoint, groups: list[list[str]] | None = None) -> None:
        self.checkpoint = checkpoint
        if groups is not None:
            self.alias = {k: g for g in groups for k in g}

    @functools.cached_property
    def alias(self) -> dict[str, list[str]]:
        """Each member of a tied group: the whole group."""
        groups = tied_groups(meta_model(self.checkpoint.directory))
        return {k: g for g in groups for k in g}

    @property
    def may_store_tied_twice(self) -> bool:
        """Whether both members of a tied group may be stored (`.bin`: a `torch.save`d state dict)."""
        return any(file.suffix != ".safetensors" for file in self.checkpoint.files)

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
    """The output tensors, what the copied config must say differently (e.g. untied weights), and
    the planned key of every name a tensor goes by (tied partners, the pre-trained side's name)."""

    tensors: list[MergedTensor]
    config_updates: dict[str, Any] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    partners: Callable[[], dict[str, str]] | None = None  # the tied partners' names, looked up on first need

    def planned_key(self, name: str) -> str:
        """The key of the output tensor `name` is (or is tied to); `name` itself where none is."""
        if name not in self.aliases and self.partners is not None:
            self.aliases = {**self.partners(), **self.aliases}
            self.partners = None
        return self.aliases.get(name, name)


def _check_same_keys(a: _Source, b: _Source, a_name: str, b_name: str) -> None:
    missing_a = [k for k in b.checkpoint.keys() if a.locate(k) is None]
    missing_b = [k for k in a.checkpoint.keys() if b.locate(k) is None]
    if missing_a or missing_b:
        raise MergeError(
            "the checkpoints do not have the same tensors: "
            + "; ".join(
                f"missing in {role}: {', '.join(keys[:8])}{f' ... ({len(keys)} in all)' if len(keys) > 8 else ''}"
                for role, keys in ((a_name, missing_a), (b_name, missing_b))
                if keys
            )
        )


def plan_merge(
    pretrained: Checkpoint, finetuned: Checkpoint | Sequence[Checkpoint], dtype: torch.dtype | None = None
) -> MergePlan:
    """The merge of full checkpoints, key by key in the (first) fine-tuned checkpoint's order.

    Args:
        pretrained: the pre-trained checkpoint.
        finetuned: the fine-tuned checkpoint, or several fine-tunes of `pretrained` (a soup); all
            of them must have the same tensors and shapes.
        dtype: the output dtype of floating tensors (None: the fine-tuned tensor's).
    """
    tuned = [finetuned] if isinstance(finetuned, Checkpoint) else list(finetuned)
    for checkpoint in tuned:
        _check_same_architecture(pretrained.config, checkpoint.config)
    pre, sources = _Source(pretrained), [_Source(c) for c in tuned]
    ft = sources[0]
    _check_same_keys(pre, ft, "pretrained", "finetuned")
    for other in sources[1:]:
        _check_same_keys(ft, other, f"finetuned {ft.checkpoint.directory}", f"finetuned {other.checkpoint.directory}")
    first = tuned[0]
    pre_vocab, ft_vocab = _vocab_size(pretrained.config), _vocab_size(first.config)
    plan, aliases = [], {}
    for key in first.keys():
        if ft.may_store_tied_twice and any(aliases.get(k) for k in ft.alias.get(key, [])):
            continue  # a tied weight stored twice (a torch.save'd state dict): written once, as save_pretrained does
        pre_key = pre.locate(key)
        aliases.update({key: key, pre_key: key})
        pre_shape, ft_shape = pretrained.shape(pre_key), first.shape(key)
        pre_float, ft_float = pretrained.dtype(pre_key).is_floating_point, first.dtype(key).is_floating_point
        if pre_float != ft_float:
            raise MergeError(f"{key}: floating in one model, integer/bool in the other")
        for other in sources[1:]:
            other_key = other.locate(key)
            if (
                other.checkpoint.shape(other_key) != ft_shape
                or other.checkpoint.dtype(other_key).is_floating_point != ft_float
            ):
                raise MergeError(
                    f"{key}: shape {ft_shape} in {first.directory}, {other.checkpoint.shape(other_key)} in "
                    f"{other.checkpoint.directory} (or floating in one, integer/bool in the other)"
                )
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
        loaders = tuple(s.loader(s.locate(key)) for s in sources)
        plan.append(
            MergedTensor(
                key,
                pre.loader(pre_key),
                loaders,
                dtype=dtype if ft_float else None,
                new_rows_from=new_rows_from,
                shapes={"pretrained": pre_shape, "finetuned": ft_shape},
                floating=ft_float,
            )
        )

    _check_nothing_dropped(pre, aliases)

    def partners() -> dict[str, str]:
        found = {}
        for key, planned in aliases.items():
            for source in (ft, pre):
                found.update({partner: planned for partner in source.alias.get(key, [])})
        return found

    return MergePlan(plan, aliases=aliases, partners=partners)


def _check_nothing_dropped(pre: _Source, used: dict[str, str]) -> None:
    """Refuses a pre-trained tensor that no output reads: one the fine-tuned model ties to another (e.g. an
    untied pre-trained `lm_head.weight` where the fine-tuned model ties it to the input embeddings), which
    the merge would silently replace by its partner. A pre-trained tensor tied itself is not dropped."""
    unread = [key for key in pre.checkpoint.keys() if key not in used]
    dropped = [key for key in unread if not any(partner in used for partner in pre.alias.get(key, []))]
    if dropped:
        raise MergeError(
            f"pretrained stores {', '.join(dropped)}, which the fine-tuned model ties to another weight "
            "(tie_word_embeddings): the merge would drop the pre-trained values; merge models tied alike"
        )


def attach_input(plan: MergePlan, name: str, source: TensorSource, like: str, what: str) -> None:
    """Gives every planned tensor that `source` names its per-tensor method input `name`.

    Args:
        plan: a plan of full checkpoints (`plan_merge`).
        name: the method's input (e.g. "fisher_pre").
        source: the input's tensors, named as the checkpoint's tensors (or a tied partner).
        like: "pretrained" or "finetuned": whose shape each tensor must have.
        what: how to name the source in an error (e.g. its path).

    Raises:
        MergeError: a name the checkpoints do not have, a shape that differs, a tensor that is
            not floating, or a source with no tensors.
    """
    by_key = {tensor.key: tensor for tensor in plan.tensors}
    keys = source.keys()
    if not keys:
        raise MergeError(f"{what}: holds no tensors")
    unknown = [k for k in keys if plan.planned_key(k) not in by_key]
    if unknown:
        raise MergeError(
            f"{what}: names tensors the checkpoints do not have: "
            f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}"
        )
    for key in keys:
        tensor = by_key[plan.planned_key(key)]
        expected = tensor.shapes.get(like)
        if tuple(source.shape(key)) != expected:
            raise MergeError(f"{what}: {key} has shape {tuple(source.shape(key))}, the {like} tensor {expected}")
        if not source.dtype(key).is_floating_point:
            raise MergeError(f"{what}: {key} is {source.dtype(key)}, not a floating tensor")
        tensor.inputs[name] = lambda k=key: source.get(k)


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
                raise MergeError(
                    f"{key}: shape {adapter.checkpoint.shape(adapter.full[key])} in the adapter, {shape} in the base"
                )
            trained = lambda k=adapter.full[key]: adapter.checkpoint.get(k)  # noqa: E731
            plan.append(MergedTensor(key, base_loader, (trained,), dtype=dtype))
        else:
            plan.append(MergedTensor(key, base_loader, dtype=dtype if base.dtype(stored).is_floating_point else None))
    return MergePlan(plan, {"tie_word_embeddings": False} if untied else {})


def plan_adapter_scaling(
    base: Checkpoint, adapter: LoraAdapter, tied: list[list[str]], dtype: torch.dtype | None = None
) -> MergePlan:
    """An adapter whose effect is `alpha * scale * B @ A`, alpha that of the base weight it adapts
    (per module with a heterogeneous schedule): B scaled by alpha, A kept; full tensors
    (`modules_to_save`, biases) interpolated from the base's; saved base weights kept."""
    source = _Source(base, tied)
    full = {key: base_key for base_key, key in adapter.full.items()}
    scaled = {d.b_key: weight for weight, d in adapter.deltas.items()}
    base_names = {
        **{d.a_key: weight for weight, d in adapter.deltas.items()},
        **scaled,
        **full,
        **{key: weight for weight, key in adapter.base.items()},
    }
    plan = []
    for key in adapter.checkpoint.keys():
        trained = functools.partial(adapter.checkpoint.get, key)
        name = base_names.get(key)
        if key in scaled:
            zeros = functools.partial(_zeros_like, adapter.checkpoint, key)
            plan.append(MergedTensor(key, zeros, (trained,), dtype=dtype, name=name))
        elif key in full:
            base_key = source.locate(full[key])
            if base_key is None:
                raise MergeError(f"the adapter trains {full[key]}, which the base model does not have")
            plan.append(MergedTensor(key, source.loader(base_key), (trained,), dtype=dtype, name=name))
        else:
            plan.append(MergedTensor(key, trained, dtype=dtype, name=name))
    return MergePlan(plan)


def _zeros_like(checkpoint: Checkpoint, key: str) -> torch.Tensor:
    """Zeros of the shape and dtype of `checkpoint`'s tensor `key`, without reading it."""
    return torch.zeros(checkpoint.shape(key), dtype=checkpoint.dtype(key))
