"""Benchmark: step time and anchor memory of the regularizers against the plain trainers.

One run measures every configuration of a suite on the same randomly initialised OPT model and
random data, so that the ratios are comparable: the median seconds per optimizer step (warm-up
steps excluded) of the plain trainer and of its SpecGen version with each regularizer alone, and
the bytes the pre-trained anchor adds (`trainer.anchor_memory()`).

Suites: `trainer` (`Trainer` vs `SpecGenTrainer`, full fine-tuning and LoRA) and `trl` (TRL's
`SFTTrainer` and `DPOTrainer` vs `SpecGenSFTTrainer` / `SpecGenDPOTrainer` with L2 and with KD).
Shapes: `small` (OPT 11.8M) and `galactica-125m` (OPT at Galactica-125m's shape: hidden 768, 12
layers, vocabulary 50,000, random weights, no download; SGD so that 8 configurations fit in 24 GiB).

The configurations are interleaved step by step: each trainer trains in its own thread, but only
one runs at a time, and they take one optimizer step each in turn (the order reversed every
other round). A slow spell of the machine thus hits every configuration alike, and each timed
step has a baseline step beside it (the `paired` column: median of the per-round ratios).
EWC's Fisher is estimated and timed before the first step, as `train()` would.

    .venv/bin/python benchmarks/bench_trainer.py --output benchmarks/results/trainer.json
    .venv/bin/python benchmarks/bench_trainer.py --shape galactica-125m --output benchmarks/results/trainer_125m.json
    .venv/bin/python benchmarks/bench_trainer.py --suite trl --output benchmarks/results/trainer_trl.json

writes the JSON report to `--output` and a Markdown table beside it (`.md`), and prints the table.
"""

from __future__ import annotations

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed (imported by accelerate) would say so on stdout

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import OPTConfig, OPTForCausalLM, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from hf_specgen import SpecGenTrainer, SpecGenTrainingArguments


WEIGHT_TARGET = 1.05  # L1, L2-SP, EWC, MAS: at most 5% slower than the baseline
KD_TARGET = 1.40  # KD: one extra no-grad teacher forward and the KL
BATCH_TARGET = 1.6  # feature protection: one extra no-grad teacher forward
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
MIB = 2**20


@dataclass(frozen=True)
class BenchConfig:
    """One trainer configuration: plain `Trainer` when `specgen` is False."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    specgen: bool = True
    lora: bool = False
    target: float | None = None
    trainer: str = "trainer"  # "trainer", or TRL's "sft" / "dpo"

    @property
    def baseline(self) -> str:
        if self.trainer != "trainer":
            return f"{self.trainer} baseline"
        return "lora baseline" if self.lora else "baseline"


CONFIGS = [
    BenchConfig("baseline", specgen=False),
    BenchConfig("specgen, no regularizer", target=WEIGHT_TARGET),
    BenchConfig("l1", {"l1_lambda": 1e-4}, target=WEIGHT_TARGET),
    BenchConfig("l2", {"l2_lambda": 1e-2}, target=WEIGHT_TARGET),
    BenchConfig("l2 decoupled", {"l2_lambda": 1e-2, "l2_mode": "decoupled"}, target=WEIGHT_TARGET),
    BenchConfig("l2 bf16 anchor", {"l2_lambda": 1e-2, "anchor_dtype": "bfloat16"}, target=WEIGHT_TARGET),
    BenchConfig("ewc", {"ewc_lambda": 1.0, "ewc_num_samples": 16}, target=WEIGHT_TARGET),
    BenchConfig("mas", {"mas_lambda": 1.0, "mas_num_samples": 16}, target=WEIGHT_TARGET),
    BenchConfig("kd", {"kd_lambda": 1.0}, target=KD_TARGET),
    BenchConfig("feature", {"feature_lambda": 1.0}, target=BATCH_TARGET),
    BenchConfig("lora baseline", specgen=False, lora=True),
    BenchConfig("lora l2", {"l2_lambda": 1e-2}, lora=True, target=WEIGHT_TARGET),
    BenchConfig("lora kd", {"kd_lambda": 1.0}, lora=True, target=BATCH_TARGET),
]
TRL_CONFIGS = [
    BenchConfig("sft baseline", specgen=False, trainer="sft"),
    BenchConfig("sft l2", {"l2_lambda": 1e-2}, target=WEIGHT_TARGET, trainer="sft"),
    BenchConfig("sft kd", {"kd_lambda": 1.0}, target=KD_TARGET, trainer="sft"),
    BenchConfig("dpo baseline", specgen=False, trainer="dpo"),
    BenchConfig("dpo l2", {"l2_lambda": 1e-2}, target=WEIGHT_TARGET, trainer="dpo"),
    BenchConfig("dpo kd", {"kd_lambda": 1.0}, target=KD_TARGET, trainer="dpo"),
]
SUITES = {"trainer": CONFIGS, "trl": TRL_CONFIGS}
# Defaults of each shape (flags override them); the 125M shape times the full fine-tuning rows only.
SHAPES: dict[str, dict[str, Any]] = {
    "small": dict(hidden=384, layers=4, vocab=12000, batch_size=4, warmup=3, steps=30, optim="adamw_torch"),
    "galactica-125m": dict(
        hidden=768,
        layers=12,
        vocab=50000,
        batch_size=2,
        warmup=2,
        steps=16,
        optim="sgd",
        configs=["baseline", "specgen, no regularizer", "l1", "l2", "ewc", "mas", "kd", "feature"],
    ),
}
TRL_TOKENIZER_VOCAB = 1024  # the shipped tiny Galactica's tokenizer, which the TRL rows' model shares


class TurnTimer(TrainerCallback):
    """Times each optimizer step (`on_step_begin` to `on_step_end`) of a trainer run in a worker
    thread, and parks the thread before its first step and after each step until `take_turn`."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.error: BaseException | None = None
        self._go = threading.Event()
        self._parked = threading.Event()
        self._start = 0.0

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self._park()

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.times.append(time.perf_counter() - self._start)
        self._park()

    def _park(self) -> None:
        self._parked.set()
        self._go.wait()
        self._go.clear()

    def work(self, trainer: Trainer, threads: int) -> None:
        """The worker thread: `trainer.train()`, which parks at each turn."""
        torch.set_num_threads(threads)
        try:
            trainer.train()
        except BaseException as error:  # handed to the main thread by `wait_parked`
            self.error = error
        finally:
            self._parked.set()

    def wait_parked(self) -> None:
        self._parked.wait()
        if self.error is not None:
            raise RuntimeError("a benchmarked trainer failed") from self.error

    def take_turn(self) -> None:
        """Lets the worker run until it parks again: one optimizer step, or the end of training."""
        self._parked.clear()
        self._go.set()
        self.wait_parked()


@dataclass
class Run:
    """One configuration's trainer, its worker thread, and what was measured before training."""

    config: BenchConfig
    trainer: Trainer
    timer: TurnTimer
    thread: threading.Thread
    fisher_s: float | None
    trainable_bytes: int


def log(message: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:7.1f}s] {message}", file=sys.stderr, flush=True)


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001 - not installed
        return None


def git_revision() -> str | None:
    """The measured code's commit, `-dirty` with uncommitted changes; None outside a git checkout."""
    command = ["git", "describe", "--always", "--dirty"]
    try:
        described = subprocess.run(command, capture_output=True, text=True, check=True, cwd=Path(__file__).parent)
    except (OSError, subprocess.CalledProcessError):
        return None
    return described.stdout.strip()


def build_base_model(opts: argparse.Namespace) -> OPTForCausalLM:
    config = OPTConfig(
        vocab_size=opts.vocab,
        hidden_size=opts.hidden,
        word_embed_proj_dim=opts.hidden,
        ffn_dim=4 * opts.hidden,
        num_hidden_layers=opts.layers,
        num_attention_heads=opts.hidden // 64,
        max_position_embeddings=4 * opts.seq_len,  # DPO's pairs: text re-tokenized, prompt + answer
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        layerdrop=0.0,
    )
    torch.manual_seed(opts.seed)
    return OPTForCausalLM(config)


def build_dataset(opts: argparse.Namespace, kind: str = "trainer", tokenizer: Any = None) -> datasets.Dataset:
    """Random tokens, one distinct batch per step (a single epoch): token rows for `Trainer`, token rows
    with the second half as the completion for SFT, text pairs of the same lengths for DPO."""
    generator = torch.Generator().manual_seed(opts.seed)
    rows = opts.batch_size * (opts.warmup + opts.steps)
    ids = torch.randint(3, opts.vocab, (rows, opts.seq_len), generator=generator)
    if kind == "sft":
        half = opts.seq_len // 2
        return datasets.Dataset.from_dict(
            {"input_ids": ids.tolist(), "completion_mask": [[0] * half + [1] * (opts.seq_len - half)] * rows}
        )
    if kind == "dpo":
        half = opts.seq_len // 2
        text = lambda row: tokenizer.decode(row, skip_special_tokens=True)  # noqa: E731
        rejected = torch.randint(3, opts.vocab, (rows, opts.seq_len - half), generator=generator)
        return datasets.Dataset.from_dict(
            {
                "prompt": [text(r[:half]) for r in ids],
                "chosen": [text(r[half:]) for r in ids],
                "rejected": [text(r) for r in rejected],
            }
        )
    ids = ids.tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * opts.seq_len] * rows, "labels": ids})


def trainable_bytes(model: nn.Module) -> int:
    """Bytes of the trainable weights; `parameters()` counts tied weights once."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def fresh_model(cfg: BenchConfig, base: OPTForCausalLM, seed: int) -> nn.Module:
    """A copy of the pre-trained `base`, wrapped in a seeded LoRA adapter for LoRA configurations."""
    model = copy.deepcopy(base)
    if not cfg.lora:
        return model
    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))


def trainer_classes(cfg: BenchConfig) -> tuple[type, type]:
    """The (trainer, arguments) classes of a configuration."""
    if cfg.trainer == "trainer":
        return (SpecGenTrainer, SpecGenTrainingArguments) if cfg.specgen else (Trainer, TrainingArguments)
    import trl

    from hf_specgen import trl as specgen_trl

    name = cfg.trainer.upper()
    if cfg.specgen:
        return getattr(specgen_trl, f"SpecGen{name}Trainer"), getattr(specgen_trl, f"SpecGen{name}Config")
    return getattr(trl, f"{name}Trainer"), getattr(trl, f"{name}Config")


def start_run(
    cfg: BenchConfig,
    base: OPTForCausalLM,
    data: dict[str, datasets.Dataset],
    opts: argparse.Namespace,
    output_dir: str,
    tokenizer: Any = None,
) -> Run:
    """Builds the trainer, estimates (and times) EWC's Fisher and MAS's importance, and starts `train()` up to its
    first step."""
    model = fresh_model(cfg, base, opts.seed)
    trainer_cls, args_cls = trainer_classes(cfg)
    args = args_cls(
        output_dir=output_dir,
        max_steps=opts.warmup + opts.steps,
        per_device_train_batch_size=opts.batch_size,
        learning_rate=1e-4,
        optim=opts.optim,
        use_cpu=True,
        bf16=False,  # TRL's configs default to bf16
        report_to=[],
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        seed=opts.seed,
        **({"max_length": None} if cfg.trainer != "trainer" else {}),
        **cfg.overrides,
    )
    timer = TurnTimer()
    extra: dict[str, Any] = {}
    if cfg.trainer != "trainer":
        extra["processing_class"] = tokenizer
    if cfg.trainer == "dpo":
        extra["ref_model"] = copy.deepcopy(base)  # DPO would otherwise load its reference from the (absent) Hub name
    trainer = trainer_cls(model=model, args=args, train_dataset=data[cfg.trainer], callbacks=[timer], **extra)
    trainer.remove_callback(PrinterCallback)  # keeps stdout for the table
    fisher_s = None
    if cfg.overrides.get("ewc_lambda", 0.0) > 0 or cfg.overrides.get("mas_lambda", 0.0) > 0:
        start = time.perf_counter()
        trainer.specgen.begin_training(None)  # what train() does first; it then finds the Fisher ready
        fisher_s = time.perf_counter() - start
    thread = threading.Thread(target=timer.work, args=(trainer, opts.threads), name=cfg.name, daemon=True)
    thread.start()
    timer.wait_parked()
    return Run(cfg, trainer, timer, thread, fisher_s, trainable_bytes(model))


def weight_terms_seconds(run: Run, repeats: int = 5) -> float | None:
    """Median seconds of one application of the run's weight terms (value and gradient) on its trained
    weights: the part of a step they cost, measured alone, steadier than a difference of step times."""
    engine = getattr(run.trainer, "specgen", None)
    if not engine or not engine.weight_terms:
        return None
    for p in run.trainer.model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.apply_weight_terms(1.0)
        times.append(time.perf_counter() - start)
    engine.log_sums = {}
    return statistics.median(times)


def summarize(run: Run, baseline: Run, warmup: int) -> dict[str, Any]:
    times, base_times = run.timer.times[warmup:], baseline.timer.times[warmup:]
    median, base_median = statistics.median(times), statistics.median(base_times)
    quartiles = statistics.quantiles(times, n=4)
    ratio = median / base_median
    memory = run.trainer.anchor_memory() if run.config.specgen else {"weights": 0, "teacher": 0, "fisher": 0}
    alone = weight_terms_seconds(run)
    cfg = run.config
    return {
        "name": cfg.name,
        "suite": cfg.trainer,
        "trainer": type(run.trainer).__name__,
        "lora": cfg.lora,
        "overrides": cfg.overrides,
        "baseline": cfg.baseline,
        "median_step_s": median,
        "p25_step_s": quartiles[0],
        "p75_step_s": quartiles[2],
        "step_times_s": times,
        "ratio": ratio,
        "paired_ratio": statistics.median(t / b for t, b in zip(times, base_times)),
        "target": cfg.target,
        "passed": None if cfg.target is None else ratio <= cfg.target,
        "fisher_s": run.fisher_s,
        "weight_terms_s": alone,
        "weight_terms_share": None if alone is None else alone / base_median,
        "memory": {
            "trainable_bytes": run.trainable_bytes,
            "anchor_bytes": memory,
            "anchor_over_trainable": sum(memory.values()) / run.trainable_bytes,
        },
    }


def markdown(report: dict[str, Any]) -> str:
    model, settings = report["model"], report["settings"]
    versions = settings["versions"]
    title = "SpecGen TRL trainers" if settings["suite"] == "trl" else "SpecGenTrainer"
    lines = [
        f"# {title}: step time and anchor memory ({settings['shape']} shape)",
        "",
        f"OPT, {model['parameters'] / 1e6:.1f}M parameters (hidden {model['hidden']}, {model['layers']} layers, "
        f"vocab {model['vocab']}, tied embeddings); batch {settings['batch_size']} x {settings['seq_len']} random "
        f"tokens; {settings['warmup']} warm-up + {settings['steps']} timed optimizer steps per configuration, "
        f"interleaved step by step; optimizer {settings['optim']}; {settings['threads']} torch threads; torch "
        f"{versions['torch']}, transformers {versions['transformers']}, peft {versions['peft']}"
        + (f", trl {versions['trl']}" if versions.get("trl") else "")
        + f"; hf_specgen at {settings['revision']}.",
        "",
        "ratio: median step time / median step time of the row's baseline (`baseline`, `lora baseline`, `sft "
        "baseline`, `dpo baseline`: the plain trainer); paired: median of the per-round ratios. Anchor "
        "(`anchor_memory()`): weight snapshot, teacher and importances (EWC's Fisher, MAS's Omega), in MiB, "
        "and their sum as a multiple of the trainable weights.",
        "",
        "| config | median step (ms) | p25-p75 (ms) | ratio | paired | target | result | Fisher (s) "
        "| weight terms alone (ms, share of baseline step) | trainable (MiB) | weights (MiB) | teacher (MiB) "
        "| fisher (MiB) | anchor / trainable |",
        "|---|---:|---:|---:|---:|---:|:---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["results"]:
        memory, anchor = row["memory"], row["memory"]["anchor_bytes"]
        target = "-" if row["target"] is None else f"<= {row['target']:.2f}x"
        result = "-" if row["passed"] is None else ("PASS" if row["passed"] else "MISS")
        fisher = "-" if row["fisher_s"] is None else f"{row['fisher_s']:.2f}"
        alone = (
            "-"
            if row.get("weight_terms_s") is None
            else f"{row['weight_terms_s'] * 1e3:.0f} ({row['weight_terms_share']:.1%})"
        )
        lines.append(
            f"| {row['name']} | {row['median_step_s'] * 1e3:.0f} "
            f"| {row['p25_step_s'] * 1e3:.0f}-{row['p75_step_s'] * 1e3:.0f} | {row['ratio']:.3f}x "
            f"| {row['paired_ratio']:.3f}x | {target} | {result} | {fisher} | {alone} | "
            f"{memory['trainable_bytes'] / MIB:.2f} "
            f"| {anchor['weights'] / MIB:.2f} | {anchor['teacher'] / MIB:.2f} | {anchor['fisher'] / MIB:.2f} "
            f"| {memory['anchor_over_trainable']:.2f}x |"
        )
    lines += ["", f"Total benchmark time: {report['total_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--output", type=Path, default=Path("benchmarks/results/trainer.json"), help="JSON report path"
    )
    parser.add_argument(
        "--suite", choices=list(SUITES), default="trainer", help="Trainer, or TRL's SFT and DPO trainers"
    )
    parser.add_argument(
        "--shape", choices=list(SHAPES), default="small", help="the model's shape and the run's defaults"
    )
    parser.add_argument("--warmup", type=int, help="untimed optimizer steps per configuration")
    parser.add_argument("--steps", type=int, help="timed optimizer steps per configuration")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--hidden", type=int, help="a multiple of 64 (64-dim attention heads)")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--vocab", type=int, help="(the TRL suite uses the shipped tokenizer's vocabulary)")
    parser.add_argument("--optim", help="the trainers' optimizer (TrainingArguments.optim)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument(
        "--only", nargs="+", choices=[c.name for c in CONFIGS + TRL_CONFIGS], help="these configurations only"
    )
    opts = parser.parse_args()
    shape = SHAPES[opts.shape]
    for key, value in shape.items():
        if key != "configs" and getattr(opts, key) is None:
            setattr(opts, key, value)
    if opts.suite == "trl":
        opts.vocab = TRL_TOKENIZER_VOCAB
    if opts.only is None and opts.suite == "trainer" and "configs" in shape:
        opts.only = shape["configs"]
    if opts.steps < 2 or opts.warmup < 0 or opts.hidden % 64:
        parser.error("need --steps >= 2, --warmup >= 0 and --hidden a multiple of 64")
    return opts


def main() -> None:
    opts = parse_args()
    start = time.perf_counter()
    torch.set_num_threads(opts.threads)
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)

    suite = SUITES[opts.suite]
    configs = suite
    if opts.only:
        needed = set(opts.only) | {c.baseline for c in suite if c.name in opts.only}
        configs = [c for c in suite if c.name in needed]
    base = build_base_model(opts)
    tokenizer = None
    if opts.suite == "trl":
        from transformers import AutoTokenizer

        from hf_specgen.tiny.paths import lm_path

        tokenizer = AutoTokenizer.from_pretrained(lm_path())
    data = {kind: build_dataset(opts, kind, tokenizer) for kind in {c.trainer for c in configs}}
    n_params = sum(p.numel() for p in base.parameters())
    log(f"OPT model: {n_params / 1e6:.1f}M parameters; {len(configs)} configurations", start)

    with tempfile.TemporaryDirectory() as output_dir:
        runs: dict[str, Run] = {}
        for cfg in configs:
            runs[cfg.name] = run = start_run(cfg, base, data, opts, output_dir, tokenizer)
            log(f"built {cfg.name}" + (f" (Fisher: {run.fisher_s:.2f} s)" if run.fisher_s is not None else ""), start)
        total_steps = opts.warmup + opts.steps
        for step in range(total_steps):
            for cfg in configs if step % 2 == 0 else configs[::-1]:
                runs[cfg.name].timer.take_turn()
            log(f"step {step + 1}/{total_steps}" + (" (warm-up)" if step < opts.warmup else ""), start)
        for run in runs.values():  # lets each train() return
            run.timer.take_turn()
            run.thread.join()

    report = {
        "model": {
            "type": "OPTForCausalLM",
            "parameters": n_params,
            "hidden": opts.hidden,
            "layers": opts.layers,
            "vocab": opts.vocab,
            "tie_word_embeddings": base.config.tie_word_embeddings,
        },
        "settings": {
            "suite": opts.suite,
            "shape": opts.shape,
            "optim": opts.optim,
            "batch_size": opts.batch_size,
            "seq_len": opts.seq_len,
            "warmup": opts.warmup,
            "steps": opts.steps,
            "threads": opts.threads,
            "seed": opts.seed,
            "lora": LORA,
            "targets": {"weight_terms": WEIGHT_TARGET, "kd": KD_TARGET, "feature": BATCH_TARGET},
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "revision": git_revision(),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
                "trl": _version("trl"),
            },
        },
        "results": [summarize(runs[c.name], runs[c.baseline], opts.warmup) for c in configs],
        "total_s": time.perf_counter() - start,
    }
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    opts.output.with_suffix(".md").write_text(table)
    print(table)
    log(f"wrote {opts.output} and {opts.output.with_suffix('.md')}", start)


if __name__ == "__main__":
    main()
