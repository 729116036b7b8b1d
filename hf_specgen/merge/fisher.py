"""The diagonal Fisher of a causal language model, for Fisher-weighted merging (`specgen fisher`).

The estimate is the trainer's own: EWC's (`regularizers.ewc`, over `regularizers.importance`),

    F = mean over examples x of (1 / n_x) * (d/dtheta sum_t log p(y_t | x_<t))^2,

from per-example gradients (never the square of a mini-batch mean), `n_x` the tokens the example
predicts, `y` sampled from the model's own predictive distribution (`fisher_type="true"`) or the
text's next tokens (`"empirical"`). Examples are drawn as the trainer draws them for EWC: the first
`num_samples` of a permutation of the texts by a generator seeded with `seed`, which then samples
the labels. A file `specgen fisher` writes for a model therefore equals the Fisher that
`SpecGenTrainer` with `ewc_lambda > 0` estimates at that model from the same tokenized texts, with
the same seed and `ewc_num_samples`.

The result is named by the checkpoint's tensor names (a peft model's wrappers removed and its
adapter weights left out, a tied weight once), float32, and written atomically (`save_fisher`):
the file `specgen merge --method fisher --fisher-pre/--fisher-finetuned` reads (`inputs`).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..anchor import is_peft_model
from ..atomic import atomic_file
from ..batches import right_padded
from ..deltas import DenseDelta
from ..regularizers import EWC, ImportanceSample
from .errors import MergeWarning, MergeWriteError
from .inputs import checkpoint_name


FISHER_TYPES = ("true", "empirical")
Source = str | os.PathLike


def read_texts(path: Source, text_field: str = "text") -> list[str]:
    """The texts of a local data file.

    Args:
        path: a `.json` file (a list of strings or of objects, or an object whose `text_field` is a
            list of strings), a `.jsonl` file (one string or object per line), or a directory
            written by `datasets.Dataset.save_to_disk` (a `DatasetDict`: its `train` split, or its
            only one).
        text_field: the field holding the text in objects and datasets.

    Returns:
        The texts, in file order; a `ValueError` naming the file (and line) for anything else.
    """
    path = Path(path)
    if path.is_dir():
        return _dataset_texts(path, text_field)
    if not path.is_file():
        raise ValueError(f"{path}: no such file or directory")
    if path.suffix not in (".json", ".jsonl"):
        raise ValueError(f"{path}: expected a .json or .jsonl file of texts, or a datasets directory (save_to_disk)")
    try:
        content = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot be read ({error})") from None
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(content.splitlines(), 1):
            if line.strip():
                rows.append((f"{path}, line {number}", _parse(line, f"{path}, line {number}")))
    else:
        data = _parse(content, str(path))
        if isinstance(data, dict) and isinstance(data.get(text_field), list):
            data = data[text_field]
        if not isinstance(data, list):
            raise ValueError(
                f"{path}: expected a list of texts (or of objects with {text_field!r}), got {type(data).__name__}"
            )
        rows = [(f"{path}, item {i}", row) for i, row in enumerate(data)]
    texts = [_text(row, text_field, where) for where, row in rows]
    if not texts:
        raise ValueError(f"{path}: holds no texts")
    return texts


def _parse(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as error:
        raise ValueError(f"{where}: malformed JSON ({error})") from None


def _text(row: Any, text_field: str, where: str) -> str:
    value = row.get(text_field) if isinstance(row, dict) else row
    if not isinstance(value, str):
        what = (
            f"no string field {text_field!r}"
            if isinstance(row, dict)
            else f"not a string nor an object ({type(row).__name__})"
        )
        raise ValueError(f"{where}: {what}")
    return value


def _dataset_texts(path: Path, text_field: str) -> list[str]:
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as error:
        raise ValueError(f"{path}: not a datasets directory written by save_to_disk ({error})") from None
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data and len(data) != 1:
            raise ValueError(f"{path}: a DatasetDict with splits {', '.join(data)}: none is 'train'")
        data = data["train"] if "train" in data else next(iter(data.values()))
    if text_field not in data.column_names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {', '.join(data.column_names)})")
    return [_text(value, text_field, f"{path}, row {i}") for i, value in enumerate(data[text_field])]


def fisher_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights a Fisher is estimated for, by checkpoint name: every floating parameter, a tied
    one once; in a peft model the base model's (through an adapter's `base_layer`, whose gradient
    is the merged weight's), not the adapters' own weights."""
    adapters = set(getattr(model, "peft_config", {})) if is_peft_model(model) else set()
    weights: dict[str, nn.Parameter] = {}
    for name, param in model.named_parameters():  # a tied weight once
        parts = name.split(".")
        saved_copy = re.search(r"\.modules_to_save\.[^.]+\.", name) is not None
        if not param.is_floating_point() or ".original_module." in name:
            continue  # a modules_to_save copy is what the forward runs through; its original is not
        if not saved_copy and adapters.intersection(parts):
            continue  # an adapter's own weight (LoRA's A and B, IA3's vectors, a prompt encoder)
        key = checkpoint_name(name)
        if key in weights:
            raise ValueError(f"two parameters of the model are the checkpoint's {key}")
        weights[key] = param
    return weights


def _encode(
    tokenizer: Any, texts: Sequence[str], num_samples: int, generator: torch.Generator, max_length: int | None
) -> list[list[int]]:
    """Token ids of `num_samples` texts in the trainer's seeded order, skipping texts with fewer than 2
    tokens (nothing to predict)."""
    chosen = []
    for index in torch.randperm(len(texts), generator=generator).tolist():
        ids = tokenizer(texts[index], truncation=max_length is not None, max_length=max_length)["input_ids"]
        if len(ids) >= 2:
            chosen.append(list(ids))
            if len(chosen) == num_samples:
                break
    return chosen


def _batches(encoded: list[list[int]], batch_size: int, pad_id: int, device: torch.device) -> Iterator[dict[str, Any]]:
    """Right-padded batches whose labels are the inputs (-100 on padding): each text is its own target."""
    for start in range(0, len(encoded), batch_size):
        rows = encoded[start : start + batch_size]
        yield {key: tensor.to(device) for key, tensor in right_padded(rows, rows, pad_id).items()}


def estimate_fisher(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    num_samples: int,
    fisher_type: str = "true",
    *,
    max_length: int | None = None,
    batch_size: int = 1,
    seed: int = 42,
) -> dict[str, torch.Tensor]:
    """The diagonal Fisher of a causal language model at its current weights, by the trainer's
    per-example estimator (EWC's; see the module's docstring).

    Args:
        model: a causal LM (e.g. `AutoModelForCausalLM`), or a peft model of one (its Fisher is the
            merged model's, named by the base weights).
        tokenizer: its tokenizer; each text is tokenized as is (special tokens included) and is its
            own target.
        texts: the texts to draw examples from.
        num_samples: how many texts the Fisher is averaged over (fewer if `texts` has fewer with at
            least 2 tokens: a `MergeWarning` says so). Each gets its own backward pass.
        fisher_type: "true" (labels sampled from the model) or "empirical" (the text's tokens).
        max_length: truncate each text to this many tokens (None: no truncation).
        batch_size: texts per forward pass (padded on the right); the result does not depend on it
            beyond float rounding.
        seed: seeds the choice of texts and the sampled labels (the trainer's `args.seed`).

    Returns:
        `{checkpoint tensor name: Fisher}`, float32 on the CPU, each shaped like its weight.
    """
    if fisher_type not in FISHER_TYPES:
        raise ValueError(f"fisher_type must be one of {', '.join(FISHER_TYPES)}, got {fisher_type!r}")
    for what, value, least in [
        ("num_samples", num_samples, 1),
        ("batch_size", batch_size, 1),
        ("max_length", max_length, 2),
    ]:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise ValueError(f"{what} must be an integer of at least {least}, got {value!r}")
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{type(model).__name__} is an encoder-decoder model: estimate_fisher takes a causal language model"
        )
    generator = torch.Generator().manual_seed(seed)
    encoded = _encode(tokenizer, texts, num_samples, generator, max_length)
    if not encoded:
        raise ValueError("no text has 2 tokens or more: there is nothing to predict")
    if len(encoded) < num_samples:
        warnings.warn(
            f"the Fisher is averaged over {len(encoded)} texts, not {num_samples}: there are no more "
            "with 2 tokens or more",
            MergeWarning,
            stacklevel=2,
        )
    weights = fisher_weights(model)
    device = next(iter(weights.values())).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sample = ImportanceSample(
        model=model,
        deltas=[DenseDelta(key, p, p.detach()) for key, p in weights.items()],  # no copy: theta is its own anchor
        batches=_batches(encoded, batch_size, pad_id, device),
        shifts_labels=True,
        label_names=("labels",),
        generator=generator,
    )
    fisher = EWC(1.0, num_samples, fisher_type).estimate(sample)
    return {key: value.to("cpu", torch.float32).contiguous() for key, value in fisher.items()}


def check_fisher_output(path: Source, inputs: Sequence[Source], overwrite: bool = False) -> Path:
    """Where a Fisher file may be written: a name ending in `.safetensors` (what a merge reads), not an
    input nor inside one (paths compared resolved), not a directory, an existing file only with
    `overwrite`. A `ValueError` otherwise, before anything is read or written.

    Returns:
        `path` as a `Path`.
    """
    path = Path(path)
    if not path.name.endswith(".safetensors") or path.name == ".safetensors":
        raise ValueError(f"{path}: a Fisher file's name ends in .safetensors (specgen merge reads it by that)")
    resolved = Path(os.path.realpath(path))
    for source in inputs:
        protected = Path(os.path.realpath(source))
        if resolved == protected or protected in resolved.parents:
            relation = "is" if resolved == protected else "lies inside"
            raise ValueError(
                f"{path}: the output {relation} the input {source}; choose another output (nothing was written)"
            )
    for ancestor in path.parents:
        if os.path.lexists(ancestor) and not ancestor.is_dir():
            raise ValueError(f"{path}: {ancestor} is a file, not a directory (nothing was written)")
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; the output is a file (nothing was written)")
    if os.path.lexists(path) and not overwrite:
        raise ValueError(f"{path}: already exists; pass overwrite=True (--overwrite) to replace it")
    return path


def save_fisher(
    fisher: Mapping[str, torch.Tensor],
    path: Source,
    *,
    overwrite: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Writes a Fisher (`estimate_fisher`'s) to a safetensors file, float32, atomically: under a
    temporary name beside `path`, renamed at the end (a failure or a signal leaves nothing).

    Args:
        fisher: tensors by checkpoint name.
        path: the file to write (`check_fisher_output`'s rules, no inputs).
        overwrite: replace an existing file.
        metadata: strings for the file's header (e.g. the fisher type, the number of samples).

    Returns:
        `path`.
    """
    from safetensors.torch import save_file

    path = check_fisher_output(path, (), overwrite)
    if not fisher:
        raise ValueError("the Fisher holds no tensors")
    tensors = {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in fisher.items()}
    header = {"format": "pt", "written_by": "hf_specgen", **{k: str(v) for k, v in (metadata or {}).items()}}
    with atomic_file(path, error=MergeWriteError) as temporary:
        save_file(tensors, str(temporary), metadata=header)
        os.chmod(temporary, 0o666 & ~_umask())  # as open() would make it: safetensors' own file is 0o600
    return path


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
