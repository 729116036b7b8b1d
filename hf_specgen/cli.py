"""`specgen`: the command line of hf_specgen."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .merge import MergeError, PushError, wise_ft, wise_ft_sweep


def _alphas(text: str) -> list[float]:
    try:
        return [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--alphas takes comma-separated numbers, got {text!r}") from None


def _add_merge_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pretrained", required=True, help="pre-trained model: directory or Hub id")
    parser.add_argument("--finetuned", required=True, help="fine-tuned model or LoRA adapter: directory or Hub id")
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="output dtype (default: the fine-tuned model's)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB, 500MB")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--extrapolate", action="store_true", help="allow alpha outside [0, 1]")
    parser.add_argument("--keep-adapter", action="store_true", help="LoRA: write an adapter scaled by alpha, not a full model")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specgen", description="Special without losing generality: WiSE-FT merging.")
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser(
        "merge", help="write theta = (1 - alpha) * theta_pretrained + alpha * theta_finetuned"
    )
    _add_merge_options(merge)
    merge.add_argument("--alpha", type=float, required=True, help="0: pre-trained, 1: fine-tuned")
    merge.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the merged model to this Hub repository")
    merge.add_argument("--private", action="store_true", help="create the Hub repository private")
    merge.add_argument("--scores", type=Path, help="a Markdown file of scores to put in the model card")
    sweep = commands.add_parser("sweep", help="one merge per alpha, reading each input tensor once")
    _add_merge_options(sweep)
    sweep.add_argument("--alphas", type=_alphas, required=True, help="comma-separated, e.g. 0,0.25,0.5,0.75,1")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    common = dict(
        dtype=args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
        extrapolate=args.extrapolate, keep_adapter=args.keep_adapter,
    )  # fmt: skip
    try:
        if args.command == "merge":
            try:
                scores = args.scores.read_text() if args.scores else None
            except OSError as error:  # a usage error like the others, not a traceback
                parser.error(f"--scores: {error}")
            out = wise_ft(args.pretrained, args.finetuned, args.alpha, args.output_dir, args.push_to_hub,
                          private=args.private, scores=scores, **common)  # fmt: skip
            print(f"wrote {out}" + (f" and pushed it to {args.push_to_hub}" if args.push_to_hub else ""))
        else:
            for alpha, out in wise_ft_sweep(args.pretrained, args.finetuned, args.alphas, args.output_dir, **common).items():
                print(f"alpha={alpha:g}: {out}")
    except MergeError as error:
        parser.exit(2, f"specgen: error: {error}\n")
    except PushError as error:
        print(f"specgen: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
