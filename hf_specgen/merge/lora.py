"""A peft LoRA adapter directory, read as weight deltas on its base model's tensors."""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint, read_json
from .errors import MergeError, MergeWarning


ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
_FACTORS = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "A", ".lora_embedding_B": "B"}


def is_lora_adapter(directory: Path) -> bool:
    return (directory / ADAPTER_CONFIG).is_file()


@dataclass
class LowRankDelta:
    """`scale * B @ A` of one adapted weight, in that weight's layout when `transposed` is applied."""

    a_key: str
    b_key: str
    scale: float
    transposed: bool


class LoraAdapter:
    """The adapter's tensors keyed by the base model's weight names.

    * `deltas[key]`: a low-rank delta on the base weight `key`;
    * `full[key]`: a full tensor the adapter trained (`modules_to_save` copies, trained biases);
    * `base[key]`: a base weight the adapter saved itself (resized embeddings), which replaces
      the base checkpoint's.
    """

    def __init__(self, directory: Path, conv1d_modules: set[str] | None = None) -> None:
        """`conv1d_modules`: the base model's GPT-2 style `Conv1D` layers, whose deltas are
        transposed; None to trust the adapter config's `fan_in_fan_out` for every layer."""
        self.directory = directory
        self.conv1d_modules = conv1d_modules
        self.config = read_json(directory / ADAPTER_CONFIG)
        if not isinstance(self.config, dict):
            raise MergeError(f"{directory / ADAPTER_CONFIG}: not an adapter config (a JSON object)")
        self._check_supported()
        self.checkpoint = Checkpoint(directory, weights_name="adapter_model")
        factors: dict[str, dict[str, str]] = {}
        self.full: dict[str, str] = {}
        self.base: dict[str, str] = {}
        for key in self.checkpoint.keys():
            name = key.removeprefix(_PREFIX)
            suffix = next((s for s in _FACTORS if name.endswith(s)), None)
            if suffix is not None:
                factors.setdefault(name[: -len(suffix)], {})[_FACTORS[suffix]] = key
            elif ".base_layer." in name and not name.endswith(".bias"):
                self.base[name.replace(".base_layer.", ".")] = key
            elif ".base_layer." in name:  # bias="lora_only"/"all": a trained bias, interpolated like the others
                self.full[name.replace(".base_layer.", ".")] = key
            else:
                self.full[name] = key
        self.deltas = {f"{module}.weight": self._low_rank(module, pair) for module, pair in factors.items()}

    def _check_supported(self) -> None:
        config = self.config
        if config.get("peft_type") != "LORA":
            raise MergeError(f"{self.directory}: only LoRA adapters can be merged, not {config.get('peft_type')}")
        if config.get("use_dora"):
            raise MergeError(
                f"{self.directory}: DoRA adapters cannot be interpolated exactly (their weight change is not "
                "scale * B @ A); merge them with peft first"
            )
        if config.get("lora_bias"):
            raise MergeError(f"{self.directory}: LoRA adapters with lora_bias=True are not supported")

    def _low_rank(self, module: str, pair: dict[str, str]) -> LowRankDelta:
        from peft.utils.other import get_pattern_key  # peft takes seconds to import: only for adapters

        if set(pair) != {"A", "B"}:
            raise MergeError(f"{self.directory}: {module} has lora_{''.join(pair)} but not both LoRA factors")
        config = self.config
        rank_key = get_pattern_key(list(config.get("rank_pattern") or {}), module)
        alpha_key = get_pattern_key(list(config.get("alpha_pattern") or {}), module)
        r = (config.get("rank_pattern") or {}).get(rank_key, config["r"])
        alpha = (config.get("alpha_pattern") or {}).get(alpha_key, config["lora_alpha"])
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        embedding = pair["A"].endswith("lora_embedding_A")
        conv1d = bool(config.get("fan_in_fan_out")) if self.conv1d_modules is None else module in self.conv1d_modules
        return LowRankDelta(pair["A"], pair["B"], scale, embedding or conv1d)

    def delta(self, key: str) -> torch.Tensor:
        """`scale * B @ A` for base weight `key`, in float32 and in the base weight's layout."""
        d = self.deltas[key]
        product = d.scale * (self.checkpoint.get(d.b_key).float() @ self.checkpoint.get(d.a_key).float())
        return product.T if d.transposed else product


def warn_if_other_base(
    adapter: LoraAdapter, pretrained: str | os.PathLike, base_config: dict[str, Any] | None
) -> None:
    """Warns (`MergeWarning`) when the adapter says it was trained on another model than `pretrained`.

    The adapter config's `base_model_name_or_path` is compared with `pretrained` as given and with
    the base config's `_name_or_path`: the same string, the same last path component (a Hub id
    and a local copy of it) or the same directory all count as the same model. Shapes that did
    not fit would have been an error already; this catches a model of the same architecture.
    """
    expected = adapter.config.get("base_model_name_or_path")
    if not isinstance(expected, str) or not expected:
        return
    names = [str(pretrained), (base_config or {}).get("_name_or_path")]
    if any(_same_model(expected, name) for name in names if isinstance(name, str) and name):
        return
    warnings.warn(
        f"{adapter.directory}: the adapter was trained on {expected!r} (its base_model_name_or_path), and is merged "
        f"onto {str(pretrained)!r}; the shapes fit, but check that this is its base model",
        MergeWarning,
        stacklevel=4,  # the caller of wise_ft / wise_ft_sweep
    )


def _same_model(a: str, b: str) -> bool:
    if a == b or Path(a.rstrip("/")).name == Path(b.rstrip("/")).name:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # not both local paths
        return False
