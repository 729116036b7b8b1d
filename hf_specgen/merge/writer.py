"""Writes tensors into safetensors shards as they come, named as transformers names them.

Each tensor's bytes go to disk when it is added: a shard in progress costs no memory. A
safetensors file starts with its header (names, dtypes, shapes, offsets), which is only known at
the end, so room for it is reserved first and filled in, padded with spaces as the format
allows, when the shard is closed.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import BinaryIO

import torch

from .checkpoint import SAFETENSORS_DTYPES

_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_ENTRY_ROOM = 192  # header bytes per tensor besides its name: dtype, shape and offsets as JSON


def header_room(keys: list[str]) -> int:
    """Header bytes to reserve for a shard that may hold any of `keys` (a multiple of 8)."""
    room = 64 + sum(len(key.encode()) + _ENTRY_ROOM for key in keys)
    return room + (-room % 8)


class ShardedWriter:
    """`add` tensors one by one; a new shard starts when the next tensor would overflow this one.

    Shards get their final names (`model-00001-of-00003.safetensors`, or `model.safetensors`
    alone) and the index its `weight_map` in `close()`, once their number is known.
    """

    def __init__(self, directory: Path, max_shard_size: int, name: str, header_bytes: int) -> None:
        self.directory, self.max_shard_size, self.name = directory, max_shard_size, name
        self.header_bytes = header_bytes
        self._file: BinaryIO | None = None
        self._entries: dict[str, dict] = {}
        self._shard_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._file is not None and self._shard_bytes and self._shard_bytes + size > self.max_shard_size:
            self._close_shard()
        if self._file is None:
            self._open_shard()
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        offsets = [self._shard_bytes, self._shard_bytes + size]
        self._entries[key] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": offsets}
        self._shard_bytes += size
        self.total_bytes += size

    def _open_shard(self) -> None:
        path = self.directory / f"{self.name}-{len(self._written) + 1:05d}.safetensors.part"
        self._file = open(path, "wb")  # noqa: SIM115 - closed in _close_shard
        self._file.write(b"\0" * (8 + self.header_bytes))
        self._written.append((path, []))

    def _close_shard(self) -> None:
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._entries}, separators=(",", ":")).encode()
        if len(header) > self.header_bytes:
            raise RuntimeError(f"safetensors header of {len(header)} bytes overflows the {self.header_bytes} reserved")
        self._file.seek(0)
        self._file.write(struct.pack("<Q", self.header_bytes) + header.ljust(self.header_bytes, b" "))
        self._file.close()
        self._written[-1][1].extend(self._entries)
        self._file, self._entries, self._shard_bytes = None, {}, 0

    def abort(self) -> None:
        """Closes the shard in progress (the caller removes the directory)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> list[Path]:
        """Finishes the last shard, names the shards and writes the index (several shards only)."""
        if self._file is None and not self._written:
            self._open_shard()  # a model without tensors still gets its (empty) weights file
        if self._file is not None:
            self._close_shard()
        count = len(self._written)
        if count == 1:
            final = self.directory / f"{self.name}.safetensors"
            self._written[0][0].rename(final)
            return [final]
        weight_map, finals = {}, []
        for i, (path, keys) in enumerate(self._written, start=1):
            final = self.directory / f"{self.name}-{i:05d}-of-{count:05d}.safetensors"
            path.rename(final)
            finals.append(final)
            weight_map.update({key: final.name for key in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / f"{self.name}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
        return finals
