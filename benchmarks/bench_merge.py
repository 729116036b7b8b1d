"""Benchmark: streamed WiSE-FT merging (`hf_specgen.merge`) against a plain copy and mergekit.

One run builds (or reuses, from `--workdir`) a synthetic pair of fp32 `LlamaForCausalLM`
checkpoints of more than 1 GB each, saved with different shard sizes: "pretrained", randomly
initialised, and "finetuned", the same weights plus Gaussian noise. Then, each in its own child
process and each `--repeats` times (the order reversed every other round):

* `import`: `import hf_specgen.merge` alone (its names load on first use: each merge process below
  also imports torch and transformers when it merges);
* `copytree`: `shutil.copytree` of the fine-tuned checkpoint, the I/O floor; `copytree_synced`: the same
  followed by `os.sync()`, so that its output is on the disk at exit, as a merge's is;
* `wise_ft`: `wise_ft(pre, ft, alpha=0.5, out)`;
* `mergekit`: `mergekit-yaml` with `merge_method: linear`, weights 0.5 / 0.5, on the CPU;
* `sweep`: `wise_ft_sweep` over 5 alphas, against `separate`: 5 `wise_ft` calls in one process, and
  `separate_processes`: 5 merge processes, one after the other;
* `groups`: a heterogeneous merge (`AlphaSchedule(group_alphas=(0.25, 0.5, 0.75))`, HMA's three
  groups of blocks), against `wise_ft`;
* `fisher`: Fisher-weighted averaging (`MergeOptions(method="fisher")`) with two synthetic Fisher
  diagonals sharded like the checkpoints (the Fisher files read shard by shard with the weights),
  against `wise_ft`: time within 2x, peak RSS within the merge target plus one Fisher shard;
* the time breakdown: `phase_*` children, each doing one step of a merge more than the one before
  (interpreter, `import torch`, plan, read, compute), and the disk's floor: the output's bytes written
  with O_DIRECT (`disk`: one output, `disk_sweep`: a sweep's outputs at once). The `floor:` rows of the
  targets add these up, round by round, into the least time a merge or a sweep can take on this
  machine, against the runs the targets compare with.

Each child's wall time, CPU time and page faults (`wait4`), its peak RSS (the kernel's high-water
mark `VmHWM`) and the peaks of its anonymous and file-backed RSS, these three polled from
`/proc/<pid>/status`, are recorded; the disk is synced before each child, so that no run pays for
the previous one's writes. mergekit (`requirements-bench.txt`) is installed into its own virtual
environment under `--workdir`, never into the project's; if that fails, the report says why and
the rest is measured all the same.
Finally a few tensors of the `wise_ft` and mergekit outputs are checked against `0.5 * (pre + ft)`,
and of the `groups` and `fisher` outputs against their formulas, all in float64.

    .venv/bin/python benchmarks/bench_merge.py --output benchmarks/results/merge.json

writes the JSON report to `--output` and a Markdown table beside it (`.md`), and prints the table.
"""

from __future__ import annotations

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed (imported by accelerate) would say so on stdout

import argparse
import hashlib
import json
import math
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import torch
import transformers
from safetensors import safe_open


REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = Path(__file__).with_name("requirements-bench.txt")
TORCH_PIN = f"torch=={torch.__version__.split('+')[0]}"  # the CPU wheel on disk; another version pulls CUDA
MB = 10**6  # shard sizes ("400MB") are decimal, as transformers and mergekit read them
ALPHA = 0.5
BF16_ALPHA = 0.3  # the bf16 rows: an alpha where float32 arithmetic is not exact for bf16 inputs
SWEEP_ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]
PRETRAINED_SHARD, FINETUNED_SHARD, OUTPUT_SHARD = "400MB", "300MB", "400MB"
FISHER_SHARD = "400MB"
GROUP_ALPHAS = (0.25, 0.5, 0.75)
FISHER_TIME_FACTOR = 2.0  # target: a Fisher merge within 2x the time of wise_ft
COPY_FACTOR = 5.0  # target: wise_ft within 5x the time of copytree (fp32 and bf16)
MERGEKIT_FACTOR = 0.5  # target: wise_ft within half of mergekit's time
SWEEP_FACTOR = 0.6  # target: a 5-alpha sweep within 0.6x the time of five separate merges
NOISE = 0.01  # standard deviation of the fine-tuning perturbation
RSS_FACTOR, RSS_SLACK = 2.5, 300 * MB  # target: peak RSS <= 2.5 x largest shard + 300 MB
TOLERANCE = 1e-6  # max abs difference to 0.5 * (pre + ft) computed in float64
POLL_S = 0.02
STATUS_FIELDS = ("VmHWM", "RssAnon", "RssFile")

# The child processes: sys.argv[1:] are their arguments.
COPY = "import shutil, sys; shutil.copytree(sys.argv[1], sys.argv[2])"
COPY_SYNCED = "import os, shutil, sys; shutil.copytree(sys.argv[1], sys.argv[2]); os.sync()"
IMPORT = "import hf_specgen.merge"
WISE_FT = """import sys
from hf_specgen.merge import wise_ft
wise_ft(sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], max_shard_size=sys.argv[5])"""
SWEEP = """import json, sys
from hf_specgen.merge import wise_ft_sweep
wise_ft_sweep(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4], max_shard_size=sys.argv[5])"""
SEPARATE = """import json, sys
from pathlib import Path
from hf_specgen.merge import alpha_dirname, wise_ft
for alpha in json.loads(sys.argv[3]):
    wise_ft(sys.argv[1], sys.argv[2], alpha, Path(sys.argv[4]) / alpha_dirname(alpha), max_shard_size=sys.argv[5])"""
# What a user without `wise_ft_sweep` runs: one merge process per alpha (each imports torch), one after the other.
SEPARATE_PROCESSES = """import json, subprocess, sys
from pathlib import Path
merge = "import sys\\nfrom hf_specgen.merge import wise_ft\\n" \\
    "wise_ft(sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], max_shard_size=sys.argv[5])"
for alpha in json.loads(sys.argv[3]):
    out = Path(sys.argv[4]) / f"alpha_{alpha:g}"
    command = [sys.executable, "-c", merge, sys.argv[1], sys.argv[2], str(alpha), str(out), sys.argv[5]]
    subprocess.run(command, check=True)"""
GROUPS = """import json, sys
from hf_specgen.merge import AlphaSchedule, MergeOptions, merge
schedule = AlphaSchedule(group_alphas=json.loads(sys.argv[3]))
merge(sys.argv[1], sys.argv[2], schedule, sys.argv[4], MergeOptions(max_shard_size=sys.argv[5]))"""
FISHER = """import sys
from hf_specgen.merge import MergeOptions, merge
inputs = {"fisher_pre": sys.argv[6], "fisher_finetuned": sys.argv[7]}
merge(sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4],
      MergeOptions(method="fisher", method_inputs=inputs, max_shard_size=sys.argv[5]))"""

# The time breakdown: one child per phase, each doing the phases before it too (sys.argv[1] names the phase).
PHASES = """import sys
phase = sys.argv[1]
if phase == "python":
    sys.exit()
import torch
if phase == "torch":
    sys.exit()
from hf_specgen.merge.chunked import flat_pieces
from hf_specgen.merge.options import MergeOptions
from hf_specgen.merge.run import _prepare
from hf_specgen.merge.schedule import AlphaSchedule
planned = _prepare(sys.argv[2], [sys.argv[3]], MergeOptions())
planned.alphas(AlphaSchedule(alpha=0.5))
if phase == "plan":
    sys.exit()
for tensor in planned.plan.tensors:
    if phase == "read":
        tensor.base(), [load() for load in tensor.finetuned]
        continue
    for output in tensor.compute([0.5], planned.method, chunked=True):
        for piece in flat_pieces(output):
            pass"""
# The disk's floor: `streams` files of `size` bytes written at once with O_DIRECT, 16 MB at a time, random bytes.
DISK = """import mmap, os, sys, threading
size, streams, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
os.makedirs(out)
buffer = mmap.mmap(-1, 16 * 2**20)
buffer.write(os.urandom(len(buffer)))
def write(i):
    fd = os.open(os.path.join(out, str(i)), os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    done = 0
    while done < size:
        done += os.write(fd, buffer)
    os.close(fd)
threads = [threading.Thread(target=write, args=(i,)) for i in range(streams)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()"""


class ChildFailed(RuntimeError):
    """A measured child process exited with an error; the message ends with its output's tail."""


@dataclass
class Sample:
    """One child process: wall and CPU time, page faults, peak RSS (`VmHWM`), polled peaks of its two kinds of RSS."""

    seconds: float
    user_s: float
    sys_s: float
    minor_faults: int
    peak_rss: int
    peak_anon: int
    peak_file: int


@dataclass
class Run:
    """One measured configuration: the command that writes its output to `out`."""

    name: str
    description: str
    command: Callable[[Path], list[str]]
    bytes_written: int
    merge: bool = True  # a merge: held to the RSS target
    rss_extra: int = 0  # bytes the RSS target allows beyond a two-input merge's (e.g. one Fisher shard)
    keep_output: bool = False  # for the correctness check
    evict: list[Path] = field(default_factory=list)  # dropped from the page cache before the run, read back after
    phase: bool = False  # a row of the time breakdown
    samples: list[Sample] = field(default_factory=list)
    error: str | None = None


def log(message: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:7.1f}s] {message}", file=sys.stderr, flush=True)


def git_revision() -> str | None:
    """The measured code's commit, `-dirty` with uncommitted changes; None outside a git checkout."""
    command = ["git", "describe", "--always", "--dirty"]
    try:
        described = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO)
    except (OSError, subprocess.CalledProcessError):
        return None
    return described.stdout.strip()


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def size_to_int(size: str) -> int:
    return int(size.removesuffix("MB")) * MB


def model_config(layers: int) -> dict[str, Any]:
    """A Llama of 297M parameters (1.19 GB in fp32) at 18 layers; untied embeddings."""
    return {
        "vocab_size": 32000,
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": layers,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "tie_word_embeddings": False,
    }


def weight_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def parameter_count(directory: Path) -> int:
    count = 0
    for file in weight_files(directory):
        with safe_open(file, framework="pt") as f:
            count += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return count


def weight_keys(directory: Path) -> dict[str, Path]:
    """Tensor name -> the file that stores it."""
    keys = {}
    for file in weight_files(directory):
        with safe_open(file, framework="pt") as f:
            keys.update(dict.fromkeys(f.keys(), file))
    return keys


def build_checkpoints(workdir: Path, layers: int, seed: int, dtype: str = "float32") -> tuple[Path, Path]:
    """The pretrained / finetuned pair in `dtype` (float32, or bfloat16: the common case for LLMs), cached
    under `workdir` by its specification.

    One model in memory at a time: built, saved, perturbed in place tensor by tensor, saved again.
    """
    spec = {
        "config": model_config(layers),
        "seed": seed,
        "noise": NOISE,
        "transformers": transformers.__version__,
        "shards": [PRETRAINED_SHARD, FINETUNED_SHARD],
        **({"dtype": dtype} if dtype != "float32" else {}),
    }
    prefix = "checkpoints-" if dtype == "float32" else f"checkpoints-{dtype}-"
    root = workdir / f"{prefix}{hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]}"
    pretrained, finetuned, stamp = root / "pretrained", root / "finetuned", root / "spec.json"
    if stamp.is_file():
        return pretrained, finetuned
    for stale in workdir.glob(f"{prefix}*"):
        if dtype != "float32" or not stale.name.startswith("checkpoints-bfloat16-"):
            shutil.rmtree(stale)
    from transformers import LlamaConfig, LlamaForCausalLM

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**spec["config"])).to(getattr(torch, dtype))
    model.save_pretrained(pretrained, max_shard_size=PRETRAINED_SHARD)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator).to(parameter.dtype), alpha=NOISE)
    model.save_pretrained(finetuned, max_shard_size=FINETUNED_SHARD)
    stamp.write_text(json.dumps(spec, indent=2) + "\n")
    return pretrained, finetuned


def build_fisher(checkpoint: Path, seed: int) -> Path:
    """A synthetic diagonal Fisher of `checkpoint` (positive, heavy-tailed: `exp(2 * N(0, 1))`),
    sharded by `FISHER_SHARD` as `fisher-0000i-of-0000n.safetensors` with `fisher.safetensors.index.json`
    (the layout `specgen merge --fisher-pre DIR` reads), cached beside the checkpoint."""
    from huggingface_hub import save_torch_state_dict

    directory = checkpoint.parent / f"fisher-{checkpoint.name}"
    stamp = directory / "done"
    if stamp.is_file():
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    generator = torch.Generator().manual_seed(seed)
    fisher = {}
    for file in weight_files(checkpoint):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                fisher[key] = torch.randn(shape, generator=generator).mul_(2).exp_()
    save_torch_state_dict(
        fisher, directory, filename_pattern="fisher{suffix}.safetensors", max_shard_size=FISHER_SHARD
    )
    stamp.write_text("")
    return directory


def install_mergekit(workdir: Path) -> dict[str, Any]:
    """mergekit in `workdir/mergekit-venv` (reused while `requirements-bench.txt` is unchanged).

    Returns `executable` (None when the install failed), `version`, `install_s` and `error`."""
    venv = workdir / "mergekit-venv"
    stamp, requirements = venv / "requirements-bench.txt", REQUIREMENTS.read_text()
    info: dict[str, Any] = {"executable": None, "version": None, "install_s": 0.0, "error": None}
    start = time.perf_counter()
    if not (stamp.is_file() and stamp.read_text() == requirements):
        shutil.rmtree(venv, ignore_errors=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        for step in ([sys.executable, "-m", "venv", str(venv)], [*pip, TORCH_PIN], [*pip, "-r", str(REQUIREMENTS)]):
            done = subprocess.run(step, capture_output=True, text=True)
            info["install_s"] = time.perf_counter() - start
            if done.returncode:
                output = tail(done.stderr + done.stdout)
                info["error"] = f"`{' '.join(step)}` failed (exit {done.returncode}):\n{output}"
                return info
        stamp.write_text(requirements)
    version = "import importlib.metadata as m; print(m.version('mergekit'))"
    done = subprocess.run([str(venv / "bin" / "python"), "-c", version], capture_output=True, text=True)
    info["version"] = done.stdout.strip() or None
    info["executable"] = venv / "bin" / "mergekit-yaml"
    return info


def memory_status(pid: int) -> dict[str, int]:
    """`VmHWM` (peak RSS so far), `RssAnon` and `RssFile` of process `pid`, in bytes; empty once it has exited."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    fields = (line.split(":", 1) for line in status.splitlines() if line.startswith(STATUS_FIELDS))
    return {name: int(value.split()[0]) * 1024 for name, value in fields}


def measure(command: list[str], log_path: Path) -> Sample:
    """Runs `command` as a child process (output to `log_path`) and polls its memory until it exits.

    The peak RSS is the kernel's high-water mark `VmHWM`, so a peak between two polls is seen too.
    CPU times and page faults come from `wait4`; its `ru_maxrss` is not used, as Linux carries the
    parent's RSS at fork over into it."""
    os.sync()  # the previous run's dirty pages are written now, not during this run
    peaks = dict.fromkeys(STATUS_FIELDS, 0)
    with log_path.open("w") as log_file:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO)
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            for name, value in memory_status(process.pid).items():
                peaks[name] = max(peaks[name], value)
            time.sleep(POLL_S)
        seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: Popen must not wait again
    if process.returncode:
        raise ChildFailed(f"exit {process.returncode}:\n{tail(log_path.read_text())}")
    return Sample(
        seconds, usage.ru_utime, usage.ru_stime, usage.ru_minflt, peaks["VmHWM"], peaks["RssAnon"], peaks["RssFile"]
    )


def read_tensor(directory: Path, key: str) -> torch.Tensor:
    with safe_open(weight_keys(directory)[key], framework="pt") as f:
        return f.get_tensor(key).double()


def group_alpha(key: str, layers: int) -> float:
    """The alpha `GROUP_ALPHAS` gives `key` (blocks split into contiguous groups; the mean outside them)."""
    parts = key.split(".")
    if parts[:2] == ["model", "layers"]:
        return GROUP_ALPHAS[int(parts[2]) * len(GROUP_ALPHAS) // layers]
    return statistics.fmean(GROUP_ALPHAS)


def reference(
    name: str, key: str, pre: torch.Tensor, ft: torch.Tensor, fishers: tuple[Path, Path], layers: int
) -> torch.Tensor:
    """What output `name` should hold for `key`, in float64."""
    if name == "groups":
        alpha = group_alpha(key, layers)
        return (1 - alpha) * pre + alpha * ft
    if name == "fisher":
        f_pre, f_ft = (read_tensor(d, key).clamp_min(1e-8) for d in fishers)  # the method's default epsilon
        return (ALPHA * f_ft * ft + (1 - ALPHA) * f_pre * pre) / (ALPHA * f_ft + (1 - ALPHA) * f_pre)
    return (1 - ALPHA) * pre + ALPHA * ft


def spot_check(
    pretrained: Path, finetuned: Path, outputs: dict[str, Path], fishers: tuple[Path, Path], layers: int
) -> dict[str, Any]:
    """Max abs differences, on a few tensors, of each output to its float64 reference, and of wise_ft to mergekit."""
    keys = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        f"model.layers.{layers // 2}.mlp.down_proj.weight",
        f"model.layers.{layers - 1}.input_layernorm.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]
    expected_keys = set(weight_keys(finetuned))
    result: dict[str, Any] = {
        "tolerance": TOLERANCE,
        "same_keys": {name: set(weight_keys(path)) == expected_keys for name, path in outputs.items()},
        "tensors": [],
    }
    for key in keys:
        pre, ft = read_tensor(pretrained, key), read_tensor(finetuned, key)
        merged = {name: read_tensor(path, key) for name, path in outputs.items()}
        row = {
            "key": key,
            **{
                f"{name} vs reference": (t - reference(name, key, pre, ft, fishers, layers)).abs().max().item()
                for name, t in merged.items()
            },
        }
        if "wise_ft" in merged and "mergekit" in merged:
            row["wise_ft vs mergekit"] = (merged["wise_ft"] - merged["mergekit"]).abs().max().item()
        result["tensors"].append(row)
    differences = [value for row in result["tensors"] for name, value in row.items() if name != "key"]
    result["passed"] = all(result["same_keys"].values()) and max(differences) <= TOLERANCE
    return result


def ordered_bits(tensor: torch.Tensor) -> torch.Tensor:
    """The bit patterns as integers in the order of the values: two values' difference is their distance in ulps."""
    signed = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[tensor.dtype]
    bits = tensor.contiguous().view(signed).long()
    return torch.where(bits < 0, torch.iinfo(signed).min - bits, bits)


def exactness_check(
    pretrained: Path, finetuned: Path, bf16_pre: Path, bf16_ft: Path, outputs: dict[str, Path]
) -> dict[str, Any]:
    """Every tensor of the wise_ft outputs (fp32 at `ALPHA`, bf16 at `BF16_ALPHA`) and of the sweep's outputs
    strictly between 0 and 1 against `(1 - alpha) * pre + alpha * ft` in float64 rounded to the tensor's dtype, in
    ulps; the sweep's alpha 0 and 1 outputs against the inputs, byte for byte."""
    result: dict[str, Any] = {}
    cases = {
        "wise_ft": (pretrained, finetuned, ALPHA, outputs.get("wise_ft")),
        "wise_ft_bf16": (bf16_pre, bf16_ft, BF16_ALPHA, outputs.get("wise_ft_bf16")),
        **{
            f"sweep alpha {alpha:g}": (pretrained, finetuned, alpha, outputs["sweep"] / f"alpha-{alpha:g}")
            for alpha in SWEEP_ALPHAS
            if "sweep" in outputs and 0 < alpha < 1
        },
    }
    for name, (pre_dir, ft_dir, alpha, output) in cases.items():
        if output is None:
            continue
        pre_keys, ft_keys, out_keys = weight_keys(pre_dir), weight_keys(ft_dir), weight_keys(output)
        worst, elements = 0, 0
        for key, file in out_keys.items():
            with safe_open(file, framework="pt") as f:
                merged = f.get_tensor(key)
            with safe_open(pre_keys[key], framework="pt") as f:
                pre = f.get_tensor(key).double()
            with safe_open(ft_keys[key], framework="pt") as f:
                ft = f.get_tensor(key).double()
            expected = ((1 - alpha) * pre + alpha * ft).to(merged.dtype)
            worst = max(worst, int((ordered_bits(merged) - ordered_bits(expected)).abs().max()))
            elements += merged.numel()
        result[name] = {"max_ulps": worst, "elements": elements, "alpha": alpha, "passed": worst <= 1}
    if "sweep" in outputs:
        identical = {}
        for alpha, source in ((0.0, pretrained), (1.0, finetuned)):
            source_keys, out_keys = weight_keys(source), weight_keys(outputs["sweep"] / f"alpha-{alpha:g}")
            same = set(source_keys) == set(out_keys)
            for key, file in out_keys.items():
                if not same:
                    break
                with safe_open(file, framework="pt") as f, safe_open(source_keys[key], framework="pt") as g:
                    same = torch.equal(f.get_tensor(key).view(torch.uint8), g.get_tensor(key).view(torch.uint8))
            identical[f"{alpha:g}"] = same
        result["sweep_alpha_0_1_bit_identical"] = identical
    return result


def mergekit_command(executable: Path, config: Path, output: Path) -> list[str]:
    # --out-shard-size is documented as parameters but compared with bytes (mergekit/io/tensor_writer.py)
    return [
        str(executable),
        str(config),
        str(output),
        "--lazy-unpickle",
        "--out-shard-size",
        str(size_to_int(OUTPUT_SHARD)),
        "--no-copy-tokenizer",
        "--quiet",
    ]


def define_runs(
    pre: Path,
    ft: Path,
    fishers: tuple[Path, Path],
    checkpoint_bytes: int,
    mergekit: dict[str, Any],
    workdir: Path,
    bf16: tuple[Path, Path, int],
) -> list[Run]:
    python = sys.executable
    merge_args = [str(pre), str(ft)]
    fisher_shard = max(f.stat().st_size for d in fishers for f in d.glob("*.safetensors"))
    groups = json.dumps(list(GROUP_ALPHAS))

    def copy(name: str, description: str, script: str, source: Path, size: int, **options: Any) -> Run:
        """A copy of `source` by the child `script` (`COPY`, `COPY_SYNCED`): a floor, not a merge."""
        return Run(
            name, description, lambda out: [python, "-c", script, str(source), str(out)], size, False, **options
        )

    runs = [
        Run("import", "`import hf_specgen.merge` (start-up only)", lambda out: [python, "-c", IMPORT], 0, merge=False),
        copy("copytree", "`shutil.copytree` of finetuned (I/O floor)", COPY, ft, checkpoint_bytes),
        copy(
            "copytree_synced",
            "`shutil.copytree` of finetuned, then `os.sync()` (its output on the disk at exit, as the merges' are)",
            COPY_SYNCED,
            ft,
            checkpoint_bytes,
        ),
        Run(
            "wise_ft",
            f"`wise_ft`, alpha={ALPHA:g}",
            lambda out: [python, "-c", WISE_FT, *merge_args, str(ALPHA), str(out), OUTPUT_SHARD],
            checkpoint_bytes,
            keep_output=True,
        ),
        Run(
            "groups",
            f"`merge`, group alphas {', '.join(f'{a:g}' for a in GROUP_ALPHAS)} (HMA)",
            lambda out: [python, "-c", GROUPS, *merge_args, groups, str(out), OUTPUT_SHARD],
            checkpoint_bytes,
            keep_output=True,
        ),
        Run(
            "fisher",
            f"`merge`, method fisher, alpha={ALPHA:g}",
            lambda out: [python, "-c", FISHER, *merge_args, str(ALPHA), str(out), OUTPUT_SHARD, *map(str, fishers)],
            checkpoint_bytes,
            keep_output=True,
            rss_extra=fisher_shard,
        ),
    ]
    if mergekit["executable"] is not None:
        config = workdir / "mergekit.yml"  # JSON is YAML
        models = [
            {"model": str(pre), "parameters": {"weight": 1 - ALPHA}},
            {"model": str(ft), "parameters": {"weight": ALPHA}},
        ]
        config.write_text(json.dumps({"merge_method": "linear", "dtype": "float32", "models": models}, indent=2))
        mergekit["config"] = json.loads(config.read_text())
        mergekit["command"] = " ".join(mergekit_command(Path("mergekit-yaml"), Path(config.name), Path("OUT")))
        runs.append(
            Run(
                "mergekit",
                f"mergekit {mergekit['version']} linear, weights {1 - ALPHA:g} / {ALPHA:g}",
                lambda out: mergekit_command(mergekit["executable"], config, out),
                checkpoint_bytes,
                keep_output=True,
            )
        )
    bf16_pre, bf16_ft, bf16_bytes = bf16  # the same model in bfloat16: half the bytes, the common case for LLMs
    runs += [
        copy("copytree_bf16", "bf16: `shutil.copytree` of finetuned (I/O floor)", COPY, bf16_ft, bf16_bytes),
        copy(
            "copytree_synced_bf16",
            "bf16: `shutil.copytree` of finetuned, then `os.sync()`",
            COPY_SYNCED,
            bf16_ft,
            bf16_bytes,
        ),
        Run(
            "wise_ft_bf16",
            f"bf16: `wise_ft`, alpha={BF16_ALPHA:g}",
            lambda out: [python, "-c", WISE_FT, str(bf16_pre), str(bf16_ft), str(BF16_ALPHA), str(out), OUTPUT_SHARD],
            bf16_bytes,
            keep_output=True,
        ),
    ]
    if mergekit["executable"] is not None:
        config_bf16 = workdir / "mergekit-bf16.yml"
        models = [
            {"model": str(bf16_pre), "parameters": {"weight": 1 - BF16_ALPHA}},
            {"model": str(bf16_ft), "parameters": {"weight": BF16_ALPHA}},
        ]
        config_bf16.write_text(json.dumps({"merge_method": "linear", "dtype": "bfloat16", "models": models}, indent=2))
        runs.append(
            Run(
                "mergekit_bf16",
                f"bf16: mergekit {mergekit['version']} linear, weights {1 - BF16_ALPHA:g} / {BF16_ALPHA:g}",
                lambda out: mergekit_command(mergekit["executable"], config_bf16, out),
                bf16_bytes,
            )
        )
    inputs = weight_files(pre) + weight_files(ft)
    runs += [
        copy(
            "copytree_cold",
            "cold: `shutil.copytree` of finetuned, read from the disk",
            COPY,
            ft,
            checkpoint_bytes,
            evict=weight_files(ft),
        ),
        Run(
            "wise_ft_cold",
            f"cold: `wise_ft`, alpha={ALPHA:g}, both inputs read from the disk",
            lambda out: [python, "-c", WISE_FT, *merge_args, str(ALPHA), str(out), OUTPUT_SHARD],
            checkpoint_bytes,
            evict=inputs,
        ),
    ]
    phases = {
        "python": "start the interpreter",
        "torch": "+ `import torch`",
        "plan": "+ import the merge, read headers, plan and check",
        "read": "+ map (read) every input tensor",
        "compute": "+ interpolate every output chunk (on the main thread), nothing written",
    }
    runs += [
        Run(f"phase_{name}", text, lambda out, n=name: [python, "-c", PHASES, n, *merge_args], 0, False, phase=True)
        for name, text in phases.items()
    ]
    alphas = json.dumps(SWEEP_ALPHAS)
    n = len(SWEEP_ALPHAS)
    runs += [
        Run(
            "disk",
            "the output's bytes written with O_DIRECT, one file (the disk's floor for a merge)",
            lambda out: [python, "-c", DISK, str(checkpoint_bytes), "1", str(out)],
            checkpoint_bytes,
            False,
            phase=True,
        ),
        Run(
            "disk_sweep",
            f"{n} outputs' bytes written with O_DIRECT, {n} files at once (the floor for a sweep)",
            lambda out: [python, "-c", DISK, str(checkpoint_bytes), str(n), str(out)],
            n * checkpoint_bytes,
            False,
            phase=True,
        ),
    ]
    runs += [
        Run(
            "sweep",
            f"`wise_ft_sweep`, {n} alphas",
            lambda out: [python, "-c", SWEEP, *merge_args, alphas, str(out), OUTPUT_SHARD],
            n * checkpoint_bytes,
            keep_output=True,
        ),
        Run(
            "separate",
            f"{n} `wise_ft` calls, one process",
            lambda out: [python, "-c", SEPARATE, *merge_args, alphas, str(out), OUTPUT_SHARD],
            n * checkpoint_bytes,
        ),
        Run(
            "separate_processes",
            f"{n} `wise_ft` processes, one after the other (what {n} `specgen merge` commands cost)",
            lambda out: [python, "-c", SEPARATE_PROCESSES, *merge_args, alphas, str(out), OUTPUT_SHARD],
            n * checkpoint_bytes,
            merge=False,  # its peak RSS is the parent's: the merges' are their own processes'
        ),
    ]
    return runs


def warm_page_cache(files: list[Path]) -> None:
    """Reads the inputs once, so that every run finds them in the page cache."""
    for file in files:
        with file.open("rb", buffering=0) as f:
            while f.read(64 * MB):
                pass


def evict(files: list[Path]) -> None:
    """Drops the files' pages from the page cache (`POSIX_FADV_DONTNEED`: clean pages, no privileges needed)."""
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def summarize(run: Run, copy_s: float | None, rss_target: int) -> dict[str, Any]:
    seconds = [s.seconds for s in run.samples]
    row: dict[str, Any] = {
        "name": run.name,
        "description": run.description,
        "error": run.error,
        "seconds": seconds,
        "phase": run.phase,
    }
    if not seconds:
        return row
    median = statistics.median(seconds)
    peak_rss = max(s.peak_rss for s in run.samples)
    row.update(
        {
            "median_s": median,
            "min_s": min(seconds),
            "max_s": max(seconds),
            "vs_copy": median / copy_s if copy_s and run.bytes_written else None,
            "bytes_written": run.bytes_written,
            "user_s": statistics.median(s.user_s for s in run.samples),
            "sys_s": statistics.median(s.sys_s for s in run.samples),
            "minor_faults": statistics.median(s.minor_faults for s in run.samples),
            "write_mb_s": run.bytes_written / MB / median if run.bytes_written else None,
            "peak_rss_bytes": peak_rss,
            "peak_anon_bytes": max(s.peak_anon for s in run.samples),
            "peak_file_bytes": max(s.peak_file for s in run.samples),
            "rss_target_bytes": rss_target + run.rss_extra if run.merge else None,
            "rss_passed": peak_rss <= rss_target + run.rss_extra if run.merge else None,
        }
    )
    return row


def targets(
    rows: dict[str, dict[str, Any]], correctness: dict[str, Any] | None, exactness: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    def describe(ratios: list[float]) -> str:
        return f"{statistics.median(ratios):.2f}x the time (median of rounds: {', '.join(f'{r:.2f}' for r in ratios)})"

    def faster(name: str, than: str, factor: float | None = None) -> dict[str, Any]:
        """Judged on the median of the per-round time ratios: the two runs of a round are adjacent in time.
        With `factor`: within `factor` times the time; without: faster."""
        pairs = list(zip(rows.get(name, {}).get("seconds", []), rows.get(than, {}).get("seconds", [])))
        goal = f"{name} faster than {than}" if factor is None else f"{name} within {factor:g}x the time of {than}"
        target = {"target": goal, "value": None, "passed": None, "paired_ratio": None}
        if pairs:
            ratios = [a / b for a, b in pairs]
            paired = statistics.median(ratios)
            passed = paired < 1 if factor is None else paired <= factor
            target.update(
                {
                    "paired_ratio": paired,
                    "round_ratios": ratios,
                    "passed": passed,
                    "value": describe(ratios),
                }
            )
        return target

    def reported(name: str, than: str, goal: str) -> dict[str, Any]:
        """`name`'s time against `than`'s, as `faster` measures it, with no target to pass."""
        return {**faster(name, than), "target": goal, "passed": None}

    def floor(parts: list[str], than: str, goal: str) -> dict[str, Any]:
        """The sum of `parts` against `than`, round by round (reported: a lower bound, no target)."""
        rounds = zip(*(rows.get(name, {}).get("seconds", []) for name in [*parts, than]))
        ratios = [sum(times[:-1]) / times[-1] for times in rounds]
        return {"target": goal, "value": describe(ratios) if ratios else None, "passed": None, "round_ratios": ratios}

    wise, fisher, start_up = rows["wise_ft"], rows["fisher"], rows["import"]
    checks = []
    for name, check in (exactness or {}).items():
        if "max_ulps" in check:
            checks.append(
                {
                    "target": f"{name if 'alpha' in name else name + ' (alpha ' + format(check['alpha'], 'g') + ')'}: "
                    "every output within 1 ulp of the float64 interpolation rounded to its dtype",
                    "value": f"max {check['max_ulps']} ulp over {check['elements'] / 1e6:.0f}M values",
                    "passed": check["passed"],
                }
            )
    identical = (exactness or {}).get("sweep_alpha_0_1_bit_identical")
    if identical is not None:
        checks.append(
            {
                "target": "sweep: alpha 0 and 1 bit-identical to the inputs",
                "value": ", ".join(
                    f"alpha {a}: {'identical' if same else 'DIFFERENT'}" for a, same in identical.items()
                ),
                "passed": all(identical.values()),
            }
        )
    return [
        {
            "target": f"wise_ft peak RSS <= {RSS_FACTOR:g} x largest shard + {RSS_SLACK // MB} MB",
            "value": f"{wise['peak_rss_bytes'] / MB:.0f} MB, target {wise['rss_target_bytes'] / MB:.0f} MB"
            if "median_s" in wise
            else None,
            "passed": wise.get("rss_passed"),
        },
        {
            "target": "`import hf_specgen.merge` under 1 s",
            "value": f"{start_up['median_s']:.2f} s" if "median_s" in start_up else None,
            "passed": start_up["median_s"] < 1 if "median_s" in start_up else None,
        },
        faster("wise_ft", "copytree", COPY_FACTOR),
        faster("wise_ft_bf16", "copytree_bf16", COPY_FACTOR),
        floor(
            ["phase_torch"],
            "copytree",
            "floor: `import torch` alone against copytree (reported: any merge that computes with torch pays it)",
        ),
        floor(
            ["phase_torch", "disk"],
            "copytree",
            "floor: `import torch` + the disk's floor for the output against copytree (reported: the least a merge "
            f"that computes with torch and leaves its output on the disk can take; above {COPY_FACTOR:g}x, the "
            "copytree target cannot hold here)",
        ),
        floor(["phase_torch"], "copytree_bf16", "floor: `import torch` alone against copytree_bf16 (reported)"),
        reported(
            "wise_ft",
            "copytree_synced",
            f"wise_ft against copytree_synced, both outputs on the disk at exit (reported; {COPY_FACTOR:g}x shown for "
            "comparison)",
        ),
        reported("wise_ft_bf16", "copytree_synced_bf16", "wise_ft_bf16 against copytree_synced_bf16 (reported)"),
        faster("wise_ft", "mergekit", MERGEKIT_FACTOR),
        faster("wise_ft_bf16", "mergekit_bf16", MERGEKIT_FACTOR),
        faster("sweep", "separate", SWEEP_FACTOR),
        floor(
            ["phase_plan", "disk_sweep"],
            "separate",
            "floor: start-up and plan + the disk's floor for the sweep's outputs against separate (reported: the "
            f"least a sweep can take here; above {SWEEP_FACTOR:g}x, the sweep target cannot hold)",
        ),
        reported(
            "sweep",
            "separate_processes",
            f"sweep against separate_processes (reported; {SWEEP_FACTOR:g}x shown for comparison)",
        ),
        reported(
            "wise_ft_cold",
            "copytree_cold",
            "cold inputs: wise_ft (reads two checkpoints) against copytree (reads one), reported",
        ),
        reported("groups", "wise_ft", "groups: time against wise_ft (reported, no target)"),
        faster("fisher", "wise_ft", FISHER_TIME_FACTOR),
        {
            "target": "fisher peak RSS <= the merge target + one Fisher shard",
            "value": f"{fisher['peak_rss_bytes'] / MB:.0f} MB, target {fisher['rss_target_bytes'] / MB:.0f} MB"
            if "median_s" in fisher
            else None,
            "passed": fisher.get("rss_passed"),
        },
        {
            "target": f"outputs = their float64 formulas within {TOLERANCE:g}",
            "value": None if correctness is None else "see the spot check",
            "passed": None if correctness is None else correctness["passed"],
        },
        *checks,
    ]


def verdict(passed: bool | None) -> str:
    return "-" if passed is None else ("PASS" if passed else "MISS")


def breakdown(runs: list[dict[str, Any]]) -> list[str]:
    """Where a fp32 `wise_ft`'s time goes: each phase child's median and what it adds to the one before, then the
    whole merge (the write overlapped with the computing) and the disk's floor."""
    by_name = {row["name"]: row for row in runs}
    order = ["phase_python", "phase_torch", "phase_plan", "phase_read", "phase_compute", "wise_ft"]
    rows = [by_name[name] for name in order if "median_s" in by_name.get(name, {})]
    if len(rows) < len(order):
        return []
    lines = [
        "",
        "## Where the time goes (fp32 `wise_ft`)",
        "",
        "Each row is a child process that does what the rows above it do, and one thing more; its added time is "
        "the difference of the medians. The last row is the whole merge: its writes run on the writers' threads "
        "beside the computing, so what they add is what the overlap does not hide. Below, the disk alone: the "
        "same number of bytes written with O_DIRECT, the floor of any merge that puts its output on the disk.",
        "",
        "| phase | wall (s) | added (s) | user / sys (s) | page faults |",
        "|---|---:|---:|---:|---:|",
    ]
    previous = 0.0
    for row in rows:
        text = "+ write the output (O_DIRECT), the whole `wise_ft`" if row["name"] == "wise_ft" else row["description"]
        lines.append(
            f"| {text} | {row['median_s']:.2f} | {row['median_s'] - previous:+.2f} "
            f"| {row['user_s']:.1f} / {row['sys_s']:.1f} | {row['minor_faults'] / 1e3:.0f}k |"
        )
        previous = row["median_s"]
    for name in ("disk", "disk_sweep"):
        row = by_name.get(name, {})
        if "median_s" in row:
            lines.append(
                f"| {row['description']} | {row['median_s']:.2f} | - | {row['user_s']:.1f} / {row['sys_s']:.1f} "
                f"| {row['minor_faults'] / 1e3:.0f}k |"
            )
    return lines


def markdown(report: dict[str, Any]) -> str:
    ckpt, settings, mergekit = report["checkpoints"], report["settings"], report["mergekit"]
    versions = settings["versions"]
    lines = [
        "# WiSE-FT merge: time and peak memory",
        "",
        f"Synthetic fp32 `LlamaForCausalLM`, {ckpt['parameters'] / 1e6:.0f}M parameters: pretrained "
        f"{ckpt['pretrained']['bytes'] / MB:.0f} MB in {len(ckpt['pretrained']['shards'])} shards "
        f"(max_shard_size {PRETRAINED_SHARD}), finetuned {ckpt['finetuned']['bytes'] / MB:.0f} MB in "
        f"{len(ckpt['finetuned']['shards'])} shards ({FINETUNED_SHARD}); outputs written with max shard size "
        f"{OUTPUT_SHARD}. The `bf16:` rows: the same model in bfloat16 ({ckpt.get('bf16_bytes', 0) / MB:.0f} MB per "
        "checkpoint, the common case for LLMs), each row against the bf16 copytree. "
        f"Largest shard: {ckpt['largest_shard_bytes'] / MB:.0f} MB. Each run is a child process, "
        f"{settings['repeats']} times; inputs in the page cache, disk synced before each run, outputs not synced "
        "(hf_specgen writes with O_DIRECT where the file system allows it: its outputs are on the disk when it "
        "exits; copytree's and mergekit's are in the page cache, written back after the measurement; the "
        "`copytree ... os.sync()` rows wait for theirs to reach the disk). "
        f"{settings['machine']['cpus']} CPUs, {settings['threads']} torch threads; torch {versions['torch']}, "
        f"transformers {versions['transformers']}, safetensors {versions['safetensors']}; hf_specgen at "
        f"{settings['revision']}.",
        "",
        "wall: median (min-max) seconds of the whole process, start-up included; user / sys: its median CPU "
        "seconds in user space and in the kernel (page faults: the median count of minor faults). "
        "peak RSS: `VmHWM`, the "
        f"kernel's high-water mark, polled every {POLL_S * 1e3:g} ms until exit. anon / file: polled peaks of "
        "the anonymous and file-backed resident memory. Largest shard: the largest input shard file or the "
        "output max shard size. MB = 10^6 bytes.",
        "",
        "| run | wall (s) | x copytree | write (MB/s) | user / sys (s) | page faults | peak RSS (MB) "
        "| anon / file (MB) | RSS target (MB) | RSS |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for row in report["runs"]:
        if row.get("phase"):
            continue
        if "median_s" not in row:
            lines.append(f"| {row['description']} | failed | | | | | | | | |")
            continue
        vs_copy = "-" if row["vs_copy"] is None else f"{row['vs_copy']:.2f}"
        write = "-" if row["write_mb_s"] is None else f"{row['write_mb_s']:.0f}"
        target = "-" if row["rss_target_bytes"] is None else f"{row['rss_target_bytes'] / MB:.0f}"
        lines.append(
            f"| {row['description']} | {row['median_s']:.2f} ({row['min_s']:.2f}-{row['max_s']:.2f}) "
            f"| {vs_copy} | {write} | {row['user_s']:.1f} / {row['sys_s']:.1f} | {row['minor_faults'] / 1e3:.0f}k "
            f"| {row['peak_rss_bytes'] / MB:.0f} "
            f"| {row['peak_anon_bytes'] / MB:.0f} / {row['peak_file_bytes'] / MB:.0f} | {target} "
            f"| {verdict(row['rss_passed'])} |"
        )
    lines += breakdown(report["runs"])
    lines += ["", "| target | value | result |", "|---|---|:---:|"]
    lines += [f"| {t['target']} | {t['value'] or '-'} | {verdict(t['passed'])} |" for t in report["targets"]]
    correctness = report["correctness"]
    if correctness is not None:
        columns = [name for name in correctness["tensors"][0] if name != "key"]
        lines += [
            "",
            "Spot check, max abs difference to the float64 reference (`0.5 * (pre + ft)`; groups: "
            f"alpha {', '.join(f'{a:g}' for a in GROUP_ALPHAS)} by block, their mean outside; fisher: its "
            "formula with epsilon 1e-8):",
            "",
            "| tensor | " + " | ".join(columns) + " |",
            "|---|" + "---:|" * len(columns),
        ]
        for r in correctness["tensors"]:
            lines.append(f"| {r['key']} | " + " | ".join(f"{r[c]:.2e}" for c in columns) + " |")
        lines += ["", f"Same tensor names as finetuned: {correctness['same_keys']}."]
    for row in report["runs"]:
        if row["error"] and row["name"] != "mergekit":
            lines += ["", f"{row['name']} failed:", "", "```", row["error"], "```"]
    if mergekit["error"]:
        lines += ["", "mergekit could not be measured:", "", "```", mergekit["error"], "```"]
    else:
        lines += [
            "",
            f"mergekit {mergekit['version']}: `{mergekit['command']}` with the config "
            f"`{json.dumps(mergekit['config'])}`.",
        ]
    lines += [
        "",
        "RSS counts two kinds of pages. anon: the process's own memory: the interpreter and its imports (the "
        "`import` row), the tensors being interpolated and waiting to be written (mergekit: the output shard it "
        "fills; hf_specgen: the chunks computed and not yet written, at most 64 MB, and two 16 MB staging "
        "buffers per output). file: pages of files mapped by the process: its shared libraries and the inputs "
        "(mergekit: each shard's pages stay mapped until it is closed; hf_specgen: each tensor is its own "
        "mapping, populated when it is read and unmapped once its output is written, so a few tensors of each "
        "input are mapped at a time: those whose chunks wait to be computed or written, and the next). Those are "
        "clean page-cache pages the kernel can reclaim, but `VmHWM`, `top` and a cgroup's memory accounting count "
        "them.",
        "",
        f"Total benchmark time: {report['total_s']:.0f} s (checkpoint build {report['setup_s']['build']:.0f} s, "
        f"mergekit install {report['setup_s']['mergekit_install']:.0f} s; 0 when cached in --workdir).",
    ]
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/merge.json"), help="JSON report path")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "hf_specgen_bench_merge",
        help="caches the checkpoints and mergekit's environment; the outputs go here too",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of each configuration")
    parser.add_argument("--layers", type=int, default=18, help="decoder layers (18: 1.19 GB per checkpoint)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clean", action="store_true", help="remove --workdir at the end, cache included")
    opts = parser.parse_args()
    if opts.repeats < 1 or opts.layers < 2:
        parser.error("need --repeats >= 1 and --layers >= 2")
    return opts


def main() -> None:
    opts = parse_args()
    start = time.perf_counter()
    workdir = opts.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    pretrained, finetuned = build_checkpoints(workdir, opts.layers, opts.seed)
    bf16_pre, bf16_ft = build_checkpoints(workdir, opts.layers, opts.seed, dtype="bfloat16")
    fishers = (build_fisher(pretrained, opts.seed + 2), build_fisher(finetuned, opts.seed + 3))
    build_s = time.perf_counter() - start
    pre_files, ft_files = weight_files(pretrained), weight_files(finetuned)
    checkpoint_bytes = sum(f.stat().st_size for f in ft_files)
    largest_shard = max(max(f.stat().st_size for f in pre_files + ft_files), size_to_int(OUTPUT_SHARD))
    rss_target = int(RSS_FACTOR * largest_shard + RSS_SLACK)
    log(f"checkpoints: {checkpoint_bytes / MB:.0f} MB each, in {pretrained.parent} ({build_s:.0f} s)", start)
    needed = (len(SWEEP_ALPHAS) + 5) * checkpoint_bytes  # a sweep's outputs beside copytree's and the kept merges
    free = shutil.disk_usage(workdir).free
    if free < needed:
        sys.exit(f"{workdir} has {free / MB:.0f} MB free; the outputs need {needed / MB:.0f} MB")

    mergekit = install_mergekit(workdir)
    log(f"mergekit: {mergekit['version'] or 'not installed'} ({mergekit['install_s']:.0f} s)", start)
    if mergekit["error"]:
        log(f"mergekit install failed: {mergekit['error']}", start)

    outputs, logs = workdir / "outputs", workdir / "logs"
    shutil.rmtree(outputs, ignore_errors=True)
    logs.mkdir(exist_ok=True)
    bf16_files = weight_files(bf16_pre) + weight_files(bf16_ft)
    bf16 = (bf16_pre, bf16_ft, sum(f.stat().st_size for f in weight_files(bf16_ft)))
    runs = define_runs(pretrained, finetuned, fishers, checkpoint_bytes, mergekit, workdir, bf16)
    warm_page_cache(pre_files + ft_files + bf16_files + [f for d in fishers for f in weight_files(d)])
    for repeat in range(opts.repeats):
        for run in runs if repeat % 2 == 0 else runs[::-1]:
            if run.error:
                continue
            out = outputs / run.name
            shutil.rmtree(out, ignore_errors=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            evict(run.evict)
            try:
                run.samples.append(measure(run.command(out), logs / f"{run.name}-{repeat}.log"))
            except ChildFailed as error:
                run.error = str(error)
                log(f"{run.name} failed: {error}", start)
                continue
            finally:
                warm_page_cache(run.evict)
            if not run.keep_output:
                shutil.rmtree(out, ignore_errors=True)
            sample = run.samples[-1]
            log(
                f"round {repeat + 1}/{opts.repeats} {run.name}: {sample.seconds:.2f} s, "
                f"peak RSS {sample.peak_rss / MB:.0f} MB",
                start,
            )
    mergekit_run = next((run for run in runs if run.name == "mergekit"), None)
    if mergekit_run is not None and mergekit_run.error:
        mergekit["error"] = f"`{mergekit['command']}` failed, {mergekit_run.error}"

    merged = {run.name: outputs / run.name for run in runs if run.keep_output and run.samples}
    fp32_outputs = {name: path for name, path in merged.items() if name in ("wise_ft", "groups", "fisher", "mergekit")}
    correctness = (
        spot_check(pretrained, finetuned, fp32_outputs, fishers, opts.layers) if "wise_ft" in merged else None
    )
    exactness = exactness_check(pretrained, finetuned, bf16_pre, bf16_ft, merged)
    log("checked every tensor of the wise_ft outputs in ulps", start)
    shutil.rmtree(outputs, ignore_errors=True)

    copy_s = {}  # each dtype's copytree: the floor its rows are measured against
    for name in ("copytree", "copytree_bf16"):
        samples = next(run for run in runs if run.name == name).samples
        copy_s[name] = statistics.median(s.seconds for s in samples) if samples else None
    rows = {
        run.name: summarize(run, copy_s["copytree_bf16" if run.name.endswith("_bf16") else "copytree"], rss_target)
        for run in runs
    }
    report = {
        "checkpoints": {
            "model": "LlamaForCausalLM",
            "dtype": "float32",
            "config": model_config(opts.layers),
            "parameters": parameter_count(finetuned),
            "pretrained": {
                "bytes": sum(f.stat().st_size for f in pre_files),
                "shards": [f.stat().st_size for f in pre_files],
                "max_shard_size": PRETRAINED_SHARD,
            },
            "finetuned": {
                "bytes": checkpoint_bytes,
                "shards": [f.stat().st_size for f in ft_files],
                "max_shard_size": FINETUNED_SHARD,
            },
            "output_max_shard_size": OUTPUT_SHARD,
            "largest_shard_bytes": largest_shard,
            "noise_std": NOISE,
            "bf16_bytes": bf16[2],
        },
        "settings": {
            "repeats": opts.repeats,
            "alpha": ALPHA,
            "bf16_alpha": BF16_ALPHA,
            "sweep_alphas": SWEEP_ALPHAS,
            "seed": opts.seed,
            "threads": torch.get_num_threads(),
            "workdir": str(workdir),
            "revision": git_revision(),
            "rss_target": f"{RSS_FACTOR:g} x largest shard + {RSS_SLACK // MB} MB = {rss_target / MB:.0f} MB",
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "safetensors": safetensors.__version__,
            },
        },
        "mergekit": {key: str(value) if isinstance(value, Path) else value for key, value in mergekit.items()},
        "runs": list(rows.values()),
        "targets": targets(rows, correctness, exactness),
        "correctness": correctness,
        "exactness": exactness,
        "setup_s": {"build": build_s, "mergekit_install": mergekit["install_s"]},
        "total_s": time.perf_counter() - start,
    }
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    opts.output.with_suffix(".md").write_text(table)
    print(table)
    if opts.clean:
        shutil.rmtree(workdir)
    log(f"wrote {opts.output} and {opts.output.with_suffix('.md')}", start)


if __name__ == "__main__":
    main()
