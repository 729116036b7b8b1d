"""A recipe's model and data sets by name (a tiny one, a local folder, or a Hub id), checked before
training: a missing model, data set, split or column is one clear `ConfigError`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import datasets

from ..data.image_classification import load_image_set
from ..tiny.names import is_tiny_dataset, model_location, tiny_dataset
from .config import ConfigError


def load_split(
    name: str, split: str, columns: Sequence[str] = (), *, images: bool = False, seed: int = 0,
    max_samples: int | None = None,
) -> datasets.Dataset:  # fmt: skip
    """`split` of the data set `name`, its first `max_samples` rows; `images`: a local folder is an
    `imagefolder` (one sub-folder per class)."""
    try:
        if is_tiny_dataset(name):
            data = tiny_dataset(name, split, seed)
        elif images:
            data = load_image_set(name, split)
        else:
            data = datasets.load_dataset(name, split=split)
    except Exception as error:  # datasets raises many kinds (not found, offline, unknown split, bad files)
        where = "local folder" if Path(name).is_dir() else "data set"
        raise ConfigError(f"{where} {name!r}, split {split!r}, cannot be loaded: {type(error).__name__}: {error}") from error
    missing = [c for c in columns if c not in data.column_names]
    if missing:
        raise ConfigError(f"data set {name!r} ({split}) has no column(s) {missing}; its columns: {data.column_names}")
    if max_samples is not None:
        data = data.select(range(min(max_samples, len(data))))
    return data


def check_model(name: str) -> str:
    """The model's location (a tiny name resolved to its directory), once its configuration loads."""
    from transformers import AutoConfig

    location = model_location(name)
    try:
        AutoConfig.from_pretrained(location)
    except (OSError, ValueError) as error:  # not found, offline, or not a model directory
        raise ConfigError(f"model {name!r} cannot be loaded: {error}") from error
    return location
