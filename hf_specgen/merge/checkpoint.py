"""A checkpoint on disk, read one tensor at a time.

Like mergekit's lazy loader: safetensors files are memory-mapped and a tensor is read only when
asked for, so a merge holds a few tensors, never a whole model, whatever the sharding. `.bin`
checkpoints are loaded with `weights_only=True` (and memory-mapped), one file at a time.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .errors import MergeError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
# What a merge downloads from the Hub: weights, and the side files a model directory needs.
HUB_PATTERNS = [
    "*.safetensors", "*.bin", "*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken",
]  # fmt: skip


def resolve(source: str | os.PathLike) -> Path:
    """A local directory, or a Hub id downloaded with `snapshot_download` (weights and side files;
    `.bin` weights only where the repository has no safetensors)."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists():
        raise MergeError(f"{source} is a file; expected a model directory or a Hub id")
    from huggingface_hub import list_repo_files, snapshot_download

    try:
        files = list_repo_files(str(source))
        patterns = [p for p in HUB_PATTERNS if not (p == "*.bin" and any(f.endswith(".safetensors") for f in files))]
        return Path(snapshot_download(str(source), allow_patterns=patterns))
    except Exception as error:  # offline, unknown repository, gated...: one clear message
        raise MergeError(f"cannot find {source!r} as a local directory or on the Hub: {error}") from error


class Checkpoint:
    """The tensors of one model (or adapter) directory, by key, without loading them."""

    def __init__(self, directory: str | os.PathLike, weights_name: str = "model") -> None:
        self.directory = Path(directory)
        self.files = self._weight_files(weights_name)
        self._key_to_file: dict[str, Path] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        self._dtype: dict[str, torch.dtype] = {}
        self._open: dict[Path, Any] = {}
        self._bin_cache: tuple[Path, dict[str, torch.Tensor]] | None = None
        for file in self.files:
            if file.suffix == ".safetensors":
                with safe_open(file, framework="pt") as f:
                    for key in f.keys():
                        tensor_slice = f.get_slice(key)
                        self._add(key, file, tuple(tensor_slice.get_shape()), SAFETENSORS_DTYPES[tensor_slice.get_dtype()])
            else:
                for key, tensor in self._load_bin(file).items():
                    self._add(key, file, tuple(tensor.shape), tensor.dtype)

    def _add(self, key: str, file: Path, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        if key in self._key_to_file:
            raise MergeError(f"{self.directory}: tensor {key!r} is stored twice ({self._key_to_file[key].name}, {file.name})")
        self._key_to_file[key], self._shape[key], self._dtype[key] = file, shape, dtype

    def _weight_files(self, name: str) -> list[Path]:
        d = self.directory
        for index in (d / f"{name}.safetensors.index.json", d / f"{name}.bin.index.json" if name == "model" else None):
            if index is not None and index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                return [d / f for f in dict.fromkeys(weight_map.values())]
        for single in (f"{name}.safetensors", "pytorch_model.bin" if name == "model" else f"{name}.bin"):
            if (d / single).is_file():
                return [d / single]
        raise MergeError(f"{d}: no {name}.safetensors, sharded index or .bin weights found")

    def _load_bin(self, file: Path) -> dict[str, torch.Tensor]:
        if self._bin_cache is None or self._bin_cache[0] != file:
            self._bin_cache = (file, torch.load(file, map_location="cpu", weights_only=True, mmap=True))
        return self._bin_cache[1]

    def keys(self) -> list[str]:
        """Keys in storage order (file by file), which keeps reads sequential."""
        return list(self._key_to_file)

    def __contains__(self, key: str) -> bool:
        return key in self._key_to_file

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shape[key]

    def dtype(self, key: str) -> torch.dtype:
        return self._dtype[key]

    def get(self, key: str) -> torch.Tensor:
        file = self._key_to_file[key]
        if file.suffix != ".safetensors":
            return self._load_bin(file)[key]
        if file not in self._open:
            # One file open at a time: closing unmaps the previous one, whose pages would otherwise
            # stay resident until the end (tensors already read keep their own mapping alive).
            self._open.clear()
            self._open[file] = safe_open(file, framework="pt")
        return self._open[file].get_tensor(key)

    @functools.cached_property
    def config(self) -> dict[str, Any] | None:
        path = self.directory / "config.json"
        return json.loads(path.read_text()) if path.is_file() else None
