"""`specgen`: the command line of hf_specgen."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .atomic import Terminated
from .dtypes import DTYPES, torch_dtype
from .merge import methods as merge_methods  # the registry: no torch until a method computes
from .merge.errors import MergeError, MergeWarning, MergeWriteError, PushError
from .merge.options import MergeOptions
from .merge.output import MARKER
from .merge.schedule import AlphaSchedule
from .version import __version__


# dests of the options generated from the registered methods: "<prefix><method>:<parameter>", "<prefix><input>"
_PARAM, _INPUT = "method_parameter:", "method_input:"


class _Parser(argparse.ArgumentParser):
    """A usage error is one line, `specgen: error: ...` with exit status 2, as every other refusal."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"specgen: error: {message} (see {self.prog} --help)\n")


def _numbers(option: str) -> Callable[[str], list[float]]:
    """An argparse type: comma-separated numbers, e.g. `0,0.25,0.5`."""

    def parse(text: str) -> list[float]:
        try:
            items = text.split(",")
            if any(not a.strip() for a in items):
                raise ValueError
            return [float(a) for a in items]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{option} takes comma-separated numbers (none empty), got {text!r}"
            ) from None

    return parse


def _alpha_rule(text: str) -> tuple[str, float]:
    """`REGEX=ALPHA`, split at the last `=` (a regular expression may hold one)."""
    pattern, equals, alpha = text.rpartition("=")
    if not equals:
        raise argparse.ArgumentTypeError(f"--alpha-rule takes REGEX=ALPHA, got {text!r} (no '=')")
    try:
        return pattern, float(alpha)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--alpha-rule takes REGEX=ALPHA, got {text!r}: {alpha!r} is not a number"
        ) from None


def _method_name(name: str) -> str:
    """A registered merge method (argparse's `choices` would word its refusal per Python version)."""
    try:
        return merge_methods.get_method(name).name
    except MergeError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _param_flag(method: str, parameter: str) -> str:
    return f"--{method}-{parameter}".replace("_", "-")


def _input_flag(name: str) -> str:
    return f"--{name}".replace("_", "-")


def _add_merge_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pretrained", required=True, help="pre-trained model: directory or Hub id")
    parser.add_argument(
        "--finetuned",
        required=True,
        nargs="+",
        metavar="FINETUNED",
        help="fine-tuned model or LoRA adapter: directory or Hub id; several fine-tunes of the pre-trained model "
        "(full models) for a soup (linear) or task arithmetic",
    )
    parser.add_argument(
        "--output-dir",
        required=True,
        type=Path,
        help="where to write (a sweep: one alpha-<alpha>/ per alpha); it must not exist, unless "
        "--overwrite or --overwrite-any",
    )
    parser.add_argument("--dtype", choices=list(DTYPES), help="output dtype (default: the fine-tuned model's)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB, 500MB (default: 5GB)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace OUTPUT_DIR if a previous merge wrote it (it holds {MARKER}) or it is empty: everything in it "
        "is removed; never an input model or adapter directory, nor one containing or inside an input",
    )
    parser.add_argument(
        "--overwrite-any",
        action="store_true",
        help="replace OUTPUT_DIR whatever it holds (a directory is removed with everything in it, a file deleted); "
        "still never an input",
    )
    parser.add_argument("--extrapolate", action="store_true", help="allow alpha outside [0, 1]")
    parser.add_argument(
        "--keep-adapter", action="store_true", help="LoRA: write an adapter scaled by alpha, not a full model"
    )
    _add_method_options(parser)
    _add_schedule_options(parser)


def _add_method_options(parser: argparse.ArgumentParser) -> None:
    """--method, --weights, and each registered method's parameters (`--<method>-<parameter>`) and
    per-tensor inputs (`--<input>`), generated from the registry: a method registered in Python has
    its options without a change here."""
    methods = merge_methods.METHODS
    parser.add_argument(
        "--method",
        type=_method_name,
        default="linear",
        metavar="NAME",
        help="the merge method (default: linear): " + "; ".join(f"{m.name}: {m.formula}" for m in methods.values()),
    )
    parser.add_argument(
        "--weights",
        nargs="+",
        type=float,
        metavar="W",
        help="one weight per --finetuned model (default: 1 each): linear averages the models with them (normalized), "
        "task_arithmetic scales each task vector by its own",
    )
    inputs: dict[str, tuple[merge_methods.TensorInput, list[str]]] = {}
    for method in methods.values():
        for name, parameter in method.parameters.items():
            _add_generated(
                parser,
                _param_flag(method.name, name),
                dest=f"{_PARAM}{method.name}:{name}",
                type=float,
                metavar="X",
                help=f"{parameter.help} (--method {method.name}; default: {parameter.default:g})",
            )
        for name, declared in method.inputs.items():
            inputs.setdefault(name, (declared, []))[1].append(method.name)
    for name, (declared, owners) in inputs.items():
        _add_generated(
            parser,
            _input_flag(name),
            dest=f"{_INPUT}{name}",
            metavar="FILE",
            help=f"{declared.help} (--method {' or '.join(owners)}; named and shaped like the {declared.like} "
            "model's tensors)",
        )


def _add_generated(parser: argparse.ArgumentParser, flag: str, *, help: str, **kwargs: Any) -> None:
    try:
        parser.add_argument(flag, help=help.replace("%", "%%"), **kwargs)  # argparse formats help with %
    except argparse.ArgumentError:
        raise ValueError(
            f"a registered merge method's option {flag} clashes with another option of {parser.prog}: "
            "rename that parameter or input"
        ) from None


def _add_schedule_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--group-alphas",
        type=_numbers("--group-alphas"),
        metavar="A1,A2,...",
        help="one alpha per group of consecutive transformer blocks, input side first (heterogeneous model "
        "averaging), e.g. 0.1,0.2,0.3; every stack of blocks (e.g. CLIP's two towers) is split on its own. In a "
        "sweep: the shape, scaled to each of --alphas as its mean",
    )
    parser.add_argument(
        "--outside-alpha",
        type=float,
        metavar="ALPHA",
        help="with --group-alphas: the alpha of tensors outside the blocks (embeddings, final norm, "
        "head); default: the groups' mean",
    )
    parser.add_argument(
        "--alpha-rule",
        action="append",
        type=_alpha_rule,
        metavar="REGEX=ALPHA",
        help="repeatable, in order, first match wins: tensors whose name matches REGEX (re.search; split at the last "
        "'=') get ALPHA, the others --alpha (in a sweep: each of --alphas), e.g. 'mlp\\.=0.3'",
    )
    parser.add_argument(
        "--linear-only",
        action="store_true",
        help="only the weights of linear layers follow the alphas; every other tensor (embeddings, "
        "norms, biases) gets --non-linear-alpha",
    )
    parser.add_argument(
        "--non-linear-alpha",
        type=float,
        metavar="ALPHA",
        help="with --linear-only: the alpha of the other tensors (default: 1, the fine-tuned model's)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="specgen", description="Special without losing generality: WiSE-FT merging, evaluation, reports."
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s (hf_specgen) {__version__}",
        help="print the version and exit",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser(
        "merge", help="write theta = (1 - alpha) * theta_pretrained + alpha * theta_finetuned (or another --method)"
    )
    _add_merge_options(merge)
    merge.add_argument(
        "--alpha",
        type=float,
        help="0: pre-trained, 1: fine-tuned (with --alpha-rule: the alpha of tensors no rule matches); "
        "needed unless --group-alphas",
    )
    merge.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the merged model to this Hub repository")
    merge.add_argument("--private", action="store_true", help="create the Hub repository private")
    merge.add_argument("--scores", type=Path, help="a Markdown file of scores to put in the model card")
    sweep = commands.add_parser("sweep", help="one merge per alpha, reading each input tensor once")
    _add_merge_options(sweep)
    sweep.add_argument(
        "--alphas",
        type=_numbers("--alphas"),
        required=True,
        help="comma-separated, e.g. 0,0.25,0.5,0.75,1 (with --group-alphas: the mean alphas)",
    )
    push = commands.add_parser(
        "push", help="upload a model directory written earlier (e.g. a merge whose push failed) to the Hub"
    )
    push.add_argument("directory", metavar="DIR", type=Path, help="a model or LoRA adapter directory")
    push.add_argument(
        "repo_id", metavar="REPO_ID", help="the Hub repository, created if needed, e.g. me/galactica-med-wise"
    )
    push.add_argument("--private", action="store_true", help="create the Hub repository private")
    _add_eval_parsers(commands)
    _add_fisher_parser(commands)
    _add_hma_parser(commands)
    return parser


def _add_hma_parser(commands: argparse._SubParsersAction) -> None:
    hma = commands.add_parser(
        "hma", help="search HMA's group alphas at a fixed mean on samples' likelihood, then write that merge"
    )
    hma.add_argument("--pretrained", required=True, help="pre-trained causal LM: directory or Hub id")
    hma.add_argument("--finetuned", required=True, help="fine-tuned causal LM (full model): directory or Hub id")
    samples = hma.add_mutually_exclusive_group(required=True)
    samples.add_argument(
        "--data",
        type=Path,
        help="the samples, e.g. the fine-tuned model's answers to training prompts: .json, .jsonl or a "
        "datasets directory, read as by specgen fisher",
    )
    samples.add_argument(
        "--generate-from",
        type=Path,
        metavar="PROMPTS",
        help="prompts (.json, .jsonl or a datasets directory) that the fine-tuned model answers greedily; "
        "the answers are the samples, as in the paper (--prompt-field names the prompts' field)",
    )
    hma.add_argument("--text-field", default="text", help="the field of the text scored (default: text)")
    hma.add_argument(
        "--prompt-field",
        help="a field of prompts, not scored, put before each text (default: none; with --generate-from: prompt)",
    )
    hma.add_argument(
        "--max-new-tokens", type=int, help="with --generate-from: tokens generated per prompt at most (default: 64)"
    )
    hma.add_argument(
        "--output-dir",
        required=True,
        type=Path,
        help="the merge to write; hma_search.json beside its weights holds the search",
    )
    hma.add_argument(
        "--groups", type=int, default=3, help="K groups of consecutive blocks, input side first (default: 3)"
    )
    hma.add_argument("--mean-alpha", type=float, default=0.2, help="the ratios' fixed mean (default: 0.2)")
    hma.add_argument("--steps", type=int, default=50, help="optimizer steps at most (default: 50)")
    hma.add_argument(
        "--learning-rate", type=float, default=0.1, help="Adam's learning rate on the ratio scores (default: 0.1)"
    )
    hma.add_argument("--batch-size", type=int, default=8, help="samples per step (default: 8)")
    hma.add_argument("--max-length", type=int, default=256, help="tokens per sample at most (default: 256)")
    hma.add_argument(
        "--held-out", type=float, default=0.2, help="share of samples held out for early stopping (default: 0.2)"
    )
    hma.add_argument(
        "--patience", type=int, default=10, help="steps without a better held-out loss before stopping (default: 10)"
    )
    hma.add_argument(
        "--eps", type=float, default=0.05, help="floor of each group's weight, sigmoid(s) + eps (default: 0.05)"
    )
    hma.add_argument(
        "--middle-penalty",
        type=float,
        default=0.0,
        help="lambda of sum over the middle groups of (alpha_k - mean)^2 (default: 0)",
    )
    hma.add_argument("--seed", type=int, default=0, help="the samples' order (default: 0)")
    hma.add_argument("--max-shard-size", default="5GB", help="largest output shard (default: 5GB)")
    hma.add_argument(
        "--overwrite", action="store_true", help="replace OUTPUT_DIR if a previous merge wrote it or it is empty"
    )


def _add_fisher_parser(commands: argparse._SubParsersAction) -> None:
    fisher = commands.add_parser(
        "fisher",
        help="estimate a causal LM's diagonal Fisher (the trainer's EWC estimator) for specgen merge --method fisher",
    )
    fisher.add_argument(
        "model", metavar="MODEL", help="a causal language model: directory (holding its tokenizer) or Hub id"
    )
    fisher.add_argument(
        "--data",
        required=True,
        type=Path,
        help="the texts: a .json file (a list of strings or of objects with --text-field), a .jsonl "
        "file (one per line) or a datasets directory (save_to_disk; its train split)",
    )
    fisher.add_argument(
        "--num-samples",
        required=True,
        type=int,
        help="how many texts, drawn at random (seeded), the Fisher is averaged over; each gets its own backward pass",
    )
    fisher.add_argument(
        "--output",
        required=True,
        type=Path,
        help="the .safetensors file to write (atomically), named by the checkpoint's tensors; never inside MODEL",
    )
    fisher.add_argument(
        "--fisher-type",
        choices=["true", "empirical"],
        default="true",
        help="true: labels sampled from the model (default); empirical: the text's own next tokens",
    )
    fisher.add_argument(
        "--text-field", default="text", help="the field holding the text in objects and datasets (default: text)"
    )
    fisher.add_argument(
        "--max-length", type=int, help="truncate each text to this many tokens (default: no truncation)"
    )
    fisher.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="texts per forward pass (default: 1); the Fisher does not depend on it beyond rounding",
    )
    fisher.add_argument(
        "--seed",
        type=int,
        default=42,
        help="seeds the choice of texts and the sampled labels (default: 42, TrainingArguments' seed)",
    )
    fisher.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float32",
        help="the dtype the model runs in (default: float32); the Fisher is summed in float32",
    )
    fisher.add_argument("--device", help="default: cuda when available, else cpu")
    fisher.add_argument(
        "--overwrite", action="store_true", help="replace OUTPUT if it exists (a file; never an input)"
    )


def _add_eval_parsers(commands: argparse._SubParsersAction) -> None:
    from .eval.suites import SUITES  # names and descriptions only: no model stack

    evaluate = commands.add_parser("eval", help="score a model on named suites and write a result record (JSON)")
    evaluate.add_argument("--model", required=True, help="model directory or Hub id")
    evaluate.add_argument(
        "--suite",
        action="append",
        required=True,
        metavar="NAME",
        help="repeatable; one of: " + "; ".join(f"{k} ({v})" for k, v in SUITES.items()),
    )
    evaluate.add_argument("--output", required=True, type=Path, help="the result record to write (.json)")
    evaluate.add_argument("--method", required=True, help="how the model was made: full, l2, lora, pre-trained, ...")
    evaluate.add_argument("--alpha", type=float, help="WiSE-FT alpha, if the model is a merge")
    evaluate.add_argument("--hyperparameter", help="the method's strength setting, e.g. l2_lambda")
    evaluate.add_argument("--value", type=float, help="its value, e.g. 0.1")
    evaluate.add_argument("--limit", type=int, help="at most this many examples per task (quick checks)")
    evaluate.add_argument(
        "--num-fewshot", type=int, help="few-shot examples per prompt, LM suites only (default: each task's own)"
    )
    evaluate.add_argument("--batch-size", type=int, default=32, help="examples per forward pass (default: 32)")
    evaluate.add_argument("--device", help="default: cuda when available, else cpu")
    report = commands.add_parser("report", help="combine result records into report.json, report.md and report.png")
    report.add_argument(
        "results", nargs="+", type=Path, help="record files (one record or a list) or directories of them"
    )
    report.add_argument(
        "--output-dir", required=True, type=Path, help="where to write report.json, report.md and report.png"
    )
    report.add_argument("--title", help="title of the table and the plot")
    report.add_argument(
        "--combine",
        action="store_true",
        help="RESULTS are report directories (e.g. one per recipe): write one report.md / report.json over them",
    )


def _evaluate(args: argparse.Namespace) -> None:
    import time

    from .eval.records import ResultRecord
    from .eval.suites import check_suites, evaluate_suites

    _check_model_source(args.model)
    check_suites(args.suite, both_sides=True)
    if (args.hyperparameter is None) != (args.value is None):
        raise ValueError("--hyperparameter and --value go together")
    start = time.perf_counter()
    scores = evaluate_suites(
        args.model,
        args.suite,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        device=args.device,
    )
    if not scores["speciality"]:  # another process of a multi-process run: the main one writes
        return
    record = ResultRecord(
        method=args.method,
        alpha=args.alpha,
        hyperparameter=args.hyperparameter,
        value=args.value,
        speciality=scores["speciality"],
        generality=scores["generality"],
        cost={"eval_s": round(time.perf_counter() - start, 1)},
        model=str(args.model),
    )
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
    from .eval.records import load_records
    from .eval.report import DEFAULT_TITLE, combine_reports, write_report

    if args.combine:
        paths = combine_reports(args.results, args.output_dir)
    else:
        paths = write_report(load_records(args.results), args.output_dir, title=args.title or DEFAULT_TITLE)
    for path in paths.values():
        print(f"wrote {path}")


def _merge_options(args: argparse.Namespace) -> MergeOptions:
    """The options of `merge` / `merge_sweep`; a `MergeError` for a method's option given with another method."""
    parameters: dict[str, float] = {}
    inputs: dict[str, str] = {}
    for dest, value in vars(args).items():
        if value is None:
            continue
        if dest.startswith(_PARAM):
            owner, name = dest.removeprefix(_PARAM).split(":", 1)
            if owner != args.method:
                raise MergeError(
                    f"{_param_flag(owner, name)} is an option of method {owner}, not of {args.method} "
                    f"(--method {owner} to use it)"
                )
            parameters[name] = value
        elif dest.startswith(_INPUT):
            name = dest.removeprefix(_INPUT)
            if name not in merge_methods.get_method(args.method).inputs:
                owners = [m.name for m in merge_methods.METHODS.values() if name in m.inputs]
                raise MergeError(
                    f"{_input_flag(name)} is an input of method {' or '.join(owners)}, not of "
                    f"{args.method} (--method {owners[0]} to use it)"
                )
            inputs[name] = value
    return MergeOptions(
        method=args.method,
        weights=args.weights,
        method_params=parameters,
        method_inputs=inputs,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite="any" if args.overwrite_any else args.overwrite,
        extrapolate=args.extrapolate,
        keep_adapter=args.keep_adapter,
    )


def _alpha_schedule(args: argparse.Namespace, alpha: float | None) -> AlphaSchedule | None:
    """The schedule the options describe at `alpha` (a sweep's shape: alpha None); None for one plain alpha
    in a sweep (each alpha is then every tensor's)."""
    if args.non_linear_alpha is not None and not args.linear_only:
        raise MergeError("--non-linear-alpha goes with --linear-only")
    shaped = args.group_alphas is not None or args.alpha_rule or args.linear_only or args.outside_alpha is not None
    if not shaped and args.command == "sweep":
        return None
    return AlphaSchedule(
        alpha=alpha,
        group_alphas=args.group_alphas,
        outside_alpha=args.outside_alpha,
        rules=tuple(args.alpha_rule or ()),
        linear_only=args.linear_only,
        non_linear_alpha=1.0 if args.non_linear_alpha is None else args.non_linear_alpha,
    )


def _merge(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from .merge.run import merge, merge_sweep

    options = _merge_options(args)
    finetuned = args.finetuned[0] if len(args.finetuned) == 1 else args.finetuned
    if args.command == "merge":
        schedule = _alpha_schedule(args, args.alpha)
        try:
            scores = args.scores.read_text() if args.scores else None
        except OSError as error:  # a usage error like the others, not a traceback
            parser.error(f"--scores: {error}")
        out = merge(
            args.pretrained,
            finetuned,
            schedule,
            args.output_dir,
            options,
            push_to_hub=args.push_to_hub,
            private=args.private,
            scores=scores,
        )
        print(f"wrote {out}" + (f" and pushed it to {args.push_to_hub}" if args.push_to_hub else ""))
    else:
        shape = _alpha_schedule(args, None)
        for alpha, out in merge_sweep(
            args.pretrained, finetuned, args.alphas, args.output_dir, options, shape=shape
        ).items():
            print(f"alpha={alpha:g}: {out}")


def _fisher(args: argparse.Namespace) -> None:
    from .merge.fisher import check_fisher_output, estimate_fisher, read_texts, save_fisher

    for option, value, least in [
        ("--num-samples", args.num_samples, 1),
        ("--batch-size", args.batch_size, 1),
        ("--max-length", args.max_length, 2),
    ]:
        if value is not None and value < least:
            raise ValueError(f"{option} must be at least {least}, got {value}")
    _check_model_source(args.model)
    if not args.data.exists():
        raise ValueError(f"{args.data}: no such file or directory (--data)")
    local = [source for source in (args.model, args.data) if Path(source).exists()]
    output = check_fisher_output(args.output, local, args.overwrite)
    texts = read_texts(args.data, args.text_field)
    model, tokenizer = _causal_lm(args.model, args.dtype, args.device)
    fisher = estimate_fisher(
        model,
        tokenizer,
        texts,
        args.num_samples,
        args.fisher_type,
        max_length=args.max_length,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    metadata = {
        "model": args.model,
        "fisher_type": args.fisher_type,
        "num_samples": args.num_samples,
        "seed": args.seed,
    }
    save_fisher(fisher, output, overwrite=args.overwrite, metadata=metadata)
    print(f"wrote {output}: the {args.fisher_type} Fisher of {len(fisher)} tensors")


def _hma(args: argparse.Namespace) -> None:
    import json

    from .atomic import atomic_file
    from .merge import AlphaSchedule, MergeOptions, generate_completions, merge, search_group_alphas
    from .merge.fisher import read_texts
    from .merge.options import check_shard_size
    from .merge.output import check_output_dir

    for option, value, least in [
        ("--groups", args.groups, 1),
        ("--steps", args.steps, 1),
        ("--batch-size", args.batch_size, 1),
        ("--max-length", args.max_length, 2),
        ("--patience", args.patience, 1),
        ("--max-new-tokens", 64 if args.max_new_tokens is None else args.max_new_tokens, 1),
    ]:
        if value < least:
            raise ValueError(f"{option} must be at least {least}, got {value}")
    for source in (args.pretrained, args.finetuned):
        _check_model_source(source)
    if args.data is not None and args.max_new_tokens is not None:
        raise ValueError("--max-new-tokens goes with --generate-from: with --data nothing is generated")
    data, option = (args.data, "--data") if args.data is not None else (args.generate_from, "--generate-from")
    if not data.exists():
        raise ValueError(f"{data}: no such file or directory ({option})")
    check_shard_size(args.max_shard_size)
    check_output_dir(args.output_dir, [args.pretrained, args.finetuned, data], args.overwrite)  # before searching
    samples: list[Any]
    if args.generate_from is not None:
        prompts = read_texts(data, args.prompt_field or "prompt")
        model, tokenizer = _causal_lm(args.finetuned, "float32", None)
        new_tokens = 64 if args.max_new_tokens is None else args.max_new_tokens
        samples = generate_completions(
            model, tokenizer, prompts, max_new_tokens=new_tokens, batch_size=args.batch_size
        )
        del model
    else:
        samples = read_texts(data, args.text_field)
        if args.prompt_field:
            samples = list(zip(read_texts(data, args.prompt_field), samples))
    found = search_group_alphas(
        args.pretrained,
        args.finetuned,
        samples,
        groups=args.groups,
        mean_alpha=args.mean_alpha,
        eps=args.eps,
        steps=args.steps,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        max_length=args.max_length,
        held_out=args.held_out,
        patience=args.patience,
        middle_penalty=args.middle_penalty,
        seed=args.seed,
    )
    schedule = AlphaSchedule(group_alphas=found.group_alphas)
    options = MergeOptions(max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    out = merge(args.pretrained, args.finetuned, schedule, args.output_dir, options)
    record = {
        "group_alphas": list(found.group_alphas),
        "mean_alpha": found.mean_alpha,
        "held_out_loss": found.held_out_loss,
        "uniform_loss": found.uniform_loss,
        "samples": len(samples),
        "state_bytes": found.state_bytes,
        "history": found.history,
    }
    if args.generate_from is not None:  # what the search scored: the fine-tuned model's answers
        record["generated"] = [{"prompt": prompt, "completion": completion} for prompt, completion in samples]
    with atomic_file(out / "hma_search.json") as temporary:
        Path(temporary).write_text(json.dumps(record, indent=2) + "\n")
    ratios = ", ".join(f"{a:.4g}" for a in found.group_alphas)
    print(
        f"wrote {out}: group alphas {ratios} (mean {found.mean_alpha:g}); held-out loss {found.held_out_loss:.4f}, "
        f"uniform {found.uniform_loss:.4f}"
    )


def _causal_lm(source: str, dtype: str, device: str | None) -> tuple[Any, Any]:
    """The model (in `dtype`, on `device`) and its tokenizer; one line where either cannot be loaded."""
    import torch
    import transformers

    path = Path(source)
    if path.is_dir() and not any(next(path.glob(p), None) for p in ("tokenizer*", "vocab.*", "*.model", "*.tiktoken")):
        raise ValueError(
            f"{source}: no tokenizer files (tokenizer.json, tokenizer_config.json, ...): save the tokenizer "
            "beside the model"
        )
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"{source}: no tokenizer could be loaded from it ({str(error).splitlines()[0]})") from None
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype(dtype))
    except ValueError as error:  # e.g. an architecture that is no causal LM
        raise ValueError(f"{source}: not a causal language model ({str(error).splitlines()[0]})") from None
    return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")), tokenizer


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
        elif args.command == "fisher":
            _fisher(args)
        elif args.command == "hma":
            _hma(args)
        elif args.command == "push":
            from .merge.hub import push_merge

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
