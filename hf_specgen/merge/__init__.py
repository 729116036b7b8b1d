"""WiSE-FT merging: streamed checkpoint interpolation, LoRA adapters, alpha sweeps, Hub push."""

from .errors import MergeError
from .hub import PushError
from .wise_ft import alpha_dirname, iter_wise_ft, wise_ft, wise_ft_sweep

__all__ = ["MergeError", "PushError", "alpha_dirname", "iter_wise_ft", "wise_ft", "wise_ft_sweep"]
