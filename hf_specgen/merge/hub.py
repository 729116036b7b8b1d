"""Publishing a merged model to the Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class PushError(RuntimeError):
    """The upload failed; the local output is intact."""


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
        raise PushError(f"pushing {folder} to {repo_id} failed (the local output is intact): {error}") from error
    return repo_id
