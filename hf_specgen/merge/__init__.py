"""Merging: streamed checkpoint merges by registered methods (WiSE-FT's `linear`, `task_arithmetic`,
`fisher`), heterogeneous alphas, soups, LoRA adapters, sweeps, Hub push.

Names are imported on first use: `import hf_specgen.merge` (and `specgen --help`) does not load torch
or transformers; the first merge does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_getattr


_LAZY = {
    "MergeError": ".errors",
    "MergeWarning": ".errors",
    "MergeWriteError": ".errors",
    "PushError": ".errors",
    "push_merge": ".hub",
    "METHODS": ".methods",
    "MergeMethod": ".methods",
    "Parameter": ".methods",
    "TensorInput": ".methods",
    "get_method": ".methods",
    "register_method": ".methods",
    "MergeOptions": ".options",
    "alpha_dirname": ".run",
    "iter_merge": ".run",
    "merge": ".run",
    "merge_sweep": ".run",
    "AlphaSchedule": ".schedule",
    "generate_completions": ".proxy",
    "GroupSearch": ".search",
    "search_group_alphas": ".search",
    "AlphaChoice": ".select",
    "select_alpha": ".select",
    "greedy_soup": ".soup",
    "iter_wise_ft": ".interpolate",
    "wise_ft": ".interpolate",
    "wise_ft_sweep": ".interpolate",
}

if TYPE_CHECKING:
    from .errors import MergeError, MergeWarning, MergeWriteError, PushError
    from .hub import push_merge
    from .interpolate import iter_wise_ft, wise_ft, wise_ft_sweep
    from .methods import METHODS, MergeMethod, Parameter, TensorInput, get_method, register_method
    from .options import MergeOptions
    from .proxy import generate_completions
    from .run import alpha_dirname, iter_merge, merge, merge_sweep
    from .schedule import AlphaSchedule
    from .search import GroupSearch, search_group_alphas
    from .select import AlphaChoice, select_alpha
    from .soup import greedy_soup

__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = sorted(_LAZY)
