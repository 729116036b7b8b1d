"""A checkpoint on disk, read one tensor at a time.

Like mergekit's lazy loader: a tensor is read only when asked for, so a merge holds a few tensors,
never a whole model, whatever the sharding. A safetensors tensor is a private memory mapping of its
own bytes in the file, populated when it is asked for (`MADV_POPULATE_READ`: the kernel reads the
range with large sequential reads and maps it in one call, instead of one page fault per 4 KB as
the tensor is first touched), and unmapped when the tensor is dropped. `.bin` checkpoints are loaded
with `weights_only=True` (and memory-mapped), one file at a time.

Every file is checked when the checkpoint is opened, before a merge writes anything: a truncated
shard, an index naming a missing shard or without `weight_map`, malformed JSON, a legacy or
pickled `.bin` each raise a `MergeError` whose message starts with the file's path.
"""

from __future__ import annotations

import functools
import json
import mmap
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .errors import MergeError


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# What a merge downloads from the Hub: weights, and the side files a model directory needs.
HUB_PATTERNS = [
    "*.safetensors",
    "*.bin",
    "*.json",
    "*.jinja",
    "*.model",
    "*.txt",
    "*.tiktoken",
]


# A .bin that cannot be loaded safely: what to do instead (never weights_only=False on a file one did not make)
_CONVERT = "convert it to safetensors with a tool you trust"


def read_json(path: Path) -> Any:
    """The JSON in `path`; a `MergeError` starting with the path where it cannot be read or parsed."""
    try:
        return json.loads(path.read_text())
    except OSError as error:
        raise MergeError(f"{path}: cannot be read: {error.strerror or error}") from error
    except ValueError as error:  # JSONDecodeError, or bytes that are not UTF-8
        raise MergeError(f"{path}: malformed JSON ({error})") from error


def resolve(source: str | os.PathLike) -> Path:
    """A local directory, or a Hub id downloaded with `snapshot_download` (weights and side files;
    `.bin` weights only where the repository has no safetensors)."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists():
        raise MergeError(f"{source}: a file; expected a model directory or a Hub id")
    from huggingface_hub import list_repo_files, snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(str(source))
    except HFValidationError:
        raise MergeError(f"{source}: no such directory (nor a Hub id)") from None
    try:
        files = list_repo_files(str(source))
        patterns = [p for p in HUB_PATTERNS if not (p == "*.bin" and any(f.endswith(".safetensors") for f in files))]
        return Path(snapshot_download(str(source), allow_patterns=patterns))
    except Exception as error:  # offline, unknown repository, gated...: one clear message
        raise MergeError(f"{source}: cannot find it as a local directory or on the Hub: {error}") from error


class Checkpoint:
    """The tensors of one model (or adapter) directory, by key, without loading them."""

    def __init__(self, directory: str | os.PathLike, weights_name: str = "model") -> None:
        self.directory = Path(directory)
        self.files = self._weight_files(weights_name)
        self._key_to_file: dict[str, Path] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        self._dtype: dict[str, torch.dtype] = {}
        self._offsets: dict[str, tuple[int, int]] = {}  # safetensors: each tensor's bytes in its file
        self._bin_cache: tuple[Path, dict[str, torch.Tensor]] | None = None
        for file in self.files:
            if file.suffix == ".safetensors":
                self._read_header(file)
            else:
                for key, tensor in self._load_bin(file).items():
                    self._add(key, file, tuple(tensor.shape), tensor.dtype)

    def _read_header(self, file: Path) -> None:
        try:
            with safe_open(file, framework="pt") as f:
                entries = [(key, f.get_slice(key)) for key in f.keys()]
                for key, tensor_slice in entries:
                    dtype = tensor_slice.get_dtype()
                    if dtype not in SAFETENSORS_DTYPES:
                        raise MergeError(f"{file}: tensor {key!r} has dtype {dtype}, which a merge does not handle")
                    self._add(key, file, tuple(tensor_slice.get_shape()), SAFETENSORS_DTYPES[dtype])
            with open(file, "rb") as f:  # safe_open has checked the header: the offsets are sound
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
            for key, entry in header.items():
                if key != "__metadata__":
                    begin, end = entry["data_offsets"]
                    self._offsets[key] = (8 + length + begin, 8 + length + end)
        except (SafetensorError, OSError) as error:  # truncated, not safetensors at all, unreadable
            raise MergeError(f"{file}: not a readable safetensors file ({error})") from error

    def _add(self, key: str, file: Path, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        if key in self._key_to_file:
            raise MergeError(
                f"{self.directory}: tensor {key!r} is stored twice ({self._key_to_file[key].name}, {file.name})"
            )
        self._key_to_file[key], self._shape[key], self._dtype[key] = file, shape, dtype

    def _weight_files(self, name: str) -> list[Path]:
        d = self.directory
        for index in (d / f"{name}.safetensors.index.json", d / f"{name}.bin.index.json" if name == "model" else None):
            if index is not None and index.is_file():
                return self._indexed_files(index)
        for single in (f"{name}.safetensors", "pytorch_model.bin" if name == "model" else f"{name}.bin"):
            if (d / single).is_file():
                return [d / single]
        raise MergeError(f"{d}: no {name}.safetensors, sharded index or .bin weights found")

    def _indexed_files(self, index: Path) -> list[Path]:
        content = read_json(index)
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise MergeError(f"{index}: no weight_map (tensor name -> shard file) in this index")
        files = [self.directory / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise MergeError(
                f"{index}: names {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}, "
                f"which {'is' if len(missing) == 1 else 'are'} not in {self.directory}"
            )
        return files

    def _load_bin(self, file: Path) -> dict[str, torch.Tensor]:
        if self._bin_cache is None or self._bin_cache[0] != file:
            self._bin_cache = (file, _load_bin_safely(file))
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
        return map_tensor(file, *self._offsets[key], self._dtype[key], self._shape[key])

    @functools.cached_property
    def config(self) -> dict[str, Any] | None:
        return read_config(self.directory)


# Linux 5.14+: map the range's page-cache pages readable now, reading what is not cached (not `MAP_POPULATE`,
# which on a private writable mapping copies every page into anonymous memory to break copy-on-write).
MADV_POPULATE_READ = 22


def map_tensor(file: Path, start: int, stop: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor stored in bytes `[start, stop)` of `file`, as a private memory mapping of them.

    Args:
        file: the file.
        start: the tensor's first byte.
        stop: one past its last byte.
        dtype: its dtype.
        shape: its shape.

    Returns:
        A tensor over the mapping (copy-on-write: writing to it never changes the file), its pages
        read and mapped at once where the kernel can (`MADV_POPULATE_READ`; else `MADV_WILLNEED`
        starts reading them ahead); the mapping lives as long as the tensor.
    """
    if stop == start:
        return torch.empty(shape, dtype=dtype)
    aligned = start - start % mmap.ALLOCATIONGRANULARITY
    with open(file, "rb") as f:
        mapping = mmap.mmap(
            f.fileno(), stop - aligned, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=aligned
        )
    _populate(mapping)
    count = (stop - start) // dtype.itemsize
    return torch.frombuffer(mapping, dtype=dtype, count=count, offset=start - aligned).view(shape)


def _populate(mapping: mmap.mmap) -> None:
    """Reads and maps a mapping's pages in one call where the platform allows it (a hint: failures are ignored)."""
    if not hasattr(mapping, "madvise"):
        return
    for advice in (MADV_POPULATE_READ, getattr(mmap, "MADV_WILLNEED", None)):
        if advice is None:
            continue
        try:
            mapping.madvise(advice)
            return
        except OSError:  # EINVAL: a kernel without MADV_POPULATE_READ
            continue


def read_config(directory: Path) -> dict[str, Any] | None:
    """The `config.json` of a model directory, None where there is none; a `MergeError` naming it if malformed."""
    path = directory / "config.json"
    if not path.is_file():
        return None
    config = read_json(path)
    if not isinstance(config, dict):
        raise MergeError(f"{path}: not a model config (a JSON object)")
    return config


def _load_bin_safely(file: Path) -> dict[str, torch.Tensor]:
    """A `.bin` state dict, loaded with `weights_only=True`: tensors and plain containers, no code."""
    if not zipfile.is_zipfile(file):
        raise MergeError(
            f"{file}: not a zip-format PyTorch checkpoint (a legacy torch.save format, or not a checkpoint at all), "
            f"which cannot be loaded safely; {_CONVERT}"
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise MergeError(
            f"{file}: holds pickled objects other than tensors, which are not loaded (unpickling them could run "
            f"code); {_CONVERT}"
        ) from None  # torch's own message suggests weights_only=False
    except (OSError, RuntimeError, ValueError, EOFError) as error:  # a damaged zip, an unreadable file
        reason = (
            str(error).splitlines()[0] if str(error) and "weights_only" not in str(error) else type(error).__name__
        )
        raise MergeError(f"{file}: cannot be read as a PyTorch checkpoint ({reason})") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise MergeError(f"{file}: not a state dict (a mapping of names to tensors)")
    return state
