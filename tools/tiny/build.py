"""`make foundations`: rebuild both tiny foundations from their seeds into the package."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from hf_specgen.tiny.paths import CLIP_DIR, LM_DIR

from .build_clip import build_clip
from .build_lm import build_lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lm-dir", type=Path, default=LM_DIR)
    parser.add_argument("--clip-dir", type=Path, default=CLIP_DIR)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name, build, output_dir in (("LM", build_lm, args.lm_dir), ("CLIP", build_clip, args.clip_dir)):
        start = time.perf_counter()
        build(output_dir, seed=args.seed)
        size = sum(f.stat().st_size for f in Path(output_dir).iterdir()) / 2**20
        print(f"tiny {name}: {output_dir} ({size:.1f} MiB) in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
