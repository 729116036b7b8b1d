"""TRL's configs with the regularizer fields: `SpecGenArguments` mixed into each (its fields after
TRL's, its validation after TRL's `__post_init__`; no field of TRL's is shadowed)."""

from __future__ import annotations

from dataclasses import dataclass

from trl import DPOConfig, GRPOConfig, SFTConfig

from ..args import SpecGenArguments


@dataclass
class SpecGenSFTConfig(SpecGenArguments, SFTConfig):
    """`trl.SFTConfig` plus hf_specgen's regularizers (`<name>_lambda > 0` switches one on)."""


@dataclass
class SpecGenDPOConfig(SpecGenArguments, DPOConfig):
    """`trl.DPOConfig` plus hf_specgen's regularizers (`<name>_lambda > 0` switches one on)."""


@dataclass
class SpecGenGRPOConfig(SpecGenArguments, GRPOConfig):
    """`trl.GRPOConfig` plus hf_specgen's regularizers (`<name>_lambda > 0` switches one on)."""
