"""How a merge is made and written, besides its inputs and alphas: one object for every entry point."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..dtypes import DTYPES, torch_dtype
from .errors import MergeError
from .methods import BoundMethod, bind, get_method
from .output import Overwrite


if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class MergeOptions:
    """The options of `merge`, `merge_sweep`, `iter_merge` (and of `wise_ft` and `wise_ft_sweep`).

    Attributes:
        method: a registered merge method ("linear", "task_arithmetic", "fisher", ...).
        weights: one per fine-tuned model (soups, task arithmetic); default 1 each.
        method_params: the method's scalar parameters by name (e.g. `{"epsilon": 1e-6}` for fisher).
        method_inputs: the files of the method's per-tensor inputs by name (e.g. `{"fisher_pre":
            "pre.safetensors", "fisher_finetuned": "ft.safetensors"}`).
        dtype: "float32", "bfloat16" or "float16"; default: the fine-tuned model's.
        max_shard_size: the largest output shard, e.g. "5GB", "500MB" or a number of bytes.
        overwrite: False: refuse an existing output; True: replace it if a previous merge wrote it
            (it holds `specgen_merge.json`) or it is empty; "any": replace whatever it is.
        extrapolate: allow alphas outside [0, 1].
        keep_adapter: with a LoRA adapter, write an adapter whose effect is scaled per module by
            its alpha instead of the full model.
    """

    method: str = "linear"
    weights: Sequence[float] | None = None
    method_params: Mapping[str, float] = field(default_factory=dict)
    method_inputs: Mapping[str, str | os.PathLike] = field(default_factory=dict)
    dtype: str | None = None
    max_shard_size: str | int = "5GB"
    overwrite: Overwrite = False
    extrapolate: bool = False
    keep_adapter: bool = False

    def bound(self, n_finetuned: int) -> BoundMethod:
        """The method with its parameters and weights checked (a `MergeError` otherwise), and its
        inputs: every one it declares given, none it does not."""
        bound = bind(self.method, n_finetuned, self.weights, self.method_params, self.extrapolate)
        declared = get_method(self.method).inputs
        unknown = sorted(set(self.method_inputs) - set(declared))
        if unknown:
            raise MergeError(
                f"method {self.method!r} takes no input {unknown[0]!r} (its inputs: {', '.join(declared) or 'none'})"
            )
        missing = [f"{name} (--{name.replace('_', '-')})" for name in declared if name not in self.method_inputs]
        if missing:
            raise MergeError(f"method {self.method!r} needs {', '.join(missing)}")
        return bound

    @property
    def torch_dtype(self) -> torch.dtype | None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise MergeError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        return torch_dtype(self.dtype) if self.dtype else None


# Units of a size as transformers' `max_shard_size` reads them: decimal (KB, MB, GB, TB) and binary (KiB ... TiB);
# a lower-case final "b" (e.g. "5Gb") counts bits, as transformers' `convert_file_size_to_int` does.
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
_SIZE = re.compile(r"\s*(\d+)\s*([KMGT]I?B|B)?\s*", re.IGNORECASE)


def check_shard_size(max_shard_size: str | int) -> int:
    """The shard size in bytes, read as transformers' `save_pretrained` reads it, without importing transformers.

    Args:
        max_shard_size: bytes as an int (or a string of digits), or digits and a unit: "5GB", "500MB",
            "2GiB" (decimal KB/MB/GB/TB, binary KiB/MiB/GiB/TiB; "5Gb" is gigabits).

    Returns:
        The size in bytes; a `MergeError` for anything else, or a size that is not positive.
    """
    problem = MergeError(
        "max_shard_size (--max-shard-size) must be a positive whole number of bytes, or a whole number and a unit "
        f"(KB, MB, GB, TB, KiB, MiB, GiB, TiB) such as 5GB or 500MB, got {max_shard_size!r}"
    )
    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, (str, int)):
        raise problem
    if isinstance(max_shard_size, int):
        limit = max_shard_size
    else:
        match = _SIZE.fullmatch(max_shard_size)
        if match is None:
            raise problem
        digits, unit = match.groups()
        limit = int(digits) * _SIZE_UNITS[(unit or "").upper()]
        if unit and len(unit) == 2 and unit.endswith("b"):  # "Mb", "Gb": bits
            limit //= 8
    if limit <= 0:
        raise problem
    return limit
