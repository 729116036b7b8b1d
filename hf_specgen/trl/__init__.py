"""The regularizers in TRL's trainers: SFT, DPO and GRPO (`pip install hf_specgen[trl]`).

    from hf_specgen.trl import SpecGenSFTTrainer, SpecGenSFTConfig      # was: SFTTrainer, SFTConfig
    from hf_specgen.trl import SpecGenDPOTrainer, SpecGenDPOConfig
    from hf_specgen.trl import SpecGenGRPOTrainer, SpecGenGRPOConfig

Each trainer is TRL's own with `SpecGenMixin`, its constructor unchanged; each config is TRL's
with `SpecGenArguments`' fields. `import hf_specgen` works without trl; this module needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        try:
            import trl  # noqa: F401
        except ImportError as error:
            raise ImportError(f"hf_specgen.trl.{name} needs TRL: pip install 'hf_specgen[trl]'") from error
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)
