"""Where a merge may write: never over or into its inputs, and over an existing path only when asked.

Every directory a merge writes (each merged model, and a sweep's root) holds `specgen_merge.json`,
which says where it came from. `overwrite=True` (`--overwrite`) replaces a directory holding it, or
an empty one; `overwrite="any"` (`--overwrite-any`) replaces whatever is there. Neither ever
replaces, or writes into, an input model or adapter directory: paths are compared resolved
(`os.path.realpath`), symlinks included, and a Hub id stands for the Hugging Face cache it is
downloaded to. All of this is checked before anything is read or written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, Union

from ..version import __version__
from .errors import MergeError


MARKER = "specgen_merge.json"
_WRITTEN_BY = "hf_specgen"
Overwrite = Union[bool, Literal["any"]]


def write_marker(directory: Path, pretrained: str, finetuned: str, **details: Any) -> None:
    """Writes `specgen_merge.json` (the sources and e.g. the alpha or alphas) into `directory`."""
    record = {
        "written_by": _WRITTEN_BY,
        "version": __version__,
        "pretrained": pretrained,
        "finetuned": finetuned,
        **details,
    }
    (directory / MARKER).write_text(json.dumps(record, indent=2) + "\n")


def read_marker(directory: Path) -> dict[str, Any] | None:
    """What `write_marker` wrote in `directory`, or None where a merge did not write it."""
    try:
        record = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("written_by") == _WRITTEN_BY else None


def _inputs(source: str | os.PathLike) -> Iterator[tuple[Path, str]]:
    """The resolved directories a source's files live in, each with how to name it in a message."""
    path = Path(source)
    if not path.exists():  # a Hub id: it is downloaded to (or read from) the cache
        from huggingface_hub import constants

        yield Path(os.path.realpath(constants.HF_HUB_CACHE)), f"{source} (a Hub id, in the Hugging Face cache)"
        return
    yield Path(os.path.realpath(path)), str(source)
    if path.is_dir():  # files linked from elsewhere (e.g. into a cache's blobs): their directories too
        for entry in path.iterdir():
            if entry.is_symlink():
                yield Path(os.path.realpath(entry)).parent, f"{source} (through {entry.name})"


def _relation(output: Path, protected: Path) -> str | None:
    if output == protected:
        return "is"
    if output in protected.parents:
        return "contains"
    if protected in output.parents:
        return "lies inside"
    return None


def check_output_dir(output_dir: Path, sources: Sequence[str | os.PathLike], overwrite: Overwrite) -> None:
    """Raises a `MergeError` where writing `output_dir` would replace or enter one of `sources`
    (model or adapter directories, or Hub ids), or replace a path `overwrite` does not allow.

    Args:
        output_dir: the directory the merge is to write.
        sources: the pre-trained and fine-tuned models (or adapter), as given.
        overwrite: False (refuse an existing path), True (replace a previous merge or an empty
            directory) or "any" (replace whatever is there, a file too).
    """
    if not (isinstance(overwrite, bool) or overwrite == "any"):
        raise MergeError(f"overwrite must be False, True or 'any', got {overwrite!r}")
    output = Path(os.path.realpath(output_dir))
    for source in sources:
        for protected, name in _inputs(source):
            relation = _relation(output, protected)
            if relation is not None:
                raise MergeError(
                    f"{output_dir}: the output directory {relation} the input {name}; choose another output "
                    "directory (nothing was written)"
                )
    for ancestor in Path(output_dir).parents:
        if os.path.lexists(ancestor) and not ancestor.is_dir():
            raise MergeError(f"{output_dir}: {ancestor} is a file, not a directory (nothing was written)")
    if not os.path.lexists(output_dir):
        return
    previous_merge = output_dir.is_dir() and (read_marker(output_dir) is not None or not any(output_dir.iterdir()))
    if not overwrite:
        if previous_merge:
            raise MergeError(f"{output_dir}: already exists; pass overwrite=True (--overwrite) to replace it")
        raise MergeError(
            f"{output_dir}: already exists and is not a merge's output; pass overwrite='any' (--overwrite-any) to "
            "replace it"
        )
    if overwrite == "any" or previous_merge:
        return
    raise MergeError(
        f"{output_dir}: not written by a merge (no {MARKER}); overwrite=True (--overwrite) replaces only a "
        "previous merge or an empty directory: pass overwrite='any' (--overwrite-any) to replace it anyway"
    )
