"""Tiny models built from configs and small synthetic data: nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets
import pytest
import torch
from transformers import CLIPConfig, CLIPModel, OPTConfig, OPTForCausalLM, T5Config, T5ForConditionalGeneration

from hf_specgen import SpecGenTrainingArguments


VOCAB = 64
SEQ_LEN = 12
PROMPT_LEN = 3  # the first labels are -100, as with a prompt the loss ignores


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
