"""The floating-point dtypes hf_specgen takes by name (anchors, teachers, merge outputs, the CLI).

Torch-free: the names are what `import hf_specgen.merge` and `specgen --help` offer without loading
torch; `torch_dtype` imports it only when a name is turned into a dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING


if TYPE_CHECKING:
    import torch

DTYPES = ("float32", "bfloat16", "float16")  # by name: torch's attribute of that name


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype named `name`.

    Args:
        name: one of `DTYPES`.

    Returns:
        `torch.<name>`.

    Raises:
        ValueError: `name` is not one of `DTYPES`.
    """
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    import torch

    return getattr(torch, name)
