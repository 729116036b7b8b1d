"""Merging: streamed checkpoint merges by registered methods (WiSE-FT's `linear`, `task_arithmetic`,
`fisher`), heterogeneous alphas, soups, LoRA adapters, sweeps, Hub push."""

from .errors import MergeError, MergeWarning, MergeWriteError
from .hub import PushError, push_merge
from .methods import METHODS, MergeMethod, Parameter, TensorInput, get_method, register_method
from .options import MergeOptions
from .run import alpha_dirname, iter_merge, merge, merge_sweep
from .schedule import AlphaSchedule
from .proxy import generate_completions
from .search import GroupSearch, search_group_alphas
from .select import AlphaChoice, select_alpha
from .soup import greedy_soup
from .wise_ft import iter_wise_ft, wise_ft, wise_ft_sweep

__all__ = [
    "METHODS", "AlphaChoice", "AlphaSchedule", "GroupSearch", "MergeError", "MergeMethod", "MergeOptions", "MergeWarning", "MergeWriteError",
    "Parameter", "PushError", "TensorInput", "alpha_dirname", "generate_completions", "get_method", "greedy_soup", "iter_merge",
    "iter_wise_ft", "merge", "merge_sweep", "push_merge", "register_method", "search_group_alphas", "select_alpha", "wise_ft", "wise_ft_sweep",
]  # fmt: skip
