"""The merge's shard writer: O_DIRECT and buffered writes give the same safetensors bytes, the
fallbacks when a file system refuses O_DIRECT, and the writer threads (order, overlap, failure)."""

import errno
import os
import threading

import pytest
import torch
from safetensors.torch import load_file

import hf_specgen.merge.writer as writer_module
from hf_specgen.merge.writer import ALIGNMENT, ConcurrentWriters, ShardedWriter, header_room


def tensors():
    """Odd sizes (no tensor a multiple of the alignment), every dtype kind, a 0-dim and an empty
    tensor, and one tensor larger than the (shrunken) staging buffer."""
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(37, 129, generator=g),  # 19,092 bytes: several staging buffers
        "norm.weight": torch.randn(129, generator=g).to(torch.bfloat16),
        "head.weight": torch.randn(7, 129, generator=g).to(torch.float16),
        "position_ids": torch.arange(77).reshape(1, 77),
        "mask": torch.rand(5, 3, generator=g) > 0.5,
        "logit_scale": torch.tensor(4.6052),
        "empty": torch.zeros(0, 4),
    }


def write(directory, direct, max_shard_size=12_000):
    directory.mkdir()
    data = tensors()
    room = header_room(list(data)) + 2 * ALIGNMENT  # a header longer than the staging buffer
    writer = ShardedWriter(directory, max_shard_size, "model", room, direct=direct)
    used = []
    for key, tensor in data.items():
        writer.add(key, tensor)
        used.append(writer._file.direct)
    return writer.close(), used


def read(files):
    loaded = {}
    for file in files:
        loaded.update(load_file(file))
    return loaded


@pytest.fixture
def small_staging(monkeypatch):
    monkeypatch.setattr(writer_module, "STAGING_BYTES", 2 * ALIGNMENT)  # flushes mid-tensor and at boundaries


def test_direct_and_buffered_write_the_same_bytes(tmp_path, small_staging):
    direct_files, direct_used = write(tmp_path / "direct", direct=True)
    buffered_files, buffered_used = write(tmp_path / "buffered", direct=False)
    assert all(direct_used) and not any(buffered_used)  # /tmp here is ext4: O_DIRECT is taken
    assert len(direct_files) == 2  # the embedding (19 kB) fills the first shard alone
    assert [f.name for f in direct_files] == [f.name for f in buffered_files]
    for d, b in zip(direct_files, buffered_files):
        assert d.read_bytes() == b.read_bytes()
        assert d.stat().st_size % ALIGNMENT != 0  # the padded tail was truncated back
    loaded, expected = read(direct_files), tensors()
    assert loaded.keys() == expected.keys()
    for key, tensor in expected.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor)
    header_end = 8 + int.from_bytes(direct_files[0].read_bytes()[:8], "little")
    assert header_end % ALIGNMENT == 0 and header_end > writer_module.STAGING_BYTES  # tensor data starts aligned


def test_o_direct_refused_at_open_falls_back_to_buffered(tmp_path, small_staging, monkeypatch):
    buffered_files, _ = write(tmp_path / "buffered", direct=False)
    original_open = os.open

    def refusing_open(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")  # as tmpfs answers
        return original_open(path, flags, *args)

    monkeypatch.setattr(writer_module.os, "open", refusing_open)
    files, used = write(tmp_path / "refused", direct=True)
    assert not any(used)
    assert [f.read_bytes() for f in files] == [f.read_bytes() for f in buffered_files]


def test_o_direct_refused_at_first_write_continues_buffered(tmp_path, small_staging, monkeypatch):
    buffered_files, _ = write(tmp_path / "buffered", direct=False)
    refused = []

    def refusing_write(self, view):
        refused.append(len(view))
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(writer_module._ShardFile, "_write_direct", refusing_write)
    files, used = write(tmp_path / "refused", direct=True)
    assert refused == [2 * ALIGNMENT] and not any(used)  # tried once, in the first shard, then buffered
    assert [f.read_bytes() for f in files] == [f.read_bytes() for f in buffered_files]


def test_other_write_errors_are_raised(tmp_path, small_staging, monkeypatch):
    def full_disk(self, view):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_module._ShardFile, "_write_direct", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write(tmp_path / "full", direct=True)


class RecordingWriter:
    """Stands in for a ShardedWriter: records what it is given, and on which thread."""

    def __init__(self, on_add=None):
        self.keys, self.threads, self.closed, self.aborted = [], set(), False, False
        self.on_add = on_add

    def add(self, key, tensor):
        self.threads.add(threading.get_ident())
        if self.on_add:
            self.on_add(self, key)
        self.keys.append(key)

    def close(self):
        self.closed = True

    def abort(self):
        self.aborted = True


def feed(concurrent, tensors):
    """Tensors t0, t1, ... to each writer in turn, as a merge hands them over."""
    for i in range(tensors):
        for index in range(len(concurrent.writers)):
            concurrent.add(index, f"t{i}", torch.zeros(1))


def test_writers_run_concurrently_each_in_order():
    started = [threading.Event(), threading.Event()]
    overlapped = []

    def wait_for_the_other(writer, key):
        index = writers.index(writer)
        started[index].set()
        overlapped.append(started[1 - index].wait(timeout=10))  # both writers inside `add` at once

    writers = [RecordingWriter(wait_for_the_other), RecordingWriter(wait_for_the_other)]
    concurrent = ConcurrentWriters(writers, max_pending=2)
    feed(concurrent, tensors=5)
    concurrent.close()
    assert overlapped and all(overlapped)
    assert all(w.keys == [f"t{i}" for i in range(5)] and w.closed for w in writers)
    assert not writers[0].threads & writers[1].threads and threading.get_ident() not in writers[0].threads


@pytest.mark.parametrize(
    ("max_pending", "max_pending_bytes", "waiting"),
    [(3, 2**20, 3), (10, 16, 2), (10, 4, 1)],  # by count; by bytes (8 per tensor); one tensor over the bytes
    ids=["count", "bytes", "one_at_least"],
)
def test_pending_tensors_are_bounded(max_pending, max_pending_bytes, waiting):
    release = threading.Event()
    writer = RecordingWriter(lambda w, key: release.wait(timeout=10))
    concurrent = ConcurrentWriters([writer], max_pending=max_pending, max_pending_bytes=max_pending_bytes)
    for i in range(waiting):
        concurrent.add(0, f"t{i}", torch.zeros(2))  # the writer is blocked: these wait
    extra = threading.Thread(target=concurrent.add, args=(0, "extra", torch.zeros(2)))
    extra.start()
    extra.join(timeout=0.5)
    assert extra.is_alive() and writer.keys == []  # one more waits for a free place
    release.set()
    extra.join(timeout=10)
    concurrent.close()
    assert writer.keys == [*(f"t{i}" for i in range(waiting)), "extra"]


def test_first_failure_stops_every_writer_and_is_raised():
    submitted = threading.Event()

    def first(writer, key):
        if key == "t0":
            submitted.wait(timeout=10)  # everything below is queued by now
        if key == "t1":
            raise OSError(errno.ENOSPC, "No space left on device")

    def second(writer, key):
        concurrent._failed.wait(timeout=10)  # the other writer has failed

    writers = [RecordingWriter(first), RecordingWriter(second)]
    concurrent = ConcurrentWriters(writers, max_pending=10)
    feed(concurrent, tensors=5)
    submitted.set()
    with pytest.raises(OSError, match="No space left"):
        concurrent.close()
    concurrent.abort()
    # queued writes after the failure are dropped, in the failed writer and in the others
    assert writers[0].keys == ["t0"] and writers[1].keys == ["t0"]
    assert all(w.aborted and not w.closed for w in writers)
