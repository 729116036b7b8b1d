"""`specgen`: the command line of hf_specgen."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .merge import MergeError, MergeWarning, MergeWriteError, PushError, push_merge, wise_ft, wise_ft_sweep
from .merge.atomic import Terminated
from .merge.output import MARKER


def _alphas(text: str) -> list[float]:
    try:
        return [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--alphas takes comma-separated numbers, got {text!r}") from None


def _add_merge_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pretrained", required=True, help="pre-trained model: directory or Hub id")
    parser.add_argument("--finetuned", required=True, help="fine-tuned model or LoRA adapter: directory or Hub id")
    parser.add_argument("--output-dir", required=True, type=Path,
                        help="where to write (a sweep: one alpha-<alpha>/ per alpha); it must not exist, unless "
                             "--overwrite or --overwrite-any")  # fmt: skip
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="output dtype (default: the fine-tuned model's)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB, 500MB (default: 5GB)")
    parser.add_argument(
        "--overwrite", action="store_true",
        help=f"replace OUTPUT_DIR if a previous merge wrote it (it holds {MARKER}) or it is empty: everything in it "
             "is removed; never an input model or adapter directory, nor one containing or inside an input",
    )  # fmt: skip
    parser.add_argument(
        "--overwrite-any", action="store_true",
        help="replace OUTPUT_DIR whatever it holds (a directory is removed with everything in it, a file deleted); "
             "still never an input",
    )  # fmt: skip
    parser.add_argument("--extrapolate", action="store_true", help="allow alpha outside [0, 1]")
    parser.add_argument("--keep-adapter", action="store_true", help="LoRA: write an adapter scaled by alpha, not a full model")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specgen", description="Special without losing generality: WiSE-FT merging, evaluation, reports.")
    parser.add_argument("--version", action="version", version=f"%(prog)s (hf_specgen) {__version__}",
                        help="print the version and exit")  # fmt: skip
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
    push = commands.add_parser("push", help="upload a model directory written earlier (e.g. a merge whose push failed) to the Hub")
    push.add_argument("directory", metavar="DIR", type=Path, help="a model or LoRA adapter directory")
    push.add_argument("repo_id", metavar="REPO_ID", help="the Hub repository, created if needed, e.g. me/galactica-med-wise")
    push.add_argument("--private", action="store_true", help="create the Hub repository private")
    _add_eval_parsers(commands)
    return parser


def _add_eval_parsers(commands: argparse._SubParsersAction) -> None:
    from .eval.suites import SUITES  # names and descriptions only: no model stack

    evaluate = commands.add_parser("eval", help="score a model on named suites and write a result record (JSON)")
    evaluate.add_argument("--model", required=True, help="model directory or Hub id")
    evaluate.add_argument("--suite", action="append", required=True, metavar="NAME",
                          help="repeatable; one of: " + "; ".join(f"{k} ({v})" for k, v in SUITES.items()))
    evaluate.add_argument("--output", required=True, type=Path, help="the result record to write (.json)")
    evaluate.add_argument("--method", required=True, help="how the model was made: full, l2, lora, pre-trained, ...")
    evaluate.add_argument("--alpha", type=float, help="WiSE-FT alpha, if the model is a merge")
    evaluate.add_argument("--hyperparameter", help="the method's strength setting, e.g. l2_lambda")
    evaluate.add_argument("--value", type=float, help="its value, e.g. 0.1")
    evaluate.add_argument("--limit", type=int, help="at most this many examples per task (quick checks)")
    evaluate.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt, LM suites only (default: each task's own)")
    evaluate.add_argument("--batch-size", type=int, default=32, help="examples per forward pass (default: 32)")
    evaluate.add_argument("--device", help="default: cuda when available, else cpu")
    report = commands.add_parser("report", help="combine result records into report.json, report.md and report.png")
    report.add_argument("results", nargs="+", type=Path, help="record files (one record or a list) or directories of them")
    report.add_argument("--output-dir", required=True, type=Path, help="where to write report.json, report.md and report.png")
    report.add_argument("--title", help="title of the table and the plot")
    report.add_argument("--combine", action="store_true",
                        help="RESULTS are report directories (e.g. one per recipe): write one report.md / report.json over them")


def _evaluate(args: argparse.Namespace) -> None:
    import time

    from .eval.report import ResultRecord
    from .eval.suites import check_suites, evaluate_suites

    _check_model_source(args.model)
    check_suites(args.suite, both_sides=True)
    if (args.hyperparameter is None) != (args.value is None):
        raise ValueError("--hyperparameter and --value go together")
    start = time.perf_counter()
    scores = evaluate_suites(args.model, args.suite, limit=args.limit, num_fewshot=args.num_fewshot,
                             batch_size=args.batch_size, device=args.device)  # fmt: skip
    if not scores["speciality"]:  # another process of a multi-process run: the main one writes
        return
    record = ResultRecord(
        method=args.method, alpha=args.alpha, hyperparameter=args.hyperparameter, value=args.value,
        speciality=scores["speciality"], generality=scores["generality"],
        cost={"eval_s": round(time.perf_counter() - start, 1)}, model=str(args.model),
    )  # fmt: skip
    record.save(args.output)
    print(f"{args.output}: speciality {record.speciality_score:.3f}, generality {record.generality_score:.3f}")


def _check_model_source(model: str) -> None:
    """A model directory whose weights can be read (every shard's header), or a Hub id: one line otherwise."""
    from huggingface_hub.utils import validate_repo_id

    from .merge.checkpoint import Checkpoint

    path = Path(model)
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ValueError(f"{model}: not a model directory (no config.json)")
        Checkpoint(path)  # a truncated, missing or unreadable weight file names itself
        return
    try:
        validate_repo_id(model)
    except ValueError:
        raise ValueError(f"{model}: no such directory (nor a Hub id)") from None


def _report(args: argparse.Namespace) -> None:
    from .eval.report import DEFAULT_TITLE, combine_reports, load_records, write_report

    if args.combine:
        paths = combine_reports(args.results, args.output_dir)
    else:
        paths = write_report(load_records(args.results), args.output_dir, title=args.title or DEFAULT_TITLE)
    for path in paths.values():
        print(f"wrote {path}")


def _merge(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    common = dict(
        dtype=args.dtype, max_shard_size=args.max_shard_size, overwrite="any" if args.overwrite_any else args.overwrite,
        extrapolate=args.extrapolate, keep_adapter=args.keep_adapter,
    )  # fmt: skip
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_merge_warnings(warnings.showwarning)
        try:
            return _run(args, parser)
        except KeyboardInterrupt:  # Ctrl-C: a merge has removed what it had written by now
            print("specgen: interrupted", file=sys.stderr)
            return 130
        except Terminated:  # SIGTERM reached a Python handler that returned
            print("specgen: terminated", file=sys.stderr)
            return 143


def _one_line_merge_warnings(show: Callable[..., None]) -> Callable[..., None]:
    """`specgen: warning: <path>: <what>` on stderr for the merge's own warnings; the others as `show` shows them."""

    def showwarning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, MergeWarning):
            print(f"specgen: warning: {message}", file=sys.stderr)
        else:
            show(message, category, *args, **kwargs)

    return showwarning


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        if args.command == "eval":
            _evaluate(args)
        elif args.command == "report":
            _report(args)
        elif args.command == "push":
            push_merge(args.directory, args.repo_id, private=args.private)
            print(f"pushed {args.directory} to {args.repo_id}")
        else:
            _merge(args, parser)
    except (MergeError, ValueError) as error:
        parser.exit(2, f"specgen: error: {error}\n")
    except (PushError, OSError) as error:  # the input was fine: writing or uploading failed
        print(f"specgen: error: {_describe(error)}", file=sys.stderr)
        return 1
    return 0


def _describe(error: Exception) -> str:
    """`<path>: <what is wrong>` where the error names a path (`[Errno 13] ...: 'path'` otherwise)."""
    if isinstance(error, OSError) and not isinstance(error, MergeWriteError) and error.filename and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error)


if __name__ == "__main__":
    sys.exit(main())
