"""Writes tensors into safetensors shards as they come, named as transformers names them.

Each tensor's bytes go to disk when it is added: a shard in progress costs no memory. A
safetensors file starts with its header (names, dtypes, shapes, offsets), which is only known at
the end, so room for it is reserved first and filled in, padded with spaces as the format
allows, when the shard is closed.

Shards are written with `O_DIRECT` where the file system allows it: the bytes go from an aligned
staging buffer to the disk without passing through the page cache, so a merge of a model larger
than memory neither evicts the machine's cache nor waits on dirty-page throttling, and its cost
is the disk's bandwidth. Elsewhere (tmpfs, some network file systems, no `O_DIRECT`) the writes
are ordinary buffered ones; both give the same bytes.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .checkpoint import SAFETENSORS_DTYPES
from .chunked import ChunkedTensor, as_bytes, flat_pieces


_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_ENTRY_ROOM = 192  # header bytes per tensor besides its name: dtype, shape and offsets as JSON
ALIGNMENT = 4096  # O_DIRECT: memory, file offsets and lengths in multiples of this (512- and 4096-byte sectors)
STAGING_BYTES = 16 * 2**20  # per shard writer: what O_DIRECT writes at once


def header_room(keys: list[str]) -> int:
    """Header bytes to reserve for a shard that may hold any of `keys` (`ShardedWriter` rounds it up
    to end on an aligned offset)."""
    return 64 + sum(len(key.encode()) + _ENTRY_ROOM for key in keys)


class _Staging:
    """Two page-aligned buffers and a thread that writes one of them out while the other is filled."""

    def __init__(self, size: int) -> None:
        self.buffers = [_aligned_buffer(size), _aligned_buffer(size)]
        self.io = ThreadPoolExecutor(1, thread_name_prefix="specgen-io")

    def shutdown(self) -> None:
        self.io.shutdown(wait=True)


class _ShardFile:
    """One shard file, written sequentially, then its reserved header rewritten at offset 0.

    Direct: bytes are gathered in a page-aligned staging buffer; a full one is written by the
    staging's I/O thread while the next is filled (one write in flight at a time, in file order);
    the last, partial buffer is padded to the alignment and the file truncated back to its size. A
    file system that refuses `O_DIRECT` (at open or at a write: `EINVAL`) gets the same bytes
    through the page cache.
    """

    def __init__(self, path: Path, staging: _Staging | None) -> None:
        self.path, self.size = path, 0
        self._staging_set, self._current, self._fill = staging, 0, 0
        self._buffered: BinaryIO | None = None
        self._inflight: tuple[Future, memoryview] | None = None  # (the write, its data bytes)
        self._fd = -1
        if staging is not None:
            try:
                # mode 0o666 less the umask, as open() would make it
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o666)
            except OSError as error:
                if error.errno != errno.EINVAL:
                    raise
        if self._fd < 0:
            self._staging_set = None
            self._buffered = open(path, "wb")  # noqa: SIM115 - closed in close()

    @property
    def direct(self) -> bool:
        return self._staging_set is not None

    @property
    def _staging(self) -> torch.Tensor:
        return self._staging_set.buffers[self._current]

    def write(self, data: torch.Tensor) -> None:
        """Appends the bytes of `data`, a flat uint8 tensor."""
        self.size += data.numel()
        done = 0
        while self._staging_set is not None and done < data.numel():
            staging = self._staging
            take = min(data.numel() - done, staging.numel() - self._fill)
            # numpy's copy: one thread, the GIL released (torch's copy_ would start a thread pool per writer)
            staging.numpy()[self._fill : self._fill + take] = data[done : done + take].numpy()
            self._fill, done = self._fill + take, done + take
            if self._fill == staging.numel():
                self._flush(self._fill)
        if done < data.numel():  # buffered, from the start or since a fallback
            self._buffered.write(memoryview(data[done:].numpy()))

    def _flush(self, length: int) -> None:
        """Hands the staged bytes (`length`, aligned, of which `self._fill` are data) to the I/O thread
        once the previous write is done, and goes on in the other buffer."""
        view = memoryview(self._staging.numpy())[:length]
        data = view[: self._fill]
        self._fill = 0
        self._wait()
        if self._staging_set is None:  # the previous write was refused: this one goes buffered too
            self._buffered.write(data)
            return
        self._inflight = (self._staging_set.io.submit(self._write_direct, view), data)
        self._current = 1 - self._current

    def _wait(self) -> None:
        """Waits for the write in flight; `EINVAL` (no `O_DIRECT` here after all) falls back to buffered."""
        if self._inflight is None:
            return
        future, data = self._inflight
        self._inflight = None
        try:
            future.result()
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
            self._fall_back_to_buffered(data)

    def _write_direct(self, view: memoryview) -> None:
        written = 0
        while written < len(view):
            written += os.write(self._fd, view[written:])

    def _fall_back_to_buffered(self, pending: memoryview) -> None:
        """`O_DIRECT` opened but a write was refused: it and the rest go through the page cache."""
        offset = os.lseek(self._fd, 0, os.SEEK_CUR)
        os.close(self._fd)
        self._fd = -1
        self._buffered = open(self.path, "r+b")  # noqa: SIM115 - closed in close()
        self._buffered.seek(offset)
        self._buffered.write(pending)
        self._staging_set = None

    def finish(self, header: bytes) -> None:
        """Writes what is staged, then `header` over the reserved room at the start, and closes."""
        if self._staging_set is not None and self._fill:
            length = self._fill + (-self._fill % ALIGNMENT)
            self._staging[self._fill : length] = 0
            self._flush(length)
        self._wait()
        if self._staging_set is not None:  # the header's length is aligned, so is each piece of it
            os.ftruncate(self._fd, self.size)
            header_bytes = torch.frombuffer(bytearray(header), dtype=torch.uint8)
            staging = self._staging
            for start in range(0, len(header), staging.numel()):
                piece = header_bytes[start : start + staging.numel()]
                staging[: piece.numel()].copy_(piece)
                os.pwrite(self._fd, memoryview(staging.numpy())[: piece.numel()], start)
        else:
            self._buffered.seek(0)
            self._buffered.write(header)
        self.close()

    def close(self) -> None:
        """Closes the file (a write in flight ends first; its error, if any, is the caller's to have seen)."""
        if self._inflight is not None:
            self._inflight[0].exception()  # waits; an error here is moot: the shard is abandoned
            self._inflight = None
        if self._buffered is not None:
            self._buffered.close()
            self._buffered = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class ShardedWriter:
    """`add` tensors one by one; a new shard starts when the next tensor would overflow this one.

    Shards get their final names (`model-00001-of-00003.safetensors`, or `model.safetensors`
    alone) and the index its `weight_map` in `close()`, once their number is known.
    """

    def __init__(
        self, directory: Path, max_shard_size: int, name: str, header_bytes: int, direct: bool = True
    ) -> None:
        self.directory, self.max_shard_size, self.name = directory, max_shard_size, name
        # with the 8-byte length before it, the header ends on an aligned offset: the header's own
        # write at the end, and the tensor data after it, are aligned for O_DIRECT
        self.header_bytes = header_bytes + (-(header_bytes + 8) % ALIGNMENT)
        self._staging = _Staging(STAGING_BYTES) if direct and hasattr(os, "O_DIRECT") else None
        self._file: _ShardFile | None = None
        self._entries: dict[str, dict] = {}
        self._shard_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor | ChunkedTensor) -> None:
        """Appends `tensor` (computed now, chunk by chunk, if it is a `ChunkedTensor`) under `key`."""
        self.begin(key, tensor.dtype, tuple(tensor.shape))
        for piece in flat_pieces(tensor):
            self.write(piece)

    def begin(self, key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        """Starts the tensor `key` (a new shard if it would overflow this one); its bytes follow with `write`."""
        size = dtype.itemsize * math.prod(shape)
        if self._file is not None and self._shard_bytes and self._shard_bytes + size > self.max_shard_size:
            self._close_shard()
        if self._file is None:
            self._open_shard()
        offsets = [self._shard_bytes, self._shard_bytes + size]
        self._entries[key] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": offsets}
        self._shard_bytes += size
        self.total_bytes += size

    def write(self, piece: torch.Tensor) -> None:
        """Appends bytes of the tensor begun last (a flat uint8 tensor)."""
        self._file.write(piece)

    def _open_shard(self) -> None:
        path = self.directory / f"{self.name}-{len(self._written) + 1:05d}.safetensors.part"
        self._file = _ShardFile(path, self._staging)
        self._file.write(torch.zeros(8 + self.header_bytes, dtype=torch.uint8))
        self._written.append((path, []))

    def _close_shard(self) -> None:
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._entries}, separators=(",", ":")).encode()
        if len(header) > self.header_bytes:
            raise RuntimeError(f"safetensors header of {len(header)} bytes overflows the {self.header_bytes} reserved")
        self._file.finish(struct.pack("<Q", self.header_bytes) + header.ljust(self.header_bytes, b" "))
        if not self._file.direct and self._staging is not None:
            self._staging.shutdown()
            self._staging = None  # O_DIRECT refused in this directory: the next shards go buffered at once
        self._written[-1][1].extend(self._entries)
        self._file, self._entries, self._shard_bytes = None, {}, 0

    def abort(self) -> None:
        """Closes the shard in progress (the caller removes the directory)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._release()

    def _release(self) -> None:
        if self._staging is not None:
            self._staging.shutdown()
            self._staging = None

    def close(self) -> list[Path]:
        """Finishes the last shard, names the shards and writes the index (several shards only)."""
        if self._file is None and not self._written:
            self._open_shard()  # a model without tensors still gets its (empty) weights file
        if self._file is not None:
            self._close_shard()
        self._release()
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
        (self.directory / f"{self.name}.safetensors.index.json").write_text(
            json.dumps(index, indent=2, sort_keys=True)
        )
        return finals


class _ComputePool:
    """Threads that compute chunks, as many as the caller's torch threads, each running torch on one thread.

    Several chunks computed at once, each on one thread, keep every core busy beside the writers;
    torch's own thread pool would spread each small operation over every core and keep them spinning
    between operations, in contention with the writer threads. `torch.set_num_threads(1)` on a pool
    thread also sets the count a thread started later begins with, so `shutdown` sets it back to the
    caller's: during a merge, a thread that runs its first torch operation starts with one. Where torch
    runs on its native thread pool instead of OpenMP, the count is one for the whole process and can
    be set only once: there one thread computes, and the count is left alone.
    """

    def __init__(self) -> None:
        self._restore = torch.get_num_threads() if torch.backends.openmp.is_available() else None
        self._executor = ThreadPoolExecutor(
            self._restore or 1,
            thread_name_prefix="specgen-compute",
            initializer=torch.set_num_threads if self._restore else None,
            initargs=(1,) if self._restore else (),
        )

    def submit(self, compute: Callable[[int, int], torch.Tensor], start: int, stop: int) -> Future:
        return self._executor.submit(compute, start, stop)

    def shutdown(self, cancel: bool) -> None:
        """Waits for the chunks being computed (`cancel`: drops those not started), then restores torch's count."""
        self._executor.shutdown(wait=True, cancel_futures=cancel)
        if self._restore is not None:
            torch.set_num_threads(self._restore)


class ConcurrentWriters:
    """Feeds several `ShardedWriter`s, each from a thread of its own, in the order tensors come.

    Writing a tensor out is most of a merge's time, and `write` releases the GIL: here it runs
    while the next tensor is being computed and, in a sweep, beside the other alphas' writes. A
    `ChunkedTensor` is computed a chunk at a time by a pool of compute threads (several chunks, of
    one output or of a sweep's several, at once), and its writer writes each chunk, in order, as it
    is ready (`add_outputs`). At most `max_pending` tensors, and `max_pending_bytes` of them and of
    the chunks (or one tensor, however large), wait for their writer: that bounds the memory they
    hold. The first failure stops every writer (writes queued behind it are dropped) and is raised by
    the `add` or `close` that waits for it.
    """

    def __init__(
        self, writers: list[ShardedWriter], max_pending: int = 3, max_pending_bytes: int = 64 * 2**20
    ) -> None:
        self.writers, self.max_pending, self.max_pending_bytes = writers, max_pending, max_pending_bytes
        self._compute = _ComputePool()
        self._threads = [ThreadPoolExecutor(1, thread_name_prefix="specgen-writer") for _ in writers]
        self._pending: deque[tuple[Future, int, bool]] = deque()  # (write, bytes, a whole tensor), oldest first
        self._pending_bytes = self._pending_tensors = 0
        self._failed = threading.Event()

    def add(self, index: int, key: str, tensor: torch.Tensor | ChunkedTensor) -> None:
        """Hands `tensor` to writer `index` (a `ChunkedTensor` is computed here, chunk by chunk)."""
        if isinstance(tensor, ChunkedTensor):
            self._add_chunked(key, {index: tensor})
        else:
            self._submit(index, tensor.numel() * tensor.element_size(), True, self.writers[index].add, key, tensor)

    def add_outputs(self, key: str, outputs: Iterable[torch.Tensor | ChunkedTensor]) -> None:
        """Hands writer `i` the `i`-th output of tensor `key`.

        Tensors are handed over as they come (an iterator computing them holds one at a time).
        `ChunkedTensor`s are computed chunk by chunk by the compute threads, every output's chunk of
        one slice in turn (the inputs' slice still in the cache), each chunk written by its writer's
        thread once it is computed.
        """
        chunked: dict[int, ChunkedTensor] = {}
        for index, tensor in enumerate(outputs):
            if isinstance(tensor, ChunkedTensor):
                chunked[index] = tensor
            else:
                self.add(index, key, tensor)
        self._add_chunked(key, chunked)

    def _add_chunked(self, key: str, chunked: dict[int, ChunkedTensor]) -> None:
        for index, tensor in chunked.items():
            self._submit(index, 0, False, self.writers[index].begin, key, tensor.dtype, tuple(tensor.shape))
        for bounds in zip(*(t.slices() for t in chunked.values())):
            for (index, tensor), (start, stop) in zip(chunked.items(), bounds):
                computed = self._compute.submit(tensor.compute, start, stop)
                size = (stop - start) * tensor.element_size()
                self._submit(index, size, False, self._write_computed, index, computed)

    def _write_computed(self, index: int, computed: Future) -> None:
        """On writer `index`'s thread: waits for a chunk to be computed, then writes it."""
        self.writers[index].write(as_bytes(computed.result()))

    def _submit(self, index: int, size: int, counted: bool, method: Callable[..., Any], *args: Any) -> None:
        """Queues `method(*args)` on writer `index`'s thread once the pending work is within bounds
        (`counted`: a whole tensor, held to `max_pending`; every piece is held to `max_pending_bytes`)."""
        while self._pending and (
            (counted and self._pending_tensors >= self.max_pending)
            or self._pending_bytes + size > self.max_pending_bytes
        ):
            self._wait_oldest()
        self._pending.append((self._threads[index].submit(self._run, method, *args), size, counted))
        self._pending_bytes += size
        self._pending_tensors += counted

    def _wait_oldest(self) -> None:
        future, size, counted = self._pending.popleft()
        self._pending_bytes -= size
        self._pending_tensors -= counted
        future.result()

    def _run(self, method: Callable[..., Any], *args: Any) -> None:
        if self._failed.is_set():
            return  # another write failed: the caller raises that error
        try:
            method(*args)
        except BaseException:
            self._failed.set()
            raise

    def close(self) -> None:
        """Waits for every write, then finishes each writer's shards and index."""
        self._pending.extend((t.submit(self._run, w.close), 0, False) for t, w in zip(self._threads, self.writers))
        while self._pending:
            self._wait_oldest()
        self._shutdown(cancel=False)

    def abort(self) -> None:
        """Stops the writers (the write in progress ends first) and closes their open shards."""
        self._failed.set()
        self._shutdown(cancel=True)
        for writer in self.writers:
            writer.abort()

    def _shutdown(self, cancel: bool) -> None:
        self._compute.shutdown(cancel)  # first: a writer may be waiting for a chunk
        for thread in self._threads:
            thread.shutdown(wait=True, cancel_futures=cancel)


def _aligned_buffer(size: int) -> torch.Tensor:
    """A page-aligned uint8 buffer (an anonymous mapping), as `O_DIRECT` needs."""
    return torch.frombuffer(mmap.mmap(-1, size), dtype=torch.uint8)
