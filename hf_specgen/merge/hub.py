"""Publishing a merged model to the Hub: at the end of a merge, or later (`specgen push`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint, read_config
from .errors import MergeError, PushError
from .lora import ADAPTER_CONFIG, is_lora_adapter
from .output import read_marker


def check_repo_id(repo_id: str, name: str) -> None:
    """A `MergeError` unless `repo_id` is a well-formed Hub repository id (checked locally, no network).

    Args:
        repo_id: e.g. "me/galactica-med-wise".
        name: how the caller's argument is called, for the message (e.g. "push_to_hub (--push-to-hub)").
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        if not isinstance(repo_id, str):
            raise HFValidationError("not a string")
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise MergeError(f"{name}: {repo_id!r} is not a valid Hub repository id ({error})") from None


def check_model_directory(directory: Path) -> None:
    """A `MergeError` naming `directory` unless it is a model (config.json and weights) or a LoRA
    adapter directory whose weights can be read."""
    if not directory.exists():
        raise MergeError(f"{directory}: no such directory")
    if not directory.is_dir():
        raise MergeError(f"{directory}: not a directory")
    if is_lora_adapter(directory):
        Checkpoint(directory, weights_name="adapter_model")
    elif read_config(directory) is None:
        raise MergeError(f"{directory}: not a model directory (no config.json or {ADAPTER_CONFIG})")
    else:
        Checkpoint(directory)


def push_folder(folder: Path, repo_id: str, *, private: bool = False, api: Any = None, message: str = "") -> str:
    """Creates `repo_id` if needed and uploads `folder`. `api` is an `HfApi`-compatible object;
    the default `HfApi()` takes its token from `HF_TOKEN` or `huggingface-cli login`, never printed."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    try:
        api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message=message)
    except Exception as error:  # the Hub's own message, the local output left as it is
        raise PushError(
            f"pushing {folder} to {repo_id} failed (the local output is intact; `specgen push {folder} {repo_id}` "
            f"retries): {error}"
        ) from error
    return repo_id


def push_merge(directory: str | os.PathLike, repo_id: str, *, private: bool = False, hub_api: Any = None) -> str:
    """Uploads a model directory written earlier (e.g. a merge whose push failed) to the Hub.

    Args:
        directory: a model or LoRA adapter directory; anything else is refused (`MergeError`).
        repo_id: the Hub repository, created if needed.
        private: create it private.
        hub_api: an `HfApi`-like object (default: `huggingface_hub.HfApi()`).

    Returns:
        `repo_id`; a failed upload raises `PushError`.
    """
    directory = Path(directory)
    check_repo_id(repo_id, "repo_id")
    check_model_directory(directory)
    marker = read_marker(directory)
    alpha = marker.get("alpha") if marker else None
    what = f"{marker['method']} merge, mean" if marker and isinstance(marker.get("method"), str) else "WiSE-FT merge,"
    message = f"{what} alpha={alpha:g}" if isinstance(alpha, (int, float)) else f"Upload {directory.name}"
    return push_folder(directory, repo_id, private=private, api=hub_api, message=message)
