"""Writes tensors into safetensors shards as they fill, named as transformers names them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


class ShardedWriter:
    """`add` tensors one by one; a shard is written when the next tensor would overflow it.

    Shards get their final names (`model-00001-of-00003.safetensors`, or `model.safetensors`
    alone) and the index its `weight_map` in `close()`, once their number is known.
    """

    def __init__(self, directory: Path, max_shard_size: int, name: str = "model") -> None:
        self.directory, self.max_shard_size, self.name = directory, max_shard_size, name
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_storages: set[int] = set()
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_size:
            self._flush()
        if tensor.untyped_storage().data_ptr() in self._pending_storages:
            tensor = tensor.clone()  # safetensors refuses tensors that share memory
        tensor = tensor.contiguous()
        self._pending_storages.add(tensor.untyped_storage().data_ptr())
        self._pending[key] = tensor
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.directory / f"{self.name}-{len(self._written) + 1:05d}.safetensors.part"
        save_file(self._pending, path, metadata={"format": "pt"})
        self._written.append((path, list(self._pending)))
        self._pending, self._pending_storages, self._pending_bytes = {}, set(), 0

    def close(self) -> list[Path]:
        """Writes the last shard, names the shards and writes the index (several shards only)."""
        if self._pending or not self._written:
            self._flush()
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
