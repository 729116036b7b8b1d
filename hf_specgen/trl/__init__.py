"""The regularizers in TRL's trainers: SFT, DPO and GRPO (`pip install hf_specgen[trl]`).

    from hf_specgen.trl import SpecGenSFTTrainer, SpecGenSFTConfig      # was: SFTTrainer, SFTConfig
    from hf_specgen.trl import SpecGenDPOTrainer, SpecGenDPOConfig
    from hf_specgen.trl import SpecGenGRPOTrainer, SpecGenGRPOConfig

Each trainer is TRL's own with `SpecGenMixin`, its constructor unchanged; each config is TRL's
with `SpecGenArguments`' fields. `import hf_specgen` works without trl; this module needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_getattr


_LAZY = {
    "SpecGenSFTConfig": ".configs",
    "SpecGenDPOConfig": ".configs",
    "SpecGenGRPOConfig": ".configs",
    "SpecGenSFTTrainer": ".sft",
    "SpecGenDPOTrainer": ".dpo",
    "SpecGenGRPOTrainer": ".grpo",
}

if TYPE_CHECKING:
    from .configs import SpecGenDPOConfig, SpecGenGRPOConfig, SpecGenSFTConfig
    from .dpo import SpecGenDPOTrainer
    from .grpo import SpecGenGRPOTrainer
    from .sft import SpecGenSFTTrainer


def _needs_trl(name: str) -> None:
    try:
        import trl  # noqa: F401
    except ImportError as error:
        raise ImportError(f"hf_specgen.trl.{name} needs TRL: pip install 'hf_specgen[trl]'") from error


__getattr__ = lazy_getattr(__name__, _LAZY, check=_needs_trl)


__all__ = list(_LAZY)
