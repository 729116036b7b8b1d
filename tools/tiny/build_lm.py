"""Build the tiny Galactica: a BPE tokenizer trained on the general corpus and an OPT causal LM
pre-trained on it, saved as a standard HuggingFace model directory.

`python -m tools.tiny.build_lm [--output-dir DIR]` (from the repository root) rebuilds the shipped model from its seed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import datasets
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    DataCollatorForLanguageModeling,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)

from hf_specgen.tiny.lm_data import GENERAL_FAMILIES, general_corpus
from hf_specgen.tiny.paths import LM_DIR

from .bpe import canonical_vocab
from .card import write_foundation_card


# Galactica's special tokens and ids: <s>=0, <pad>=1, </s>=2, <unk>=3.
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
VOCAB_SIZE = 1024
END_OF_TEXT = "\n"  # every example ends with a newline: generation stops there


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any string encodes), ids numbered reproducibly."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    trained = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(pair) for pair in trained["merges"]]
    vocab = canonical_vocab(trained["vocab"], merges, list(SPECIAL_TOKENS))
    tokenizer.model = models.BPE(vocab=vocab, merges=merges)
    bos, pad, eos, unk = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        pad_token=pad,
        eos_token=eos,
        unk_token=unk,
        model_max_length=256,
        padding_side="right",
    )


def lm_config(tokenizer: PreTrainedTokenizerFast) -> OPTConfig:
    """Galactica's OPT variant (pre-layer-norm, GELU, tied embeddings), scaled down."""
    return OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=192,
        word_embed_proj_dim=192,
        num_hidden_layers=4,
        ffn_dim=768,
        num_attention_heads=4,
        max_position_embeddings=256,
        do_layer_norm_before=True,
        activation_function="gelu",
        dropout=0.0,
        attention_dropout=0.0,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )


def build_lm(output_dir: str | Path = LM_DIR, seed: int = 0, epochs: float = 10.0) -> Path:
    """Train tokenizer and model from `seed` and save both (safetensors) to `output_dir`."""
    output_dir = Path(output_dir)
    corpus = general_corpus(seed)
    texts = [text + END_OF_TEXT for text in corpus["text"]]
    tokenizer = train_tokenizer(texts)
    torch.manual_seed(seed)
    model = OPTForCausalLM(lm_config(tokenizer))
    train = datasets.Dataset.from_dict({"text": texts}).map(
        lambda batch: tokenizer(batch["text"], add_special_tokens=False), batched=True, remove_columns=["text"]
    )
    work_dir = tempfile.TemporaryDirectory(prefix="tiny_lm_")  # the Trainer's; nothing is saved there
    args = TrainingArguments(
        output_dir=work_dir.name,
        per_device_train_batch_size=64,
        num_train_epochs=epochs,
        learning_rate=2e-3,
        lr_scheduler_type="cosine",
        warmup_steps=50,
        weight_decay=0.01,
        logging_steps=50,
        save_strategy="no",
        report_to=[],
        seed=seed,
        use_cpu=True,
        disable_tqdm=True,
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    with work_dir:
        Trainer(model=model, args=args, train_dataset=train, data_collator=collator).train()
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    description = [
        "A Galactica-architecture (`OPTForCausalLM`) language model with a byte-level BPE tokenizer,",
        f"pre-trained on {len(texts):,} generated sentences of four general skills ({', '.join(GENERAL_FAMILIES)})",
        "and the vocabulary, not the facts, of a fictional pharmacology: its speciality to learn is",
        "`hf_specgen.tiny.medmcqa()`, a MedMCQA-schema exam about that pharmacology.",
    ]
    write_foundation_card(output_dir, "tiny-galactica", model, description, pipeline_tag="text-generation", seed=seed)
    return output_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", type=Path, default=LM_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=float, default=10.0)
    args = parser.parse_args()
    start = time.perf_counter()
    build_lm(args.output_dir, args.seed, args.epochs)
    print(f"tiny LM written to {args.output_dir} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
