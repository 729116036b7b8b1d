"""A recipe's model and data sets by name (a tiny one, a local folder, or a Hub id), checked before
training: a missing model, data set, split or column is one clear `ConfigError`; so are a local
path that does not exist and an output directory that cannot be written, before anything loads."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import datasets
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..data.image_classification import load_image_set
from ..tiny.names import is_tiny_dataset, model_location, tiny_dataset
from .config import ConfigError


def load_split(
    name: str,
    split: str,
    columns: Sequence[str] = (),
    *,
    images: bool = False,
    seed: int = 0,
    max_samples: int | None = None,
) -> datasets.Dataset:
    """`split` of the data set `name`, its first `max_samples` rows; `images`: a local folder is an
    `imagefolder` (one sub-folder per class).

    Args:
        name: a `datasets` Hub id, a local folder or data file (`.json`, `.jsonl`, `.csv`, `.parquet`:
            the `train` split), or a tiny data set's name.
        split: the split to load.
        columns: the columns it must have (a missing one is a `ConfigError`).
        images: the data set is images (a local folder is an `imagefolder`).
        seed: the seed a tiny data set is generated from.
        max_samples: its first rows at most; None: all.

    Returns:
        The split.
    """
    try:
        if is_tiny_dataset(name):
            data = tiny_dataset(name, split, seed)
        elif Path(name).is_file() and not images:
            data = _data_file(name, split)
        elif images:
            data = load_image_set(name, split)
        else:
            data = datasets.load_dataset(name, split=split)
    except Exception as error:  # datasets raises many kinds (not found, offline, unknown split, bad files)
        where = "local folder" if Path(name).is_dir() else "data set"
        raise ConfigError(
            f"{where} {name!r}, split {split!r}, cannot be loaded: {type(error).__name__}: {error}"
        ) from error
    missing = [c for c in columns if c not in data.column_names]
    if missing:
        raise ConfigError(f"data set {name!r} ({split}) has no column(s) {missing}; its columns: {data.column_names}")
    if max_samples is not None:
        data = data.select(range(min(max_samples, len(data))))
    return data


_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _data_file(name: str, split: str) -> datasets.Dataset:
    """A single local data file: one split, `train` (a folder holds one file per split)."""
    builder = _FILE_BUILDERS.get(Path(name).suffix.lower())
    if builder is None:
        raise ValueError(f"a data file must end in {', '.join(_FILE_BUILDERS)} (or give a folder, one file per split)")
    if split != "train":
        raise ValueError(
            "a single data file holds one split, train: give a folder with one file per split "
            "(e.g. train.jsonl, test.jsonl) for the others"
        )
    return datasets.load_dataset(builder, data_files={"train": name}, split="train")


def check_model(name: str) -> str:
    """The model's location (a tiny name resolved to its directory), once its configuration loads.

    Args:
        name: a Hub id, a local directory or a tiny foundation's name.

    Returns:
        The model's location to load from.
    """
    from transformers import AutoConfig

    location = model_location(name)
    try:
        AutoConfig.from_pretrained(location)
    except (OSError, ValueError) as error:  # not found, offline, or not a model directory
        raise ConfigError(f"model {name!r} cannot be loaded: {error}") from error
    return location


def is_local_path(name: str) -> bool:
    """Whether a "Hub id or directory" names a local file or folder: it exists, starts like a path
    (`/`, `./`, `../`, `~`), or cannot be a Hub id (`data/domainnet/real`: two slashes); tiny names
    are not. An absent `namespace/name` is left to its loader (a Hub id, or a typo it reports).

    Args:
        name: a Hub id or a path.

    Returns:
        True for a local file or folder.
    """
    if model_location(name) != name or is_tiny_dataset(name):
        return False
    if os.path.exists(name) or name in (".", "..") or name.startswith(("/", "./", "../", "~")):
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def check_paths(paths: Mapping[str, str]) -> None:
    """Each local path of the configuration (field -> path) exists and can be read; the first that
    does not is a `ConfigError` naming its field.

    Args:
        paths: the configuration's local paths by field name.
    """
    for field_name, name in paths.items():
        path = Path(name).expanduser()
        if not path.exists():
            raise ConfigError(f"{field_name} {name!r} does not exist")
        if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
            raise ConfigError(f"{field_name} {name!r} cannot be read: permission denied")


def check_output_dir(output_dir: str | os.PathLike) -> list[Path]:
    """Creates `output_dir` if missing and writes and removes a probe file in it, so that a directory
    that cannot be written is a `ConfigError` (naming `output_dir` and the reason) before any work.
    Returns the directories it created, deepest first, for `remove_created` if the run stops.

    Args:
        output_dir: the run's output directory.

    Returns:
        The directories it created, deepest first.
    """
    path = Path(output_dir)
    created, existing = [], path.absolute()
    while not os.path.exists(existing) and existing != existing.parent:
        created.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"output_dir {str(output_dir)!r} cannot be created: {str(existing)!r} is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-") as probe:
            probe.write(b"probe")
            probe.flush()
    except OSError as error:
        remove_created(created)
        raise ConfigError(f"output_dir {str(output_dir)!r} cannot be written: {error.strerror or error}") from error
    return created


def remove_created(directories: Sequence[Path]) -> None:
    """Removes the directories `check_output_dir` created (deepest first) that are still empty."""
    for directory in directories:
        try:
            directory.rmdir()
        except FileNotFoundError:  # removed by another process of the launch
            continue
        except OSError:  # not empty: another process writes there
            break
