"""The tiny CLIP foundation: rendered data, the shipped model, zero-shot evaluation, class-prompt fine-tuning."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F
from conftest import make_args
from transformers import AutoProcessor, AutoTokenizer, CLIPConfig, CLIPModel, CLIPProcessor

from hf_specgen import SpecGenTrainer
from hf_specgen.data.image_classification import ClassPromptCollator, class_prompt_loss, freeze_text_tower
from hf_specgen.eval.clip import accuracy, domain_accuracies, zero_shot_head
from hf_specgen.tiny import clip_path
from hf_specgen.tiny.images import CLASS_NAMES, DOMAINS, FINETUNE_DOMAIN, image_domains, zero_shot_templates


def image_hashes(dataset: datasets.Dataset) -> list[str]:
    """The stored (PNG) bytes of every image, hashed."""
    raw = dataset.cast_column("image", datasets.Image(decode=False))["image"]
    return [hashlib.sha256(row["bytes"]).hexdigest() for row in raw]


@pytest.fixture(scope="module")
def processor() -> CLIPProcessor:
    return CLIPProcessor.from_pretrained(clip_path())


@pytest.fixture(scope="module")
def test_domains() -> datasets.DatasetDict:
    return image_domains("test", n_per_class=20)


def random_clip(processor: CLIPProcessor, seed: int = 0) -> CLIPModel:
    """A small random CLIP that reads the shipped processor's tokens and 32x32 images."""
    tokenizer = processor.tokenizer
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": tokenizer.model_max_length,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        projection_dim=8,
    )
    return CLIPModel(config)


def test_generator_schema():
    data = image_domains("train", n_per_class=2)
    assert len(CLASS_NAMES) >= 10 and len(DOMAINS) >= 4 and FINETUNE_DOMAIN in DOMAINS
    assert list(data) == list(DOMAINS)
    for domain, split in data.items():
        assert isinstance(split.features["image"], datasets.Image)
        assert split.features["label"] == datasets.ClassLabel(names=list(CLASS_NAMES))
        assert split.features["caption"] == datasets.Value("string")
        assert sorted(split["label"]) == sorted(list(range(len(CLASS_NAMES))) * 2)
        image = split[0]["image"]
        assert image.mode == "RGB" and image.size == (32, 32)
        for label, caption in zip(split["label"], split["caption"]):
            assert CLASS_NAMES[label] in caption
    for domain in DOMAINS:
        templates = zero_shot_templates(domain)
        assert templates and all(t.count("{}") == 1 for t in templates)
    assert zero_shot_templates() == [t for d in DOMAINS for t in zero_shot_templates(d)]
    with pytest.raises(ValueError, match="domain"):
        image_domains(domains=["x-ray"])


def test_generator_is_deterministic():
    first, again = image_domains("test", seed=3, n_per_class=2), image_domains("test", seed=3, n_per_class=2)
    other = image_domains("test", seed=4, n_per_class=2)
    for domain in DOMAINS:
        assert image_hashes(first[domain]) == image_hashes(again[domain])
        assert first[domain]["caption"] == again[domain]["caption"]
        assert not set(image_hashes(first[domain])) & set(image_hashes(other[domain]))


def test_splits_do_not_leak():
    seen: dict[str, set[str]] = {}
    for split in ("pretrain", "train", "test"):
        data = image_domains(split, n_per_class=5)
        seen[split] = {h for domain in DOMAINS for h in image_hashes(data[domain])}
        assert len(seen[split]) == 5 * len(CLASS_NAMES) * len(DOMAINS)  # no duplicates within a split either
    for a, b in [("pretrain", "train"), ("pretrain", "test"), ("train", "test")]:
        assert not seen[a] & seen[b], (a, b)


def test_spurious_cue_only_in_the_finetuning_domain():
    cued, clean = image_domains("test", n_per_class=5), image_domains("test", n_per_class=5, spurious_correlation=0.0)
    for domain in DOMAINS:
        same = [a == b for a, b in zip(image_hashes(cued[domain]), image_hashes(clean[domain]))]
        if domain == FINETUNE_DOMAIN:
            assert 0 < sum(same) < len(same)  # partly correlated: some backgrounds are the class's, some not
        else:
            assert all(same)


def test_tokenizer_training_is_deterministic(monkeypatch):
    """The BPE trainer numbers tokens in hash-map order (huggingface/tokenizers#1794): `train_tokenizer` must not."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))  # the builders: tools/ in the repository
    from tools.tiny.build_clip import train_tokenizer

    captions = [c for split in image_domains("pretrain", n_per_class=5).values() for c in split["caption"]]
    first, *others = [train_tokenizer(captions) for _ in range(3)]
    for other in others:
        assert other.backend_tokenizer.to_str() == first.backend_tokenizer.to_str()
    assert first.convert_ids_to_tokens([0, 1]) == [first.bos_token, first.eos_token]
    assert first.pad_token == first.eos_token  # as CLIP's: the text tower pools at the first eos
    ids = first(CLASS_NAMES[0])["input_ids"]
    assert ids[0] == first.bos_token_id and ids[-1] == first.eos_token_id and len(ids) == 3


def test_shipped_model_loads_offline(processor):
    model = CLIPModel.from_pretrained(clip_path())
    tokenizer = AutoTokenizer.from_pretrained(clip_path())
    assert isinstance(AutoProcessor.from_pretrained(clip_path()), CLIPProcessor)
    assert model.config.text_config.eos_token_id == tokenizer.eos_token_id  # the text tower pools there
    assert model.config.text_config.vocab_size == len(tokenizer)
    for name in CLASS_NAMES:  # every class name is one token: the tokenizer was trained on the captions
        assert len(tokenizer(name, add_special_tokens=False)["input_ids"]) == 1
    assert processor.image_processor.crop_size == {"height": 32, "width": 32}
    assert (clip_path() / "model.safetensors").is_file() and (clip_path() / "README.md").is_file()
    assert sum(f.stat().st_size for f in clip_path().iterdir()) < 8e6  # small enough to ship in the package


def test_shipped_model_zero_shot_on_every_domain(processor, test_domains):
    model = CLIPModel.from_pretrained(clip_path())
    scores = domain_accuracies(model, processor, test_domains, CLASS_NAMES, zero_shot_templates())
    chance = 1 / len(CLASS_NAMES)
    assert min(scores.values()) > chance + 0.3, scores


def test_zero_shot_head_and_accuracy_by_hand(processor, test_domains):
    model = random_clip(processor)
    with torch.no_grad():
        model.logit_scale.fill_(1.7)
    templates = ["a photo of a {}.", "a black and white sketch of the {}.", "art of a {}."]
    head = zero_shot_head(model, processor, CLASS_NAMES[:3], templates)
    with torch.no_grad():
        expected = []
        for name in CLASS_NAMES[:3]:
            prompts = []
            for template in templates:  # one prompt at a time: no padding to get wrong
                ids = torch.tensor([processor.tokenizer(template.format(name))["input_ids"]])
                prompts.append(F.normalize(model.get_text_features(input_ids=ids).pooler_output[0], dim=0))
            expected.append(F.normalize(torch.stack(prompts).mean(0), dim=0) * math.exp(1.7))
    torch.testing.assert_close(head, torch.stack(expected))
    assert head.shape == (3, model.config.projection_dim)

    data = test_domains["sketch"].select(range(30))
    head = zero_shot_head(model, processor, CLASS_NAMES, templates)
    with torch.no_grad():
        pixels = processor(images=list(data["image"]), return_tensors="pt")["pixel_values"]
        logits = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1) @ head.T
    expected_accuracy = (logits.argmax(-1) == torch.tensor(list(data["label"]))).float().mean().item()
    assert accuracy(model, processor, data, head, batch_size=7) == pytest.approx(expected_accuracy)
    assert model.training  # evaluation put it in eval mode and back


def test_class_prompt_finetuning_trains_the_image_tower_only(processor, tmp_path):
    model = random_clip(processor)
    freeze_text_tower(model)
    prompts = [f"a photo of a {name}." for name in CLASS_NAMES]
    collator = ClassPromptCollator(processor, prompts)
    rows = image_domains("train", n_per_class=1, domains=[FINETUNE_DOMAIN])[FINETUNE_DOMAIN]
    batch = collator([rows[i] for i in range(4)])
    assert batch["input_ids"].shape[0] == len(CLASS_NAMES) and batch["pixel_values"].shape == (4, 3, 32, 32)
    outputs = model(**{k: v for k, v in batch.items() if k != "labels"})
    logits, labels = outputs.logits_per_image, batch["labels"]
    assert logits.shape == (4, len(CLASS_NAMES))
    torch.testing.assert_close(class_prompt_loss(outputs, labels), F.cross_entropy(logits, labels))
    torch.testing.assert_close(  # under gradient accumulation: summed, over the accumulated batch's size
        class_prompt_loss(outputs, labels, num_items_in_batch=8), F.cross_entropy(logits, labels, reduction="sum") / 8
    )

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = make_args(tmp_path, remove_unused_columns=False, learning_rate=1e-2, max_steps=2)
    trainer = SpecGenTrainer(
        model=model, args=args, train_dataset=rows, data_collator=collator, compute_loss_func=class_prompt_loss
    )
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("vision_model.", "visual_projection.")) for n in changed)
    assert "visual_projection.weight" in changed
