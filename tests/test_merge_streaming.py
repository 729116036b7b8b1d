"""How a merge streams its work (issue 20): elementwise methods computed chunk by chunk as they are
written, bit for bit what whole tensors give; tensors mapped one by one from the files; the writer's
double-buffered O_DIRECT writes; torch's thread settings left alone; a plain merge of two
safetensors checkpoints that never imports transformers; shard sizes read as transformers reads them."""

import errno
import json
import os
import resource
import subprocess
import sys

import pytest
import torch
from merge_helpers import write_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import hf_specgen.merge.chunked as chunked_module
import hf_specgen.merge.plan as plan_module
import hf_specgen.merge.writer as writer_module
from hf_specgen.merge import MergeError, MergeOptions, merge, wise_ft, wise_ft_sweep
from hf_specgen.merge.checkpoint import Checkpoint, map_tensor
from hf_specgen.merge.chunked import ChunkedTensor, materialize
from hf_specgen.merge.methods import METHODS, Parameter, bind, register_method
from hf_specgen.merge.options import check_shard_size
from hf_specgen.merge.plan import MergedTensor
from hf_specgen.merge.writer import ALIGNMENT, ShardedWriter, header_room


def bits(tensor):
    return tensor.contiguous().view(torch.uint8)


def pair(dtype, shape=(300, 77), seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(shape, generator=g)
    ft = pre + 0.1 * torch.randn(shape, generator=g)
    return pre.to(dtype), ft.to(dtype)


def test_chunked_tensor_computes_each_chunk_when_asked_and_materializes_whole():
    calls = []

    def compute(start, stop):
        calls.append((start, stop))
        return torch.arange(start, stop, dtype=torch.float32)

    tensor = ChunkedTensor((5, 7), torch.float32, compute, chunk_elements=8)
    assert calls == []  # nothing computed before it is written
    assert tensor.numel() == 35 and tensor.element_size() == 4
    pieces = tensor.chunks()
    assert calls == []
    assert torch.equal(next(pieces), torch.arange(8.0)) and calls == [(0, 8)]
    assert torch.equal(materialize(tensor), torch.arange(35.0).view(5, 7))
    assert calls[1:] == [(0, 8), (8, 16), (16, 24), (24, 32), (32, 35)]
    plain = torch.ones(2)
    assert materialize(plain) is plain


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "fisher"])
def test_chunked_output_is_bit_identical_to_the_whole_tensor(dtype, method, monkeypatch):
    monkeypatch.setattr(chunked_module, "CHUNK_ELEMENTS", 999)  # 24 chunks of a 23,100-element tensor
    pre, ft = pair(dtype)
    inputs = {}
    if method == "fisher":
        g = torch.Generator().manual_seed(1)
        inputs = {
            name: (lambda f=torch.rand(pre.shape, generator=g): f) for name in ("fisher_pre", "fisher_finetuned")
        }
    tensor = MergedTensor("w", lambda: pre, (lambda: ft,), inputs=inputs)
    bound = bind(method, 1)
    alphas = [0.0, 0.3, 0.5, 1.0]
    whole = list(tensor.compute(alphas, bound))
    chunked = list(tensor.compute(alphas, bound, chunked=True))
    assert all(isinstance(c, ChunkedTensor) for c in chunked)
    for alpha, expected, lazy in zip(alphas, whole, chunked):
        got = materialize(lazy)
        assert got.dtype == expected.dtype == dtype and got.shape == expected.shape
        assert torch.equal(bits(got), bits(expected)), alpha
    assert torch.equal(bits(materialize(chunked[0])), bits(pre)) and torch.equal(
        bits(materialize(chunked[-1])), bits(ft)
    )


def test_a_method_not_declared_elementwise_gets_whole_tensors(tmp_path, monkeypatch):
    monkeypatch.setattr(chunked_module, "CHUNK_ELEMENTS", 64)
    seen = {}

    def record(name):
        def method(pre, finetuned, *, alpha, weights, scale):
            seen.setdefault(name, set()).add(tuple(pre.shape))
            return torch.lerp(pre.float(), finetuned[0].float(), alpha * scale)

        return method

    try:
        register_method("whole_only", formula="lerp", parameters={"scale": Parameter(1.0, "s")})(record("whole"))
        register_method("flat_ok", formula="lerp", parameters={"scale": Parameter(1.0, "s")}, elementwise=True)(
            record("flat")
        )
        pre, ft = pair(torch.float32, (30, 20))
        write_checkpoint(tmp_path / "pre", {"w": pre})
        write_checkpoint(tmp_path / "ft", {"w": ft})
        outputs = {}
        for name in ("whole_only", "flat_ok"):
            with pytest.warns(UserWarning, match="config.json"):
                out = merge(tmp_path / "pre", tmp_path / "ft", 0.4, tmp_path / name, MergeOptions(method=name))
            outputs[name] = load_file(out / "model.safetensors")["w"]
    finally:
        METHODS.pop("whole_only", None)
        METHODS.pop("flat_ok", None)
    assert seen["whole"] == {(30, 20)}
    assert seen["flat"] == {(64,), (600 - 9 * 64,)}  # flat chunks, the last one short
    assert torch.equal(outputs["whole_only"], outputs["flat_ok"])


def test_nan_in_a_later_chunk_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(chunked_module, "CHUNK_ELEMENTS", 100)
    pre, ft = pair(torch.float32, (30, 20))
    ft[29, 19] = float("nan")  # the very last element: the last chunk
    write_checkpoint(tmp_path / "pre", {"a": pre.clone(), "w": pre})
    write_checkpoint(tmp_path / "ft", {"a": pre.clone(), "w": ft})
    with pytest.warns(UserWarning, match="config.json"), pytest.raises(MergeError, match=r"w: .*alpha=0.5.*NaN"):
        wise_ft(tmp_path / "pre", tmp_path / "ft", 0.5, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft", "pre"]


def test_sweep_outputs_equal_separate_merges_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(chunked_module, "CHUNK_ELEMENTS", 1000)
    pre, ft = pair(torch.bfloat16, (123, 45))
    write_checkpoint(tmp_path / "pre", {"w": pre, "b": pre[0].clone()}, {"model_type": "x"})
    write_checkpoint(tmp_path / "ft", {"w": ft, "b": ft[0].clone()}, {"model_type": "x"})
    alphas = [0.0, 0.25, 0.5, 1.0]
    swept = wise_ft_sweep(tmp_path / "pre", tmp_path / "ft", alphas, tmp_path / "sweep")
    for alpha in alphas:
        single = wise_ft(tmp_path / "pre", tmp_path / "ft", alpha, tmp_path / f"one-{alpha}")
        assert (swept[alpha] / "model.safetensors").read_bytes() == (single / "model.safetensors").read_bytes()
    expected = torch.lerp(pre.float(), ft.float(), 0.25).to(torch.bfloat16)
    assert torch.equal(bits(load_file(swept[0.25] / "model.safetensors")["w"]), bits(expected))


def test_map_tensor_reads_each_tensor_as_safetensors_does_and_never_writes_the_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5, generator=g),
        "b": torch.randn(7, generator=g).to(torch.bfloat16),  # odd byte offsets after it
        "c": torch.arange(11, dtype=torch.int64),
        "d": torch.rand(2, 3, generator=g) > 0.5,
        "e": torch.tensor(2.5),
        "f": torch.zeros(0, 3),
        "g": torch.randn(5000, generator=g),  # spans a page boundary
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)
    before = path.read_bytes()
    checkpoint = Checkpoint(tmp_path)
    with safe_open(path, framework="pt") as reference:
        for key in tensors:
            got = checkpoint.get(key)
            assert got.dtype == tensors[key].dtype and got.shape == tensors[key].shape
            assert torch.equal(got, reference.get_tensor(key)), key
    mapped = checkpoint.get("g")
    mapped.mul_(0)  # copy-on-write: the tensor changes, the file does not
    assert path.read_bytes() == before and torch.equal(checkpoint.get("g"), tensors["g"])
    header_length = int.from_bytes(before[:8], "little")
    start, stop = json.loads(before[8 : 8 + header_length])["b"]["data_offsets"]
    direct = map_tensor(path, 8 + header_length + start, 8 + header_length + stop, torch.bfloat16, (7,))
    assert torch.equal(direct, tensors["b"])


def test_writer_double_buffering_gives_the_same_bytes_and_falls_back_at_a_later_write(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_module, "STAGING_BYTES", 2 * ALIGNMENT)
    g = torch.Generator().manual_seed(0)
    data = {"w": torch.randn(40, 129, generator=g), "v": torch.randn(3, 5, generator=g).to(torch.bfloat16)}

    def write(directory, direct):
        directory.mkdir()
        writer = ShardedWriter(directory, 10**9, "model", header_room(list(data)), direct=direct)
        for key, tensor in data.items():
            writer.add(key, tensor)
        return writer.close()[0].read_bytes()

    buffered = write(tmp_path / "buffered", direct=False)
    assert write(tmp_path / "direct", direct=True) == buffered
    original = writer_module._ShardFile._write_direct

    def failing_at(call, code):
        """`_write_direct` that raises `code` at its `call`-th call and writes otherwise; the calls are counted."""
        calls = []

        def write_direct(self, view):
            calls.append(len(view))
            if len(calls) == call:
                raise OSError(code, os.strerror(code))
            original(self, view)

        monkeypatch.setattr(writer_module._ShardFile, "_write_direct", write_direct)
        return calls

    calls = failing_at(3, errno.EINVAL)
    assert write(tmp_path / "later", direct=True) == buffered
    assert len(calls) == 3  # two written directly, the third refused, the rest through the page cache
    failing_at(2, errno.ENOSPC)  # a write in flight while the next buffer fills
    with pytest.raises(OSError, match="No space left"):
        write(tmp_path / "full", direct=True)


def test_a_merge_leaves_torchs_thread_settings_alone(tmp_path):
    """In a fresh process (no thread has run a parallel operation yet): after a merge, the caller and a new thread
    still get torch's default thread count (`torch.set_num_threads(1)` on a writer thread would change both)."""
    script = (
        "import sys, threading\n"
        "import torch\n"
        "from safetensors.torch import save_file\n"
        "from hf_specgen.merge import wise_ft\n"
        "out = sys.argv[1]\n"
        "for name in ('pre', 'ft'):\n"
        "    torch.manual_seed(len(name))\n"
        "    save_file({'w': torch.randn(600, 700)}, f'{out}/{name}.safetensors')\n"
        "import os, pathlib\n"
        "for name in ('pre', 'ft'):\n"
        "    os.makedirs(f'{out}/{name}')\n"
        "    pathlib.Path(f'{out}/{name}.safetensors').rename(f'{out}/{name}/model.safetensors')\n"
        "import warnings\n"
        "warnings.simplefilter('ignore')\n"
        "wise_ft(f'{out}/pre', f'{out}/ft', 0.5, f'{out}/merged')\n"
        "seen = []\n"
        "thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))\n"
        "thread.start(); thread.join()\n"
        "print(torch.get_num_threads(), seen[0])\n"
    )
    default = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"], capture_output=True, text=True
    ).stdout.split()
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, check=True)
    assert done.stdout.split() == default * 2
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_a_plain_merge_of_safetensors_checkpoints_does_not_import_transformers(opt, tmp_path):
    """The tied groups need the architecture (transformers' modeling code, seconds to import) only where a
    checkpoint lacks a key, stores .bin weights or a method input names a tied partner."""
    script = (
        "import sys\n"
        "from hf_specgen.merge import wise_ft\n"
        "wise_ft(sys.argv[1], sys.argv[2], 0.5, sys.argv[3], max_shard_size='3KB')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'accelerate')))\n"
    )
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-c", script, str(opt["pre"]), str(opt["ft"]), str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == "[]"
    merged = {}
    for file in out.glob("model-*.safetensors"):
        merged.update(load_file(file))
    assert set(merged) == set(opt["ft_sd"])  # the tied head once, as the inputs store it


def test_tied_groups_are_looked_up_only_where_needed(opt, tmp_path, monkeypatch):
    built = []
    original = plan_module.meta_model
    monkeypatch.setattr(plan_module, "meta_model", lambda directory: built.append(directory) or original(directory))
    wise_ft(opt["pre"], opt["ft"], 0.5, tmp_path / "plain")
    assert built == []
    ft_sd = dict(opt["ft_sd"])
    ft_sd["lm_head.weight"] = ft_sd["model.decoder.embed_tokens.weight"]
    missing = tmp_path / "ft_other_name"
    missing.mkdir()
    (missing / "config.json").write_text((opt["ft"] / "config.json").read_text())
    save_file(
        {k: v.contiguous() for k, v in ft_sd.items() if k != "model.decoder.embed_tokens.weight"},
        missing / "model.safetensors",
        metadata={"format": "pt"},
    )
    out = wise_ft(opt["pre"], missing, 0.5, tmp_path / "renamed")
    assert built  # a key the fine-tuned checkpoint stores under its tied partner's name
    assert "lm_head.weight" in load_file(out / "model.safetensors")


@pytest.mark.parametrize("size", ["5GB", "500MB", "3KB", "1MiB", "2GiB", "7KiB", "5Gb", "10kb", 123, "123", " 400MB "])
def test_shard_sizes_read_as_transformers_reads_them(size):
    from transformers.utils.hub import convert_file_size_to_int

    expected = convert_file_size_to_int(
        int(size) if isinstance(size, str) and size.isdigit() else size.strip() if isinstance(size, str) else size
    )
    assert check_shard_size(size) == expected


@pytest.mark.parametrize("size", ["abc", "0", "-5MB", "5XB", "1.5GB", "", 0, -3, 1.5, True, None])
def test_bad_shard_sizes_are_refused_by_name(size):
    with pytest.raises(
        MergeError,
        match=r"max_shard_size \(--max-shard-size\) must be a positive whole number of bytes, or a whole number and",
    ):
        check_shard_size(size)


def _rss(kind):
    line = next(line for line in open("/proc/self/status") if line.startswith(kind))
    return int(line.split()[1]) * 1024


def test_a_mapped_tensor_is_read_at_once_into_file_pages_not_copied(tmp_path):
    """`MADV_POPULATE_READ` maps the file's page-cache pages when the tensor is asked for: they count as file
    pages, the process's own memory does not grow by the tensor (as `MAP_POPULATE` on a private writable
    mapping would do: it copies every page to break copy-on-write), and reading the tensor faults no page in."""
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(8 * 2**20)}, path)  # 32 MB, in the page cache once written
    checkpoint = Checkpoint(tmp_path)
    anon, file = _rss("RssAnon"), _rss("RssFile")
    tensor = checkpoint.get("w")
    assert _rss("RssFile") - file > 30 * 2**20  # all of it mapped now
    assert _rss("RssAnon") - anon < 4 * 2**20
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    assert float(tensor[::1024].sum()) == 8 * 2**20 / 1024
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults < 64


def test_chunked_outputs_are_computed_by_the_compute_threads_and_written_in_order():
    """`add_outputs`: every output's chunk of one slice in turn, computed on the compute threads with one torch
    thread each; each writer gets `begin` and then its chunks in order, on its own thread; whole tensors go to
    `add` as before; afterwards torch's thread count is the caller's again, for it and for new threads."""
    import threading

    from hf_specgen.merge.writer import ConcurrentWriters

    computed, caller, threads = [], threading.get_ident(), torch.get_num_threads()

    class Recording:
        def __init__(self):
            self.calls, self.threads = [], set()

        def begin(self, key, dtype, shape):
            self.calls.append(("begin", key, dtype, shape))

        def write(self, piece):
            self.threads.add(threading.get_ident())
            self.calls.append(("write", piece.view(torch.float32).tolist()))

        def add(self, key, tensor):
            self.calls.append(("add", key))

        def close(self):
            pass

        def abort(self):
            pass

    def output(scale):
        def compute(start, stop):
            current = threading.current_thread()
            computed.append((scale, start, current.ident, current.name, torch.get_num_threads()))
            return torch.arange(start, stop, dtype=torch.float32) * scale

        return ChunkedTensor((2, 3), torch.float32, compute, chunk_elements=4)

    writers = [Recording(), Recording()]
    concurrent = ConcurrentWriters(writers, max_pending=1)
    concurrent.add_outputs("w", iter([output(1.0), output(10.0)]))
    concurrent.add_outputs("b", iter([torch.zeros(1), torch.ones(1)]))
    concurrent.close()
    assert sorted((scale, start) for scale, start, *_ in computed) == [(1.0, 0), (1.0, 4), (10.0, 0), (10.0, 4)]
    assert all(ident != caller and name.startswith("specgen-compute") for _, _, ident, name, _ in computed)
    assert {count for *_, count in computed} == {1}
    for writer, scale in zip(writers, (1.0, 10.0)):
        assert writer.calls == [
            ("begin", "w", torch.float32, (2, 3)),
            ("write", [0.0, scale, 2 * scale, 3 * scale]),
            ("write", [4 * scale, 5 * scale]),
            ("add", "b"),
        ]
        assert caller not in writer.threads
        assert not writer.threads & {ident for _, _, ident, *_ in computed}
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert torch.get_num_threads() == threads and seen == [threads]


def test_a_chunk_that_fails_to_compute_stops_the_writers_and_restores_torchs_threads():
    """A chunk's error (here the third of one output) is raised by the caller's `add_outputs` or `close`; the
    chunks after it are not written, and `abort` leaves torch's thread count as the caller had it."""
    from hf_specgen.merge.writer import ConcurrentWriters

    previous = torch.get_num_threads()
    torch.set_num_threads(2)  # a pool of two compute threads, whatever the machine
    try:

        class Recording:
            def __init__(self):
                self.written, self.aborted = [], False

            def begin(self, key, dtype, shape):
                pass

            def write(self, piece):
                self.written.append(piece.view(torch.float32)[0].item())

            def close(self):
                pass

            def abort(self):
                self.aborted = True

        def compute(start, stop):
            if start == 8:
                raise ValueError("chunk 3 cannot be computed")
            return torch.arange(start, stop, dtype=torch.float32)

        writer = Recording()
        concurrent = ConcurrentWriters([writer], max_pending=1, max_pending_bytes=16)
        with pytest.raises(ValueError, match="chunk 3 cannot be computed"):
            concurrent.add_outputs("w", iter([ChunkedTensor((64,), torch.float32, compute, chunk_elements=4)]))
            concurrent.close()
        concurrent.abort()
        assert writer.written == [0.0, 4.0] and writer.aborted
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def test_without_openmp_one_thread_computes_and_torchs_thread_count_is_left_alone(monkeypatch):
    """torch's native thread pool (no OpenMP) takes its size once per process: the pool then has one compute
    thread and never calls `torch.set_num_threads`."""
    import threading

    from hf_specgen.merge.writer import ConcurrentWriters

    monkeypatch.setattr(torch.backends.openmp, "is_available", lambda: False)
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    names = set()

    class Recording:
        written = []

        def begin(self, key, dtype, shape):
            pass

        def write(self, piece):
            self.written.append(piece.view(torch.float32).tolist())

        def close(self):
            pass

    def compute(start, stop):
        names.add(threading.current_thread().name)
        return torch.arange(start, stop, dtype=torch.float32)

    writer = Recording()
    concurrent = ConcurrentWriters([writer])
    concurrent.add_outputs("w", iter([ChunkedTensor((10,), torch.float32, compute, chunk_elements=4)]))
    concurrent.close()
    assert writer.written == [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0], [8.0, 9.0]]
    assert calls == [] and names == {"specgen-compute_0"}
