"""WiSE-FT merging: streamed checkpoint interpolation, LoRA adapters, alpha sweeps, Hub push."""

from .errors import MergeError, MergeWarning, MergeWriteError
from .hub import PushError, push_merge
from .wise_ft import alpha_dirname, iter_wise_ft, wise_ft, wise_ft_sweep

__all__ = [
    "MergeError", "MergeWarning", "MergeWriteError", "PushError", "alpha_dirname", "iter_wise_ft", "push_merge",
    "wise_ft", "wise_ft_sweep",
]  # fmt: skip
