"""Writing a directory or a file all at once: under a temporary name beside it, renamed to it at the end.

Used by every output that a crash must not leave half-written: merges, Fisher files, evaluation
results, early-stopping checkpoints, recipe samples.

The temporary directory is created like any directory (its permissions follow the umask) and
removed if the writing fails, is interrupted (Ctrl-C) or terminated: SIGTERM, which `timeout`,
Slurm and `docker stop` send, and SIGINT are turned into exceptions for the time of the write (in
the main thread), so that the same clean-up runs, and remembered (an exception raised inside C
code may come out as another one); the signal is then delivered again to the handler that was
there before: SIGTERM's default ends the process (exit status 128 + 15), SIGINT's raises
KeyboardInterrupt. While the finished output is put in place and what it replaces removed, a
signal only waits, so that neither is left half-deleted.

Nothing can clean up after `kill -9`: temporary names carry their owner,
`.<name>.<random>.<pid>@<host>.partial` (`.old` for what is being replaced), and the next write
into the same parent removes those of a process of this host that no longer exists.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import secrets
import shutil
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any


_OWNED = re.compile(r"\..+\.[0-9a-f]{8}\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]+)\.(partial|old)")


class AtomicWriteError(OSError):
    """Writing an output failed (disk full, read-only file system, permissions): nothing was left
    behind, and an output it was to replace is intact. Its message starts with the output path."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class Terminated(BaseException):
    """SIGTERM received while a directory was being written (raised in the main thread only)."""


@functools.cache
def _host() -> str:
    """This machine, as temporary names spell it: a pid means nothing on another one, nor in another
    pid namespace (a container sharing the host name), whose number is added where Linux says it."""
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "host"
    with contextlib.suppress(OSError):
        host += f"-{os.stat('/proc/self/ns/pid').st_ino}"
    return host


def _temporary_name(name: str, kind: str) -> str:
    return f".{name}.{secrets.token_hex(4)}.{os.getpid()}@{_host()}.{kind}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_path(path: Path) -> None:
    """Removes a directory tree, a file or a symlink (not its target), if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_abandoned(parent: Path) -> list[Path]:
    """Removes the temporary directories in `parent` left by writes whose process is gone (killed
    with SIGKILL, or the machine crashed); never one of a live process, nor one of another host.

    Returns:
        What was removed.
    """
    removed = []
    with contextlib.suppress(OSError):
        for entry in parent.iterdir():
            match = _OWNED.fullmatch(entry.name)
            if match and match["host"] == _host() and not _alive(int(match["pid"])):
                remove_path(entry)
                removed.append(entry)
    return removed


class _Signals:
    """SIGTERM and SIGINT while a directory is written: each raises in the main thread (`Terminated`,
    `KeyboardInterrupt`) so that the clean-up runs, and is remembered, because C code (safetensors'
    readers) may turn an exception raised inside it into another one. Once the output is being put
    in place (`finishing`), they are only remembered: the replaced output is removed whole, then
    the signal is delivered."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.finishing = False

    def handler(self, signum: int, frame: object) -> None:
        first = self.received is None
        self.received = self.received or signum
        if first and not self.finishing:  # once: a second signal must not interrupt the clean-up
            raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(f"signal {signum}")

    def deliver(self, previous: dict[int, object], error: BaseException | None) -> None:
        """After the clean-up: a received signal goes to the handler that was there before (SIGTERM's
        default ends the process with 128 + 15; SIGINT's raises KeyboardInterrupt)."""
        if self.received is None:
            return
        if self.received == signal.SIGINT and callable(previous[signal.SIGINT]):
            raise KeyboardInterrupt from error
        signal.raise_signal(self.received)  # a default or Python handler runs here
        if error is not None and not isinstance(error, (Terminated, KeyboardInterrupt)):
            raise Terminated(f"signal {self.received}") from error


@contextlib.contextmanager
def _signals_clean_up() -> Iterator[_Signals]:
    """SIGTERM and SIGINT in the block run its clean-up, then reach the previous handlers (main thread only)."""
    state = _Signals()
    caught = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.getsignal(s) for s in caught}
    if threading.current_thread() is not threading.main_thread():
        yield state  # handlers belong to the main thread
        return
    for s in caught:
        if previous[s] not in (signal.SIG_IGN, None):  # an ignored signal stays ignored
            signal.signal(s, state.handler)
    error: BaseException | None = None
    try:
        yield state
    except BaseException as raised:
        error = raised
        if state.received is None:
            raise
    finally:
        for s in caught:
            signal.signal(s, previous[s])
    state.deliver(previous, error)
    if error is not None:
        raise error


@contextlib.contextmanager
def atomic_directory(
    output_dir: Path, *, replace: bool = True, what: str = "it", error: type[OSError] = AtomicWriteError
) -> Iterator[Path]:
    """A new directory beside `output_dir`, renamed to it (replacing what is there) only if the
    block succeeds; removed otherwise, SIGTERM included.

    Args:
        output_dir: the directory to write; its parent is created if needed, and cleared of the
            temporary directories of dead writes (`remove_abandoned`).
        replace: False to keep a directory already at `output_dir` when the block ends (another process
            wrote the same output first, e.g. DDP ranks filling a cache): the new one is then removed.
        what: what is written, as the error message names it (`<output_dir>: cannot write <what>: ...`).
        error: the `OSError` class raised when writing fails (e.g. `MergeWriteError`).

    Returns:
        (yields) the temporary directory to write into.

    Raises:
        AtomicWriteError: (`error`) an `OSError` while writing (disk full, read-only...), naming `output_dir`.
    """
    try:
        with _atomic(output_dir, replace) as temporary:
            yield temporary
    except OSError as raised:
        raise _write_error(raised, output_dir, what, error) from raised


@contextlib.contextmanager
def distributed_atomic_directory(output_dir: Path, **kwargs: Any) -> Iterator[Path]:
    """`atomic_directory` for a write that every process of a distributed run takes part in (a ZeRO-3
    save gathers the weights): the main process owns the temporary directory and renames it into
    place; every process writes into it, and all wait until it is in place. Without a distributed
    run it is `atomic_directory`.

    Args:
        output_dir: the directory to write, as `atomic_directory`'s.
        **kwargs: `atomic_directory`'s other arguments (`replace`, `what`, `error`).

    Returns:
        (yields) the temporary directory to write into, the same path in every process.
    """
    from accelerate import PartialState  # not at import: `specgen --help` loads no torch
    from accelerate.utils import broadcast_object_list

    state = PartialState()
    with contextlib.ExitStack() as stack:
        temporary = [stack.enter_context(atomic_directory(output_dir, **kwargs)) if state.is_main_process else None]
        broadcast_object_list(temporary)
        yield temporary[0]
    state.wait_for_everyone()


def _write_error(raised: OSError, path: Path, what: str, error: type[OSError]) -> OSError:
    """`<path>: cannot write <what>: <reason>`, the file the reason is about added unless it is a temporary name."""
    reason = raised.strerror or str(raised)
    if raised.filename and not str(raised.filename).startswith(str(path.parent / f".{path.name}.")):
        reason += f" ({raised.filename})"  # an input's file, or the parent: a temporary name would say nothing
    return error(raised.errno, f"{path}: cannot write {what}: {reason}")


@contextlib.contextmanager
def _atomic(output_dir: Path, replace: bool) -> Iterator[Path]:
    parent = output_dir.parent
    with _signals_clean_up() as signals:
        parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned(parent)
        temporary = parent / _temporary_name(output_dir.name, "partial")
        temporary.mkdir()  # mode 0o777 less the umask, as any directory (mkdtemp's would be 0o700)
        old = None
        try:
            yield temporary
            signals.finishing = True  # from here on a signal waits for the output to be in place
            if replace and os.path.lexists(output_dir):
                old = parent / _temporary_name(output_dir.name, "old")
                os.rename(output_dir, old)
            try:
                os.rename(temporary, output_dir)
            except OSError:
                if replace or not os.path.isdir(output_dir):
                    raise  # else another process's directory is there (not empty): it stays, this one goes
        finally:
            signals.finishing = True  # the clean-up is not interrupted either
            if old is not None and os.path.lexists(old) and not os.path.lexists(output_dir):
                os.rename(old, output_dir)  # interrupted between the two renames: the previous output stays
            for leftover in (temporary, old):
                if leftover is not None:
                    remove_path(leftover)


@contextlib.contextmanager
def atomic_file(path: Path, *, what: str = "it", error: type[OSError] = AtomicWriteError) -> Iterator[Path]:
    """A temporary path beside `path` to write one file to, renamed to `path` (replacing it) only if
    the block succeeds; removed otherwise, SIGTERM included (as `atomic_directory`).

    Args:
        path: the file to write; its parent is created if needed (and cleared as `atomic_directory`'s).
        what: what is written, as the error message names it (`<path>: cannot write <what>: ...`).
        error: the `OSError` class raised when writing fails (e.g. `MergeWriteError`).

    Returns:
        (yields) the temporary path to write the file to.

    Raises:
        AtomicWriteError: (`error`) an `OSError` while writing, naming `path`.
    """
    parent = path.parent
    try:
        with _signals_clean_up() as signals:
            parent.mkdir(parents=True, exist_ok=True)
            remove_abandoned(parent)
            temporary = parent / _temporary_name(path.name, "partial")
            try:
                yield temporary
                signals.finishing = True
                os.replace(temporary, path)
            finally:
                signals.finishing = True
                remove_path(temporary)
    except OSError as raised:
        raise _write_error(raised, path, what, error) from raised
