"""Tiny models built from configs and small synthetic data (nothing is downloaded), the fixtures every
test module may use, and the helpers several test modules share: saved checkpoints, the KD term and
the EWC Fisher written out by hand, LoRA layers, result records."""

from __future__ import annotations

import os
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets
import pytest
import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import CLIPConfig, CLIPModel, OPTConfig, OPTForCausalLM, T5Config, T5ForConditionalGeneration

from hf_specgen import SpecGenTrainingArguments
from hf_specgen.eval.records import ResultRecord


VOCAB = 64
SEQ_LEN = 12
PROMPT_LEN = 3  # the first labels are -100, as with a prompt the loss ignores
ADAPTER = "default"  # peft's name of the one adapter


def tiny_opt(seed: int = 0, dropout: float = 0.0, vocab_size: int = VOCAB) -> OPTForCausalLM:
    torch.manual_seed(seed)
    config = OPTConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        word_embed_proj_dim=16,
        num_hidden_layers=2,
        ffn_dim=32,
        num_attention_heads=2,
        max_position_embeddings=64,
        dropout=dropout,
        attention_dropout=dropout,
        activation_dropout=dropout,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
    )
    return OPTForCausalLM(config)


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    """An encoder-decoder (T5) of 2 + 2 layers over the same vocabulary."""
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=VOCAB,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5ForConditionalGeneration(config)


def seq2seq_batch(n: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    """Source rows of 8 tokens (the last 2 of row 0 padding) and targets of 6 (the last 2 of row 1 -100)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (n, 8), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -2:] = 0
    labels = torch.randint(3, VOCAB, (n, 6), generator=g)
    labels[1, -2:] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def tiny_clip(seed: int = 0, text_layers: int = 1, vision_layers: int = 1) -> CLIPModel:
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={
            "vocab_size": 32,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": text_layers,
            "num_attention_heads": 2,
            "max_position_embeddings": 8,
            "eos_token_id": 2,
            "bos_token_id": 1,
            "pad_token_id": 0,
        },
        vision_config={
            "image_size": 16,
            "patch_size": 8,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": 2,
        },
        projection_dim=8,
    )
    return CLIPModel(config)


def clip_batch(n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 32, (n, 6), generator=g)
    input_ids[:, -1] = 2  # CLIP pools the text tower at the eos token
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(n, 3, 16, 16, generator=g),
        "return_loss": True,
    }


def lm_dataset(n: int = 16, seed: int = 0, length: int = SEQ_LEN) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    labels = ids.clone()
    labels[:, :PROMPT_LEN] = -100
    return datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * length] * n, "labels": labels.tolist()}
    )


def lm_batch(n: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    rows = lm_dataset(n, seed)
    return {k: torch.tensor(rows[k]) for k in rows.column_names}


def make_args(output_dir, **kwargs) -> SpecGenTrainingArguments:
    defaults = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_steps=3,
        seed=0,
        data_seed=0,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    defaults.update(kwargs)
    return SpecGenTrainingArguments(**defaults)


def perturb_(model: torch.nn.Module, scale: float = 0.05, seed: int = 123) -> None:
    """Moves every trainable weight away from its value, as fine-tuning would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture
def args_factory(tmp_path):
    return lambda **kwargs: make_args(kwargs.pop("output_dir", tmp_path / "out"), **kwargs)


def fisher_of(trainer) -> dict[str, torch.Tensor]:
    """The EWC Fisher a trainer estimates when training begins (its first weight term's)."""
    trainer.specgen.begin_training(None)
    return trainer.specgen.weight_terms[0].fisher


def kl_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(t / T) || softmax(s / T)) of each row (over the last dimension), in float64, by hand."""
    s, t = student_logits.double() / temperature, teacher_logits.double() / temperature
    return (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1)


def kd_by_hand(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    denominator: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """The KD term written out, in float64: T^2 * the sum of `kl_rows` over the positions `mask` selects
    (default: every row), divided by `denominator` (default: the number of those rows)."""
    if mask is not None:
        student_logits, teacher_logits = student_logits[mask], teacher_logits[mask]
    rows = kl_rows(student_logits, teacher_logits, temperature)
    return temperature**2 * rows.sum() / (rows.numel() if denominator is None else denominator)


def lora_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    """The LoRA layers of a peft model, by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def save(model, directory, **kwargs) -> Path:
    """`model.save_pretrained(directory, **kwargs)`; the directory."""
    model.save_pretrained(directory, **kwargs)
    return Path(directory)


def read_weights(directory, name="model") -> dict[str, torch.Tensor]:
    """Every tensor of a saved directory, read with safetensors' own `load_file`, shard by shard."""
    weights = {}
    for file in sorted(Path(directory).glob(f"{name}*.safetensors")):
        for key, tensor in load_file(file).items():
            assert key not in weights, f"{key} stored twice"
            weights[key] = tensor
    assert weights, f"no weights in {directory}"
    return weights


@pytest.fixture(scope="module")
def opt(tmp_path_factory):
    """A tiny OPT (tied lm_head) and its 'fine-tuned' copy, saved as one file and in several shards."""
    root = tmp_path_factory.mktemp("opt")
    pre, ft = tiny_opt(seed=0), tiny_opt(seed=0)
    perturb_(ft)
    dirs = {
        "pre": save(pre, root / "pre"),
        "ft": save(ft, root / "ft"),
        "pre_sharded": save(pre, root / "pre_sharded", max_shard_size="4KB"),
        "ft_sharded": save(ft, root / "ft_sharded", max_shard_size="4KB"),
    }
    assert len(list(dirs["ft_sharded"].glob("model-*.safetensors"))) > 2
    return {**dirs, "pre_sd": read_weights(dirs["pre"]), "ft_sd": read_weights(dirs["ft"])}


def point(method: str, s: float, g: float, **kwargs) -> ResultRecord:
    """A result record of one speciality (`dom`) and one generality (`gen`) score."""
    return ResultRecord(method=method, speciality={"dom": s}, generality={"gen": g}, **kwargs)


def step_and_grads(trainer, batch: dict[str, torch.Tensor]):
    """One `training_step` opening an optimizer step: the loss it reports and the gradients it leaves.

    Weight terms (L1, L2, EWC) add their closed-form gradients there, not through `compute_loss`."""
    model = trainer.model
    model.zero_grad()
    trainer.specgen.last_seen_step = None
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer.training_step(model, dict(batch))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss, grads


class FakeHub:
    """An `HfApi`-compatible recorder: what a push creates and the files it uploads, never the network."""

    def __init__(self, fail=False):
        self.fail, self.created, self.uploads = fail, [], []

    def create_repo(self, repo_id=None, **kwargs):
        self.created.append({"repo_id": repo_id, **kwargs})
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id=None, folder_path=None, **kwargs):
        folder = Path(folder_path)
        files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        self.uploads.append({"repo_id": repo_id, "folder_path": folder_path, "files": files, **kwargs})
        if self.fail:
            raise RuntimeError("503 Service Unavailable")
