"""The tiny offline foundations: a Galactica-style (OPT) LM and a CLIP that the project trains
itself on procedurally generated data, with that data and their evaluation tasks.

They are standard model directories (`from_pretrained(lm_path())`), so recipes and tools treat
them like `facebook/galactica-1.3b` or `openai/clip-vit-base-patch16`. Names are imported on
first use: finding a path does not load `datasets` or Pillow.

The package registers the tiny evaluation suites (`suites`) into `hf_specgen.eval` and the tiny
reward rule (`rewards`) into `hf_specgen.alignment`. The builders of the shipped models and the
forgetting measurements are research tooling beside the package: `tools/tiny/` (`make foundations`,
`make phenomenon`).
"""

from __future__ import annotations

from ..lazy import lazy_getattr


_LAZY = {
    "lm_path": ".paths",
    "clip_path": ".paths",
    "GENERAL_FAMILIES": ".lm_data",
    "general_corpus": ".lm_data",
    "general_eval": ".lm_data",
    "medmcqa": ".lm_data",
    "GENERAL_TASKS": ".tasks",
    "MEDMCQA_TASK": ".tasks",
    "task_dir": ".tasks",
    "write_tasks": ".tasks",
    "CLASS_NAMES": ".images",
    "DOMAINS": ".images",
    "FINETUNE_DOMAIN": ".images",
    "image_domains": ".images",
    "zero_shot_templates": ".images",
}

__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = sorted(_LAZY)
