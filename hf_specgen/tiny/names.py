"""Hub-style names for the tiny foundations and their data, so that a recipe's configuration
names them like real ones (`model_name_or_path: hf_specgen/tiny-galactica`) and runs offline.

Any other name is left to `from_pretrained` / `datasets.load_dataset`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .paths import clip_path, lm_path


if TYPE_CHECKING:
    import datasets

TINY_LM = "hf_specgen/tiny-galactica"
TINY_CLIP = "hf_specgen/tiny-clip"
TINY_MEDMCQA = "hf_specgen/tiny-medmcqa"
TINY_PREFERENCES = "hf_specgen/tiny-preferences"  # train / test pairs (`preferences.preference_pairs`)
TINY_INSTRUCTION_REWARD = "hf_specgen/tiny-instruction-reward"  # a rule, not a model (`preferences.InstructionReward`)
TINY_DOMAINS = "hf_specgen/tiny-domains"  # + "/<domain>", e.g. hf_specgen/tiny-domains/photo
# Images per class of a tiny domain, by split (what the phenomenon measurement uses too).
IMAGES_PER_CLASS = {"train": 300, "test": 50}


def model_location(name: str) -> str:
    """The shipped directory of a tiny model's name; any other name unchanged."""
    return str({TINY_LM: lm_path, TINY_CLIP: clip_path}[name]()) if name in (TINY_LM, TINY_CLIP) else name


def is_tiny_dataset(name: str) -> bool:
    return name in (TINY_MEDMCQA, TINY_PREFERENCES) or name.startswith(f"{TINY_DOMAINS}/")


def tiny_dataset(name: str, split: str, seed: int = 0) -> datasets.Dataset:
    """A split of a tiny data set: `hf_specgen/tiny-medmcqa` (train, validation, test),
    `hf_specgen/tiny-preferences` (train, test) or one domain of `hf_specgen/tiny-domains/<domain>`
    (train, test)."""
    if name == TINY_MEDMCQA:
        from .lm_data import medmcqa

        splits = medmcqa(seed)
    elif name == TINY_PREFERENCES:
        from .preferences import preference_pairs

        splits = preference_pairs(seed)
    elif name.startswith(f"{TINY_DOMAINS}/"):
        from .images import DOMAINS, image_domains

        domain = name.removeprefix(f"{TINY_DOMAINS}/")
        if domain not in DOMAINS or split not in IMAGES_PER_CLASS:
            raise ValueError(
                f"{name}:{split}: tiny image sets are {TINY_DOMAINS}/<{'|'.join(DOMAINS)}> with splits "
                f"{', '.join(IMAGES_PER_CLASS)}"
            )
        splits = image_domains(split, seed, IMAGES_PER_CLASS[split], domains=[domain])
        return splits[domain]
    else:
        raise ValueError(f"{name!r} is not a tiny data set")
    if split not in splits:
        raise ValueError(f"{name} has the splits {', '.join(splits)}, not {split!r}")
    return splits[split]
