"""What the merge tests share: hand-made checkpoints and tokenizers, independent readers and the
reference interpolation, LoRA adapters and their expected merge, failure injection, and `specgen`
run in-process."""

import json
import os
from pathlib import Path

import torch
import yaml
from conftest import ADAPTER, VOCAB, lora_layers, perturb_, save, tiny_opt
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hf_specgen.cli import main
from hf_specgen.merge.checkpoint import Checkpoint


# ---- checkpoints and tokenizers ------------------------------------------------------------------


def tiny_llama(seed=0, vocab_size=VOCAB, layers=1) -> LlamaForCausalLM:
    """A tiny Llama (untied lm_head, grouped-query attention) built from a config."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def tiny_tokenizer(words=29) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of `words` words (`w0`, `w1`...) after 3 special tokens, with a chat template."""
    vocab = {"[PAD]": 0, "[UNK]": 1, "<s>": 2, **{f"w{i}": i + 3 for i in range(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="<s>"
    )
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    return tokenizer


def write_checkpoint(directory, tensors, config=None) -> Path:
    """A hand-written model directory: one safetensors file, and a config.json if given."""
    directory = Path(directory)
    directory.mkdir(parents=True)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return directory


def rule_tensors(seed, **overrides) -> dict[str, torch.Tensor]:
    """A float weight `w` (random from `seed`), an int64 `steps` and a bool `mask`, then `overrides`."""
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "w": torch.randn(4, 3, generator=g),
        "steps": torch.tensor([3, 1, 4], dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
    }
    tensors.update(overrides)
    return tensors


class PicklePayload:
    """Unpickling this would create a directory: what `weights_only=True` must refuse to run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


# ---- what a merge wrote --------------------------------------------------------------------------


def reference(pre, ft, alpha) -> torch.Tensor:
    """(1 - alpha) * pre + alpha * ft, in float64."""
    return (1 - alpha) * pre.double() + alpha * ft.double()


def assert_interpolated(out, pre, ft, alpha, dtype=None) -> None:
    """`out` is `reference(pre, ft, alpha)` in `dtype` (default: the fine-tuned tensor's)."""
    assert out.dtype == (dtype or ft.dtype)
    assert out.shape == ft.shape
    torch.testing.assert_close(out.double(), reference(pre, ft, alpha), rtol=1e-6, atol=1e-7)


def leftovers(parent) -> list[str]:
    """Temporary or half-written directories a merge may have left beside its output."""
    return [p.name for p in Path(parent).iterdir() if p.name.endswith((".partial", ".old")) or ".partial" in p.name]


def read_card(directory) -> tuple[dict, str]:
    """The model card's YAML metadata and its body."""
    text = (Path(directory) / "README.md").read_text()
    _, metadata, body = text.split("---\n", 2)
    return yaml.safe_load(metadata), body


def merge_config(directory) -> dict:
    """The `merge_config.json` a merge wrote into `directory`."""
    return json.loads((Path(directory) / "merge_config.json").read_text())


# ---- counting and failing ------------------------------------------------------------------------


def count_reads(monkeypatch) -> dict[tuple[str, str], int]:
    """Counts each tensor read from a checkpoint, by (directory name, key), from now on."""
    reads = {}
    original = Checkpoint.get

    def get(self, key):
        reads[(self.directory.name, key)] = reads.get((self.directory.name, key), 0) + 1
        return original(self, key)

    monkeypatch.setattr(Checkpoint, "get", get)
    return reads


def fail_after(monkeypatch, target, name, calls, error, before=None) -> dict[str, int]:
    """`target.name` raises `error` once it has been called `calls` times (having called `before()`, if
    given, first); the count of calls."""
    original = getattr(target, name)
    count = {"n": 0}

    def failing(self, *args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            if before is not None:
                before()
            raise error
        return original(self, *args, **kwargs)

    monkeypatch.setattr(target, name, failing)
    return count


# ---- LoRA adapters -------------------------------------------------------------------------------


LORA_CONFIGS = {
    "plain": {},
    "rslora": {"use_rslora": True, "r": 8, "lora_alpha": 4},
    "rank_pattern": {"rank_pattern": {"v_proj": 2, "layers.1.self_attn.q_proj": 6}, "alpha_pattern": {"q_proj": 3}},
    "modules_to_save": {"modules_to_save": ["fc2"]},
    "bias": {"bias": "lora_only"},
}


def adapted(tmp_path, build=tiny_opt, **config):
    """The base model saved, and a LoRA adapter on it moved off its init (B != 0), saved: (base dir,
    adapter dir, peft model). Nothing is trained."""
    base = build()
    base_dir = save(base, tmp_path / "base")
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **config}
    model = get_peft_model(base, LoraConfig(**config))
    perturb_(model, scale=0.3)
    model.save_pretrained(tmp_path / "adapter")
    return base_dir, tmp_path / "adapter", model


def lora_weights(model) -> dict:
    """The LoRA layers of a peft model, by the name of the base model's weight each adapts."""
    return {name.removeprefix("base_model.model.") + ".weight": layer for name, layer in lora_layers(model).items()}


def trained_full(model, like=None) -> dict[str, torch.Tensor]:
    """Full tensors the adapter trains, by their name in the base model: `modules_to_save` copies, biases.
    `like`: a trainable peft model whose trained tensors to look up in `model` (loaded, so frozen)."""
    names = {n for n, p in (like or model).named_parameters() if p.requires_grad and "lora_" not in n}
    out = {}
    for name, param in model.named_parameters():
        if name in names:
            base_name = name.removeprefix("base_model.model.")
            out[base_name.replace(f".modules_to_save.{ADAPTER}.", ".").replace(".base_layer.", ".")] = param.detach()
    return out


def check_full_merge(merged, base_sd, model, alpha) -> None:
    """Adapted weights at W0 + alpha * delta, trained full tensors interpolated, everything else the base's."""
    layers, full = lora_weights(model), trained_full(model)
    assert layers
    assert set(merged) == set(base_sd)
    for key, tensor in merged.items():
        assert tensor.dtype == base_sd[key].dtype
        if key in layers:
            with torch.no_grad():
                delta = layers[key].get_delta_weight(ADAPTER).double()
            assert delta.abs().max() > 1e-3  # the adapter does move it
            expected = base_sd[key].double() + alpha * delta
            torch.testing.assert_close(tensor.double(), expected, rtol=1e-6, atol=1e-6)
        elif key in full:
            assert_interpolated(tensor, base_sd[key], full[key], alpha)
        else:
            assert torch.equal(tensor, base_sd[key]), key


# ---- `specgen`, in-process -----------------------------------------------------------------------


def run(argv) -> int | str | None:
    """The exit status `specgen argv` would have: main's return value, or the code it exits with."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as exit:
        return exit.code


def merge_args(opt, out, alpha="0.3", *extra) -> list:
    """`specgen merge` of the `opt` fixture's pair at `alpha` into `out`, then `extra`."""
    return [
        "merge",
        "--pretrained",
        opt["pre"],
        "--finetuned",
        opt["ft"],
        "--alpha",
        alpha,
        "--output-dir",
        out,
        *extra,
    ]


def expect_usage_error(argv, capsys, *fragments) -> str:
    """`specgen argv` exits 2 with nothing on stdout and each of `fragments` on stderr; the stderr."""
    assert run(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    for fragment in fragments:
        assert fragment in captured.err, captured.err
    return captured.err
