"""What a merge refuses and what it never touches: its inputs, other people's files, half-written
output after an error or a signal; and the one-line errors and exit codes of `specgen`."""

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import huggingface_hub
import pytest
import torch
from merge_helpers import PicklePayload, expect_usage_error, fail_after, leftovers, merge_args, run

from hf_specgen.cli import main
from hf_specgen.merge import MergeError, wise_ft, wise_ft_sweep
from hf_specgen.merge.checkpoint import Checkpoint
from hf_specgen.merge.writer import ShardedWriter


MARKER = "specgen_merge.json"


def tree(directory):
    """Every file and directory under `directory`, with a digest of each file's bytes."""
    directory = Path(directory)
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(directory.rglob("*"))
    }


@pytest.fixture
def project(opt, tmp_path):
    """`proj/` holding the pre-trained and the fine-tuned model, as users lay out their runs."""
    root = tmp_path / "proj"
    shutil.copytree(opt["pre"], root / "pre")
    shutil.copytree(opt["ft"], root / "ft")
    return root


# ---- item 17: --overwrite never reaches an input, and replaces only a previous merge --------------


def test_output_that_is_contains_or_lies_inside_an_input_is_refused(project, tmp_path):
    (tmp_path / "link").symlink_to(project / "ft")
    before = tree(tmp_path)
    pre, ft = project / "pre", project / "ft"
    for output, what in [(project, "contains"), (ft, "is"), (ft / "merged", "lies inside"), (tmp_path / "link", "is")]:
        for overwrite in (True, "any"):
            with pytest.raises(MergeError, match=re.escape(f"{output}: the output directory {what} the input")):
                wise_ft(pre, ft, 0.5, output, overwrite=overwrite)
            with pytest.raises(MergeError, match=re.escape(str(output))):
                wise_ft_sweep(pre, ft, [0.0, 1.0], output, overwrite=overwrite)
    assert tree(tmp_path) == before


def test_cli_refuses_to_overwrite_its_inputs(project, tmp_path, capsys):
    before = tree(tmp_path)
    pre, ft = project / "pre", project / "ft"
    expect_usage_error(
        ["sweep", "--pretrained", pre, "--finetuned", ft, "--alphas", "0,1", "--output-dir", project, "--overwrite"],
        capsys,
        f"specgen: error: {project}: the output directory contains the input {pre}",
    )
    expect_usage_error(
        ["merge", "--pretrained", pre, "--finetuned", ft, "--alpha", "0.5", "--output-dir", ft, "--overwrite-any"],
        capsys,
        f"specgen: error: {ft}: the output directory is the input {ft}",
    )
    assert tree(tmp_path) == before


def test_a_hub_id_protects_the_hugging_face_cache(opt, tmp_path, monkeypatch):
    cache = tmp_path / "hub-cache"
    (cache / "models--me--model").mkdir(parents=True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    for output in (cache, cache / "models--me--model", tmp_path):
        with pytest.raises(MergeError, match=re.escape(f"{output}: the output directory")) as error:
            wise_ft("me/model", opt["ft"], 0.5, output, overwrite="any")
        assert "Hugging Face cache" in str(error.value)
    assert [p.name for p in cache.iterdir()] == ["models--me--model"]


def test_overwrite_replaces_a_previous_merge_or_an_empty_directory_only(opt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for call in (
        lambda o: wise_ft(opt["pre"], opt["ft"], 0.5, out, overwrite=o),
        lambda o: wise_ft_sweep(opt["pre"], opt["ft"], [0.5], out, overwrite=o),
    ):
        with pytest.raises(MergeError, match=re.escape(f"{out}: already exists")):
            call(False)
        with pytest.raises(MergeError, match=re.escape(f"{out}: not written by a merge (no {MARKER})")):
            call(True)
    assert tree(out) == {"keep.txt": hashlib.sha256(b"mine").hexdigest()}

    wise_ft(opt["pre"], opt["ft"], 0.5, out, overwrite="any")  # the stronger flag replaces anything
    marker = json.loads((out / MARKER).read_text())
    assert marker["pretrained"] == str(opt["pre"]) and marker["finetuned"] == str(opt["ft"]) and marker["alpha"] == 0.5
    wise_ft_sweep(opt["pre"], opt["ft"], [0.0, 1.0], out, overwrite=True)  # a previous merge: replaced
    assert sorted(p.name for p in out.iterdir()) == ["alpha-0", "alpha-1", MARKER]
    assert json.loads((out / MARKER).read_text())["alphas"] == [0.0, 1.0]
    wise_ft(opt["pre"], opt["ft"], 0.25, out / "alpha-1", overwrite=True)  # one alpha of a sweep: a merge too
    assert json.loads((out / "alpha-1" / MARKER).read_text())["alpha"] == 0.25
    empty = tmp_path / "empty"
    empty.mkdir()
    wise_ft(opt["pre"], opt["ft"], 0.5, empty, overwrite=True)
    assert (empty / "model.safetensors").is_file() and leftovers(tmp_path) == []
    with pytest.raises(MergeError, match="overwrite must be"):
        wise_ft(opt["pre"], opt["ft"], 0.5, empty, overwrite="yes")


def test_cli_overwrite_and_overwrite_any(opt, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    expect_usage_error(
        merge_args(opt, out, "0.3", "--overwrite"),
        capsys,
        f"specgen: error: {out}: not written by a merge",
        "--overwrite-any",
    )
    assert (out / "keep.txt").read_text() == "mine"
    assert run(merge_args(opt, out, "0.3", "--overwrite-any")) == 0
    assert not (out / "keep.txt").exists() and (out / MARKER).is_file()
    assert run(merge_args(opt, out, "0.6", "--overwrite")) == 0
    assert json.loads((out / MARKER).read_text())["alpha"] == 0.6
    capsys.readouterr()
    assert run(["merge", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert (
        f"--overwrite replace OUTPUT_DIR if a previous merge wrote it (it holds {MARKER}) or it is empty:"
        " everything in it is removed" in help_text
    )
    assert "never an input" in help_text


# ---- item 21: permissions from the umask; nothing stray after replacing --------------------------


@pytest.mark.parametrize("umask, directories, files", [(0o027, 0o750, 0o640), (0o002, 0o775, 0o664)])
def test_merged_directories_and_files_follow_the_umask(opt, tmp_path, umask, directories, files):
    previous = os.umask(umask)
    try:
        out = wise_ft(opt["pre"], opt["ft"], 0.5, tmp_path / "out", max_shard_size="4KB")
        outs = wise_ft_sweep(opt["pre"], opt["ft"], [0.0, 1.0], tmp_path / "sweep")
    finally:
        os.umask(previous)
    for directory in (out, tmp_path / "sweep", *outs.values()):
        assert directory.stat().st_mode & 0o777 == directories, directory
    for file in [*out.iterdir(), *outs[0.0].iterdir()]:  # shards (written with O_DIRECT where it can), side files
        assert file.stat().st_mode & 0o777 == files, file


def test_overwrite_any_replaces_a_file_and_leaves_nothing_beside(opt, tmp_path):
    out = tmp_path / "out"
    out.write_text("a file, not a merge")
    with pytest.raises(MergeError, match=re.escape(f"{out}: not written by a merge")):
        wise_ft(opt["pre"], opt["ft"], 0.5, out, overwrite=True)
    assert out.read_text() == "a file, not a merge"
    wise_ft(opt["pre"], opt["ft"], 0.5, out, overwrite="any")
    assert out.is_dir() and (out / MARKER).is_file()
    wise_ft(opt["pre"], opt["ft"], 0.7, out, overwrite=True)  # a directory replaced: nothing beside either
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---- item 18: SIGTERM cleans up as Ctrl-C does; what kill -9 leaves, the next merge removes ---------


@pytest.fixture
def slow_merge(opt, tmp_path):
    """Starts `specgen merge ... --output-dir OUT` in a process of its own (forked: no second import
    of torch), which stops at its first tensor read, its temporary directory made; returns once it
    is there. Its stderr goes to a file. Killed at the end if still running."""
    children = []

    def start(out):
        ready, said_ready = os.pipe()
        stderr = tmp_path / f"stderr-{out.name}"
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 100
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as in a fresh `specgen` process
                os.dup2(os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
                sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 - pytest's capture replaced it

                def get(self, key):
                    os.write(said_ready, b"w")
                    time.sleep(60)

                Checkpoint.get = get
                code = main([str(a) for a in merge_args(opt, out)])
            except BaseException:  # noqa: BLE001 - reported through the exit code and the stderr file
                traceback.print_exc()
                code = 101
            finally:
                os._exit(code)
        children.append(pid)
        os.close(said_ready)
        assert os.read(ready, 1) == b"w", stderr.read_text()  # EOF: the child ended before writing
        os.close(ready)
        return pid, stderr

    yield start
    for pid in children:
        with contextlib.suppress(ChildProcessError, ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def wait_status(pid, timeout=30):
    """The exit code `subprocess` would report: -N for a signal N."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    raise AssertionError(f"process {pid} still running after {timeout} s")


def test_sigterm_cleans_up_and_what_kill_9_leaves_the_next_merge_removes(opt, tmp_path, slow_merge):
    parent = tmp_path / "outputs"
    (killed, _), (terminated, stderr) = slow_merge(parent / "a"), slow_merge(parent / "b")  # both writing
    os.kill(killed, signal.SIGKILL)
    assert wait_status(killed) == -signal.SIGKILL
    (partial_a,) = [p for p in parent.iterdir() if p.name.startswith(".a.")]
    (partial_b,) = [p for p in parent.iterdir() if p.name.startswith(".b.")]
    assert partial_a.is_dir() and partial_b.is_dir()
    wise_ft(opt["pre"], opt["ft"], 0.5, parent / "c")  # the next merge into the same parent
    assert not partial_a.exists() and partial_b.is_dir()  # the dead one's partial removed, the live one's kept
    os.kill(terminated, signal.SIGTERM)
    assert wait_status(terminated) == -signal.SIGTERM  # as the default handler ends it: the shell says 143
    assert "Traceback" not in stderr.read_text()
    assert sorted(p.name for p in parent.iterdir()) == ["c"]


class Stop(Exception):
    pass


def reading_raises_signal(monkeypatch, signum):
    """The first tensor read sends `signum`; the exception its handler raises comes out of the reader as a
    ValueError, as safetensors' C code turns an exception raised inside it into another one."""
    original_get = Checkpoint.get

    def get(self, key):
        if not getattr(get, "sent", False):
            get.sent = True
            try:
                signal.raise_signal(signum)
            except BaseException:
                raise ValueError(
                    "could not determine the shape of object type 'torch.storage.UntypedStorage'"
                ) from None
        return original_get(self, key)

    monkeypatch.setattr(Checkpoint, "get", get)


def test_sigterm_turned_into_another_error_inside_c_code_is_still_a_sigterm(opt, tmp_path, monkeypatch):
    """It came out as a bad-input error (exit 2) in 5 of 50 `timeout`s of a sweep."""
    calls = []
    reading_raises_signal(monkeypatch, signal.SIGTERM)
    before = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        with pytest.raises(BaseException) as info:
            wise_ft_sweep(opt["pre"], opt["ft"], [0.25, 0.75], tmp_path / "out")
    finally:
        signal.signal(signal.SIGTERM, before)
    assert calls == [signal.SIGTERM]  # delivered to the previous handler, after the clean-up
    assert type(info.value).__name__ == "Terminated" and list(tmp_path.iterdir()) == []


def test_ctrl_c_is_one_line_exit_130_and_leaves_nothing(opt, tmp_path, monkeypatch, capsys):
    """Ctrl-C printed a 20-line traceback and exited 1; inside C code it could even read as bad input."""
    # Python's own SIGINT handler, whatever the session inherited or an earlier test left (ignored SIGINT
    # stays ignored by design, and then there is no Ctrl-C to test)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        check_ctrl_c(opt, tmp_path, monkeypatch, capsys)
    finally:
        signal.signal(signal.SIGINT, before)


def check_ctrl_c(opt, tmp_path, monkeypatch, capsys):
    reading_raises_signal(monkeypatch, signal.SIGINT)
    assert run(merge_args(opt, tmp_path / "out")) == 130
    captured = capsys.readouterr()
    assert captured.err == "specgen: interrupted\n" and list(tmp_path.iterdir()) == []


def test_sigterm_while_the_replaced_output_is_removed_waits_for_it(opt, tmp_path, monkeypatch):
    """A SIGTERM while --overwrite's old output is deleted left a half-deleted `.old` directory: now the
    signal waits until the new output is in place and the old one gone, then reaches its handler."""
    import hf_specgen.atomic as atomic

    out = tmp_path / "out"
    wise_ft(opt["pre"], opt["ft"], 0.3, out)
    calls, original_remove = [], atomic.remove_path

    def remove_path(path):
        if path.name.endswith(".old") and not calls:
            signal.raise_signal(signal.SIGTERM)
        original_remove(path)

    monkeypatch.setattr(atomic, "remove_path", remove_path)
    before = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        wise_ft(opt["pre"], opt["ft"], 0.7, out, overwrite=True)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert calls == [signal.SIGTERM]
    assert (
        sorted(p.name for p in tmp_path.iterdir()) == ["out"]
        and json.loads((out / MARKER).read_text())["alpha"] == 0.7
    )


def test_sigterm_in_process_reaches_the_previous_handler_after_cleanup(opt, tmp_path, monkeypatch):
    calls = []

    def previous(signum, frame):
        calls.append(signum)
        raise Stop

    original_get = Checkpoint.get

    def get(self, key):
        if len(calls) == 0 and not getattr(get, "sent", False):
            get.sent = True
            assert list(tmp_path.iterdir())  # the temporary directory is there
            signal.raise_signal(signal.SIGTERM)
        return original_get(self, key)

    monkeypatch.setattr(Checkpoint, "get", get)
    before = signal.signal(signal.SIGTERM, previous)
    try:
        with pytest.raises(Stop):
            wise_ft(opt["pre"], opt["ft"], 0.5, tmp_path / "out")
        assert calls == [signal.SIGTERM] and list(tmp_path.iterdir()) == []
        assert signal.getsignal(signal.SIGTERM) is previous  # restored
        monkeypatch.undo()
        thread = threading.Thread(target=wise_ft, args=(opt["pre"], opt["ft"], 0.5, tmp_path / "thread"))
        thread.start()
        thread.join()  # no handler can be installed outside the main thread: merged all the same
        assert (tmp_path / "thread" / MARKER).is_file()
    finally:
        signal.signal(signal.SIGTERM, before)


# ---- item 20: a write failure is one line naming the output, exit 1, nothing left behind -----------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS], ids=["disk_full", "read_only"])
def test_write_failure_is_one_line_exit_1_and_leaves_nothing(opt, tmp_path, capsys, monkeypatch, code):
    parent = tmp_path / "outputs"
    parent.mkdir()
    if code == errno.ENOSPC:  # the disk fills up after a few tensors
        fail_after(monkeypatch, ShardedWriter, "begin", 3, OSError(code, os.strerror(code)))
    else:  # the parent refuses new directories (chmod would not stop root)
        original = os.mkdir

        def mkdir(path, *args, **kwargs):
            if Path(path).parent == parent:
                raise OSError(code, os.strerror(code), str(path))
            return original(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)
    for argv, out in [
        (merge_args(opt, parent / "out"), parent / "out"),
        (
            [
                "sweep",
                "--pretrained",
                opt["pre"],
                "--finetuned",
                opt["ft"],
                "--alphas",
                "0.2,0.8",
                "--output-dir",
                parent / "sweep",
            ],
            parent / "sweep",
        ),
    ]:
        assert run(argv) == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err == f"specgen: error: {out}: cannot write the merge: {os.strerror(code)}\n"
        assert list(parent.iterdir()) == []


# ---- item 19: corrupt or missing input is one line naming the file, exit 2, nothing written ---------


def corrupt(opt, root, case):
    """A copy of the fine-tuned model (or an adapter) broken as `case` says: (its directory, the bad file)."""
    ft = root / "ft"
    shutil.copytree(opt["ft_sharded" if case.startswith("index") else "ft"], ft)
    index = ft / "model.safetensors.index.json"
    if case == "truncated_shard":
        bad = ft / "model.safetensors"
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    elif case == "index_missing_shard":
        bad = index
        (ft / json.loads(index.read_text())["weight_map"]["model.decoder.final_layer_norm.weight"]).unlink()
    elif case == "index_without_weight_map":
        bad = index
        index.write_text(json.dumps({"metadata": {"total_size": 1}}))
    elif case == "index_malformed":
        bad = index
        index.write_text('{"weight_map": {"a": ')
    elif case == "config_malformed":
        bad = ft / "config.json"
        bad.write_text("{'model_type': 'opt'}")
    elif case == "adapter_config_malformed":
        bad = ft / "adapter_config.json"
        bad.write_text("{")
    else:  # a .bin instead of the safetensors
        (ft / "model.safetensors").unlink()
        bad = ft / "pytorch_model.bin"
        state = {"model.decoder.final_layer_norm.weight": torch.zeros(16)}
        if case == "bin_legacy":
            torch.save(state, bad, _use_new_zipfile_serialization=False)
        else:
            torch.save({**state, "x": PicklePayload(str(root / "pwned"))}, bad)
    return ft, bad


@pytest.mark.parametrize(
    "case, what",
    [
        ("truncated_shard", "not a readable safetensors file"),
        ("index_missing_shard", "names model-0000"),
        ("index_without_weight_map", "no weight_map"),
        ("index_malformed", "malformed JSON"),
        ("config_malformed", "malformed JSON"),
        ("adapter_config_malformed", "malformed JSON"),
        ("bin_legacy", "legacy"),
        ("bin_pickled", "pickled objects"),
    ],
)
def test_corrupt_input_is_one_line_naming_the_file(opt, tmp_path, capsys, case, what):
    ft, bad = corrupt(opt, tmp_path, case)
    out = tmp_path / "outputs" / "out"
    err = expect_usage_error(
        ["merge", "--pretrained", opt["pre"], "--finetuned", ft, "--alpha", "0.5", "--output-dir", out],
        capsys,
        f"specgen: error: {bad}: ",
        what,
    )
    assert err.count("\n") == 1 and "Traceback" not in err and "weights_only=False" not in err
    if case.startswith("bin"):
        assert "convert it to safetensors with a tool you trust" in err
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "pwned").exists()


# ---- item 23: --max-shard-size checked first, positive -----------------------------------------------


@pytest.mark.parametrize("size", ["abc", "0", "-5GB", "0GB", 0, -1, True, "1.5GB"])
def test_bad_max_shard_size_is_refused_before_anything(opt, tmp_path, capsys, size):
    # the inputs do not exist: the size is checked before they are looked for
    with pytest.raises(
        MergeError,
        match=re.escape(
            "max_shard_size (--max-shard-size) must be a positive whole number of bytes, or a whole number and a "
            f"unit (KB, MB, GB, TB, KiB, MiB, GiB, TiB) such as 5GB or 500MB, got {size!r}"
        ),
    ):
        wise_ft(tmp_path / "nope", tmp_path / "nada", 0.5, tmp_path / "out", max_shard_size=size)
    with pytest.raises(MergeError, match="max_shard_size"):
        wise_ft_sweep(tmp_path / "nope", tmp_path / "nada", [0.5], tmp_path / "out", max_shard_size=size)
    if isinstance(size, str):
        expect_usage_error(
            merge_args(opt, tmp_path / "out", "0.5", f"--max-shard-size={size}"),
            capsys,
            "specgen: error: max_shard_size (--max-shard-size) must be a positive whole number",
            repr(size),
        )
    assert list(tmp_path.iterdir()) == []
    assert (
        wise_ft(opt["pre"], opt["ft"], 0.5, tmp_path / "bytes", max_shard_size=3000) / "model.safetensors.index.json"
    ).is_file()


def test_missing_input_directory_is_one_line_naming_it(opt, tmp_path, capsys):
    missing = tmp_path / "runs" / "checkpoint-500"
    err = expect_usage_error(
        [
            "merge",
            "--pretrained",
            opt["pre"],
            "--finetuned",
            missing,
            "--alpha",
            "0.5",
            "--output-dir",
            tmp_path / "out",
        ],
        capsys,
        f"specgen: error: {missing}: no such directory",
    )
    assert "Repo id" not in err and "PosixPath" not in err
    with pytest.raises(MergeError, match=re.escape("me/not-here: cannot find it as a local directory or on the Hub")):
        wise_ft(opt["pre"], "me/not-here", 0.5, tmp_path / "out")  # offline here


def test_finetuned_without_config_takes_the_pretrained_config_and_says_so(opt, tmp_path):
    """It wrote an output without config.json, which from_pretrained cannot load, and said nothing."""
    bare = tmp_path / "bare"
    shutil.copytree(opt["ft"], bare)
    (bare / "config.json").unlink()
    with pytest.warns(UserWarning, match=re.escape(f"{bare}: no config.json; the output takes {opt['pre']}'s")):
        out = wise_ft(opt["pre"], bare, 0.5, tmp_path / "out")
    assert (out / "config.json").read_bytes() == (Path(opt["pre"]) / "config.json").read_bytes()


def test_output_under_a_file_and_a_directory_that_is_no_merge_say_what_to_do(opt, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    err = expect_usage_error(
        merge_args(opt, tmp_path / "file" / "out"), capsys, f"{tmp_path / 'file'} is a file, not a directory"
    )
    assert "cannot write" not in err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    expect_usage_error(
        merge_args(opt, tmp_path / "mine"),
        capsys,
        "already exists and is not a merge's output; pass overwrite='any' (--overwrite-any) to replace it",
    )


def test_max_shard_size_in_plain_bytes(opt, tmp_path, capsys):
    assert run(merge_args(opt, tmp_path / "out", "0.5", "--max-shard-size", "2000")) == 0
    assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 1


def test_eval_of_a_missing_or_corrupt_model_is_one_line(opt, tmp_path, capsys):
    """`specgen eval` printed lm-eval's traceback for a truncated shard, the Hub's repo-id complaint for a path."""
    evaluate = [
        "eval",
        "--suite",
        "tiny_general",
        "--suite",
        "tiny_medmcqa",
        "--method",
        "full",
        "--output",
        tmp_path / "r.json",
    ]
    expect_usage_error(
        [*evaluate, "--model", tmp_path / "nothere"],
        capsys,
        f"{tmp_path / 'nothere'}: no such directory (nor a Hub id)",
    )
    broken = tmp_path / "broken"
    shutil.copytree(opt["ft"], broken)
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:100])
    err = expect_usage_error([*evaluate, "--model", broken], capsys, str(broken / "model.safetensors"))
    assert "Traceback" not in err and not (tmp_path / "r.json").exists()
