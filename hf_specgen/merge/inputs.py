"""Files of per-tensor method inputs (Fisher diagonals), read lazily like a checkpoint, under the
names of the checkpoint's tensors.

An input is a `.safetensors` file, a directory holding `<name>.safetensors` (or its sharded index)
for a name given, or a training run's regularizer state `specgen_regularizers.safetensors`, whose
EWC Fisher (`ewc.fisher.<parameter>`) is taken and its other entries ignored. Parameter names are
mapped onto checkpoint names: a peft model's prefix `base_model.model.` and its `.base_layer.`
and `.modules_to_save.<adapter>.` parts are dropped, so the Fisher a LoRA run estimated for the
base weights it adapts names those weights.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .checkpoint import Checkpoint
from .errors import MergeError


EWC_FISHER = "ewc.fisher."  # a training run's state file: `<regularizer>.<state key>.<parameter name>`
REGULARIZER_STATE = "specgen_regularizers"
_PEFT_PARTS = [
    (re.compile(r"^base_model\.model\."), ""),
    (re.compile(r"\.base_layer\."), "."),
    (re.compile(r"\.modules_to_save\.[^.]+\."), "."),
]


def checkpoint_name(name: str) -> str:
    """A parameter name as the checkpoint names the tensor (peft's wrappers removed)."""
    for pattern, replacement in _PEFT_PARTS:
        name = pattern.sub(replacement, name)
    return name


class TensorFile:
    """The tensors of an input file by checkpoint name, read one at a time.

    Args:
        path: a `.safetensors` file, or a directory with `<names[i]>.safetensors` (or its index)
            for the first of `names` found.
        names: the weights names a directory is searched for.
    """

    def __init__(self, path: str | os.PathLike, names: tuple[str, ...] = ("fisher", REGULARIZER_STATE)) -> None:
        path = Path(path)
        if path.is_file() and path.name.endswith(".safetensors"):
            self.checkpoint = Checkpoint(path.parent, weights_name=path.name.removesuffix(".safetensors"))
        elif path.is_dir():
            found = [
                n
                for n in names
                if (path / f"{n}.safetensors").is_file() or (path / f"{n}.safetensors.index.json").is_file()
            ]
            if not found:
                raise MergeError(f"{path}: no {' or '.join(f'{n}.safetensors' for n in names)} in this directory")
            self.checkpoint = Checkpoint(path, weights_name=found[0])
        else:
            raise MergeError(f"{path}: no such safetensors file or directory")
        stored = self.checkpoint.keys()
        self.training_state = any(k.startswith(EWC_FISHER) for k in stored)  # estimated at theta_pre
        if self.training_state:  # a training run's state: its EWC Fisher only
            stored = [k for k in stored if k.startswith(EWC_FISHER)]
            renamed = [checkpoint_name(k.removeprefix(EWC_FISHER)) for k in stored]
        elif self.checkpoint.files[0].name.startswith(REGULARIZER_STATE):
            raise MergeError(
                f"{path}: a regularizer state without an EWC Fisher (ewc.fisher.*): train with ewc_lambda > 0"
            )
        else:
            renamed = [checkpoint_name(k) for k in stored]
        self._stored = dict(zip(renamed, stored))
        if len(self._stored) != len(stored):
            raise MergeError(f"{path}: two entries name the same checkpoint tensor once peft's prefixes are removed")

    def keys(self) -> list[str]:
        return list(self._stored)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.checkpoint.shape(self._stored[key])

    def dtype(self, key: str) -> torch.dtype:
        return self.checkpoint.dtype(self._stored[key])

    def get(self, key: str) -> torch.Tensor:
        return self.checkpoint.get(self._stored[key])
