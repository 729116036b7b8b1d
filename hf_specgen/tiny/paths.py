"""Where the shipped tiny foundations live inside the package."""

from __future__ import annotations

from pathlib import Path


MODELS_DIR = Path(__file__).parent / "models"
LM_DIR = MODELS_DIR / "tiny-galactica"
CLIP_DIR = MODELS_DIR / "tiny-clip"


def _shipped(directory: Path) -> Path:
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} holds no model: rebuild the tiny foundations with `make foundations`")
    return directory


def lm_path() -> Path:
    """The tiny Galactica (OPT) directory: `AutoModelForCausalLM.from_pretrained(lm_path())`.

    Returns:
        The directory of the shipped tiny Galactica.
    """
    return _shipped(LM_DIR)


def clip_path() -> Path:
    """The tiny CLIP directory: `CLIPModel.from_pretrained(clip_path())`, `CLIPProcessor` too.

    Returns:
        The directory of the shipped tiny CLIP.
    """
    return _shipped(CLIP_DIR)
