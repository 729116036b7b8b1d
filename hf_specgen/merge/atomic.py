"""Writing a directory all at once: under a temporary name beside it, renamed to it at the end.

The temporary directory is created like any directory (its permissions follow the umask) and
removed if the writing fails. What the new directory replaces (a previous output, or a file) is
moved aside and removed once the new one is in place.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path


def _temporary_name(name: str, kind: str) -> str:
    return f".{name}.{secrets.token_hex(4)}.{kind}"


def remove_path(path: Path) -> None:
    """Removes a directory tree, a file or a symlink (not its target), if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_directory(output_dir: Path) -> Iterator[Path]:
    """A new directory beside `output_dir`, renamed to it (replacing what is there) only if the
    block succeeds; removed otherwise.

    Args:
        output_dir: the directory to write; its parent is created if needed.

    Returns:
        (yields) the temporary directory to write into.
    """
    parent = output_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    temporary = parent / _temporary_name(output_dir.name, "partial")
    temporary.mkdir()  # mode 0o777 less the umask, as any directory (mkdtemp's would be 0o700)
    old = None
    try:
        yield temporary
        if os.path.lexists(output_dir):
            old = parent / _temporary_name(output_dir.name, "old")
            os.rename(output_dir, old)
        os.rename(temporary, output_dir)
    finally:
        for leftover in (temporary, old):
            if leftover is not None:
                remove_path(leftover)
