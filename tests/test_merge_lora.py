"""WiSE-FT with a LoRA adapter as the fine-tuned model (`W0 + alpha * scale * B @ A`, checked against
peft's own merge), and CLIP: a tiny CLIPModel pair, and a zero-shot-initialized classifier."""

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import ADAPTER, clip_batch, perturb_, read_weights, save, tiny_clip, tiny_opt
from merge_helpers import (
    LORA_CONFIGS,
    adapted,
    assert_interpolated,
    check_full_merge,
    count_reads,
    leftovers,
    lora_weights,
    reference,
    tiny_llama,
    trained_full,
)
from peft import PeftModel
from transformers import CLIPForImageClassification, CLIPModel, GPT2Config, GPT2LMHeadModel

from hf_specgen.cli import main
from hf_specgen.merge import MergeError, MergeWarning, wise_ft, wise_ft_sweep


def tiny_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=1, eos_token_id=1)
    return GPT2LMHeadModel(config)


@pytest.mark.parametrize("config", list(LORA_CONFIGS), ids=list(LORA_CONFIGS))
def test_lora_merge_is_w0_plus_alpha_delta(tmp_path, config):
    base_dir, adapter_dir, model = adapted(tmp_path, **LORA_CONFIGS[config])
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    for key, value in LORA_CONFIGS[config].items():
        assert saved[key] == value or (key == "modules_to_save" and set(value) <= set(saved[key]))
    if config == "rank_pattern":  # the pattern does change the ranks
        ranks = {name: layer.r[ADAPTER] for name, layer in lora_weights(model).items()}
        assert ranks["model.decoder.layers.1.self_attn.q_proj.weight"] == 6
        assert ranks["model.decoder.layers.0.self_attn.v_proj.weight"] == 2
        assert ranks["model.decoder.layers.0.self_attn.q_proj.weight"] == 4
    base_sd = read_weights(base_dir)
    for alpha in (0.3, 1.0):
        check_full_merge(
            read_weights(wise_ft(base_dir, adapter_dir, alpha, tmp_path / f"out-{alpha}")), base_sd, model, alpha
        )
    # at alpha = 1, peft's own merge
    peft_merged = copy.deepcopy(model).merge_and_unload().state_dict()
    merged = read_weights(tmp_path / "out-1.0")
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, peft_merged[key], rtol=1e-5, atol=1e-6)
    # at alpha = 0, the base model bit for bit
    zero = read_weights(wise_ft(base_dir, adapter_dir, 0.0, tmp_path / "out-0"))
    assert all(torch.equal(zero[k], base_sd[k]) for k in base_sd)


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False")
@pytest.mark.parametrize("fan_in_fan_out", [True, None], ids=["explicit", "set_by_peft"])
def test_lora_on_gpt2_conv1d_fan_in_fan_out(tmp_path, fan_in_fan_out):
    """GPT-2's Conv1D stores weights as (in, out): the delta is transposed. `attn.c_proj` is square,
    so a missing transpose would go unnoticed by shapes."""
    extra = {} if fan_in_fan_out is None else {"fan_in_fan_out": fan_in_fan_out}
    base_dir, adapter_dir, model = adapted(tmp_path, tiny_gpt2, target_modules=["c_attn", "c_proj"], **extra)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    layers = lora_weights(model)
    assert "transformer.h.0.attn.c_proj.weight" in layers and layers[
        "transformer.h.0.attn.c_proj.weight"
    ].weight.shape == (16, 16)
    out = wise_ft(base_dir, adapter_dir, 0.6, tmp_path / "out")
    check_full_merge(read_weights(out), read_weights(base_dir), model, 0.6)
    peft_merged = copy.deepcopy(model).merge_and_unload().state_dict()
    merged = read_weights(wise_ft(base_dir, adapter_dir, 1.0, tmp_path / "one"))
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, peft_merged[key], rtol=1e-5, atol=1e-6)
    loaded = GPT2LMHeadModel.from_pretrained(out)
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()


def test_lora_side_files_come_from_base_and_adapter(tmp_path):
    base_dir, adapter_dir, _ = adapted(tmp_path)
    (adapter_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 12}))
    out = wise_ft(base_dir, adapter_dir, 0.5, tmp_path / "out")
    names = {p.name for p in out.iterdir()}
    assert names == {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer_config.json",
        "README.md",
        "specgen_merge.json",
    }
    assert (out / "config.json").read_bytes() == (base_dir / "config.json").read_bytes()
    assert (out / "tokenizer_config.json").read_bytes() == (adapter_dir / "tokenizer_config.json").read_bytes()
    assert "adapter" not in " ".join(names)


@pytest.mark.parametrize("config", ["plain", "modules_to_save", "bias"])
def test_keep_adapter_scales_the_effect_by_alpha(tmp_path, config):
    alpha = 0.3
    base_dir, adapter_dir, model = adapted(tmp_path, **LORA_CONFIGS[config])
    out = wise_ft(base_dir, adapter_dir, alpha, tmp_path / "out", keep_adapter=True)
    assert {p.name for p in out.iterdir()} == {
        "adapter_model.safetensors",
        "adapter_config.json",
        "README.md",
        "specgen_merge.json",
    }
    assert (out / "adapter_config.json").read_bytes() == (adapter_dir / "adapter_config.json").read_bytes()
    loaded = PeftModel.from_pretrained(tiny_opt(), out)
    original, scaled = lora_weights(model), lora_weights(loaded)
    assert original.keys() == scaled.keys()
    for key, layer in scaled.items():
        torch.testing.assert_close(
            layer.get_delta_weight(ADAPTER).double(),
            alpha * original[key].get_delta_weight(ADAPTER).double(),
            rtol=1e-6,
            atol=1e-7,
        )
    base_sd = read_weights(base_dir)
    loaded_full = trained_full(loaded, like=model)
    assert loaded_full.keys() == trained_full(model).keys() and (config == "plain") == (not loaded_full)
    for key, tensor in trained_full(model).items():
        assert_interpolated(loaded_full[key], base_sd[key], tensor, alpha)
    # merging the scaled adapter gives the full merge at alpha
    full = read_weights(wise_ft(base_dir, adapter_dir, alpha, tmp_path / "full"))
    merged = loaded.merge_and_unload().state_dict()
    for key, tensor in full.items():
        torch.testing.assert_close(merged[key], tensor, rtol=1e-5, atol=1e-6)
    # at alpha = 1 the adapter itself
    one = read_weights(wise_ft(base_dir, adapter_dir, 1.0, tmp_path / "one", keep_adapter=True), "adapter_model")
    original_tensors = read_weights(adapter_dir, "adapter_model")
    assert one.keys() == original_tensors.keys()
    assert all(torch.equal(one[k], original_tensors[k]) for k in one)


def test_keep_adapter_needs_an_adapter(tmp_path):
    base_dir = save(tiny_opt(), tmp_path / "base")
    other = tiny_opt()
    perturb_(other)
    with pytest.raises(MergeError, match="keep_adapter"):
        wise_ft(base_dir, save(other, tmp_path / "ft"), 0.5, tmp_path / "out", keep_adapter=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep_adapter", [False, True])
def test_dora_is_refused(tmp_path, keep_adapter):
    base_dir, adapter_dir, _ = adapted(tmp_path, use_dora=True)
    with pytest.raises(MergeError, match="DoRA"):
        wise_ft(base_dir, adapter_dir, 0.5, tmp_path / "out", keep_adapter=keep_adapter)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_lora_sweep_reads_each_tensor_once(tmp_path, monkeypatch):
    alphas = [0.0, 0.5, 1.0]
    base_dir, adapter_dir, model = adapted(tmp_path, modules_to_save=["fc2"])
    reads = count_reads(monkeypatch)
    outs = wise_ft_sweep(base_dir, adapter_dir, alphas, tmp_path / "sweep")
    adapter_keys = read_weights(adapter_dir, "adapter_model").keys()
    assert reads == {("base", k): 1 for k in read_weights(base_dir)} | {("adapter", k): 1 for k in adapter_keys}
    monkeypatch.undo()
    base_sd = read_weights(base_dir)
    for alpha, out in outs.items():
        swept = read_weights(out)
        check_full_merge(swept, base_sd, model, alpha)
        single = read_weights(wise_ft(base_dir, adapter_dir, alpha, tmp_path / f"single-{alpha}"))
        assert all(torch.equal(swept[k], single[k]) for k in single)


# ---- CLIP ---------------------------------------------------------------------------------------


def test_clip_pair_merges_and_loads(tmp_path):
    pre, ft = tiny_clip(0), tiny_clip(0)
    perturb_(ft)
    pre_dir, ft_dir = save(pre, tmp_path / "pre"), save(ft, tmp_path / "ft")
    pre_sd, ft_sd = read_weights(pre_dir), read_weights(ft_dir)
    assert "logit_scale" in ft_sd and any(k.startswith("vision_model.") for k in ft_sd)
    out = wise_ft(pre_dir, ft_dir, 0.5, tmp_path / "out", max_shard_size="8KB")
    assert (out / "model.safetensors.index.json").is_file()
    merged = read_weights(out)
    assert set(merged) == set(ft_sd)
    for key, tensor in merged.items():
        assert_interpolated(tensor, pre_sd[key], ft_sd[key], 0.5)
    model = CLIPModel.from_pretrained(out).eval()
    reference_model = tiny_clip(0).eval()
    reference_model.load_state_dict({k: reference(pre_sd[k], ft_sd[k], 0.5).float() for k in ft_sd}, strict=False)
    batch = {k: v for k, v in clip_batch().items() if k != "return_loss"}
    with torch.no_grad():
        torch.testing.assert_close(
            model(**batch).logits_per_image, reference_model(**batch).logits_per_image, rtol=1e-5, atol=1e-5
        )
    with torch.no_grad():
        zero = CLIPModel.from_pretrained(wise_ft(pre_dir, ft_dir, 0.0, tmp_path / "zero")).eval()
        assert torch.equal(zero(**batch).logits_per_image, pre.eval()(**batch).logits_per_image)


def zero_shot_classifier(labels=("cat", "dog", "car")):
    """A CLIP image classifier whose head is the zero-shot head: the normalized text embeddings of the
    class prompts, taken back through the visual projection to the vision tower's hidden size."""
    clip = tiny_clip(0).eval()
    config = copy.deepcopy(clip.config)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    classifier = CLIPForImageClassification(config)
    classifier.vision_model.load_state_dict(clip.vision_model.state_dict())
    prompts = torch.tensor([[1, 5 + i, 9 + i, 2] for i in range(len(labels))])
    with torch.no_grad():
        text = clip.get_text_features(input_ids=prompts)
        text = text if torch.is_tensor(text) else text.pooler_output
        head = F.normalize(text, dim=-1) @ clip.visual_projection.weight
        classifier.classifier.weight.copy_(head)
        classifier.classifier.bias.zero_()
    return classifier


def test_clip_classifier_from_zero_shot_head(tmp_path):
    zero_shot = zero_shot_classifier()
    finetuned = copy.deepcopy(zero_shot)
    perturb_(finetuned)
    zs_dir, ft_dir = save(zero_shot, tmp_path / "zero_shot"), save(finetuned, tmp_path / "finetuned")
    zs_sd, ft_sd = read_weights(zs_dir), read_weights(ft_dir)
    assert {"classifier.weight", "classifier.bias"} <= set(ft_sd)
    alpha = 0.5
    out = wise_ft(zs_dir, ft_dir, alpha, tmp_path / "out")
    merged = read_weights(out)
    assert set(merged) == set(ft_sd)
    for key, tensor in merged.items():
        assert_interpolated(tensor, zs_sd[key], ft_sd[key], alpha)
    model = CLIPForImageClassification.from_pretrained(out).eval()
    assert model.config.id2label == {0: "cat", 1: "dog", 2: "car"}
    pixels = clip_batch()["pixel_values"]
    interpolated = copy.deepcopy(zero_shot)
    interpolated.load_state_dict({k: reference(zs_sd[k], ft_sd[k], alpha).float() for k in ft_sd}, strict=False)
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
        torch.testing.assert_close(logits, interpolated.eval()(pixel_values=pixels).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(logits, zero_shot.eval()(pixel_values=pixels).logits)
    # the zero-shot classifier against the CLIP model it came from: not the same architecture
    clip_dir = save(tiny_clip(0), tmp_path / "clip")
    with pytest.raises(MergeError, match="architectures"):
        wise_ft(clip_dir, ft_dir, alpha, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`")
def test_lora_on_input_embeddings(tmp_path):
    """`lora_embedding_A/B` give a delta `(B @ A).T`; peft also saves the embedding's base weight."""
    base_dir, adapter_dir, model = adapted(tmp_path, tiny_llama, target_modules=["embed_tokens", "q_proj"])
    assert "model.embed_tokens.weight" in lora_weights(model)
    base_sd = read_weights(base_dir)
    check_full_merge(read_weights(wise_ft(base_dir, adapter_dir, 0.4, tmp_path / "out")), base_sd, model, 0.4)
    peft_merged = copy.deepcopy(model).merge_and_unload().state_dict()
    merged = read_weights(wise_ft(base_dir, adapter_dir, 1.0, tmp_path / "one"))
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, peft_merged[key], rtol=1e-5, atol=1e-6)


def test_conv1d_layout_comes_from_the_architecture_not_the_adapter_config(tmp_path):
    """peft rewrites `fan_in_fan_out` in the config as it meets each layer, so in an adapter on
    Conv1D and Linear layers the saved flag is right for some of them only. The merge reads each
    layer's layout off the base architecture (GPT-2: Conv1D everywhere but `lm_head`)."""
    base_dir, adapter_dir, model = adapted(tmp_path, tiny_gpt2, target_modules=["c_proj"], fan_in_fan_out=True)
    config_path = adapter_dir / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "fan_in_fan_out": False}))
    merged = read_weights(wise_ft(base_dir, adapter_dir, 1.0, tmp_path / "out"))
    peft_merged = copy.deepcopy(model).merge_and_unload().state_dict()
    assert merged["transformer.h.0.attn.c_proj.weight"].shape == (16, 16)  # square: a wrong layout would load
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, peft_merged[key], rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
def test_lora_on_a_tied_output_layer_unties_it(tmp_path):
    """An adapted `lm_head` no longer equals the input embeddings it was tied to: both are written
    and the config says so, or loading would silently tie them back."""
    from transformers import OPTForCausalLM

    base_dir, adapter_dir, model = adapted(tmp_path, target_modules=["q_proj", "lm_head"])
    base_sd = read_weights(base_dir)
    assert "lm_head.weight" not in base_sd  # tied in the base checkpoint
    out = wise_ft(base_dir, adapter_dir, 0.5, tmp_path / "out")
    merged = read_weights(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    embeddings = base_sd["model.decoder.embed_tokens.weight"]
    assert torch.equal(merged["model.decoder.embed_tokens.weight"], embeddings)
    with torch.no_grad():
        delta = lora_weights(model)["lm_head.weight"].get_delta_weight(ADAPTER)
    torch.testing.assert_close(merged["lm_head.weight"], embeddings + 0.5 * delta, rtol=1e-6, atol=1e-6)
    loaded = OPTForCausalLM.from_pretrained(out)
    assert not torch.equal(loaded.lm_head.weight, loaded.model.decoder.embed_tokens.weight)
    torch.testing.assert_close(loaded.lm_head.weight.detach(), merged["lm_head.weight"])


def test_adapter_of_another_base_model_warns_naming_both(tmp_path, capsys):
    base_dir, adapter_dir, _ = adapted(tmp_path)
    (tmp_path / "link").symlink_to(base_dir)
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())

    def warned(trained_on, **kwargs):
        config_path.write_text(json.dumps({**config, "base_model_name_or_path": trained_on}))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            wise_ft(base_dir, adapter_dir, 0.5, tmp_path / "out", overwrite=True, **kwargs)
        return [str(w.message) for w in caught if issubclass(w.category, MergeWarning)]

    (message,) = warned("someone/other-model")
    assert message == (
        f"{adapter_dir}: the adapter was trained on 'someone/other-model' (its base_model_name_or_path), "
        f"and is merged onto {str(base_dir)!r}; the shapes fit, but check that this is its base model"
    )
    assert len(warned("someone/other-model", keep_adapter=True)) == 1
    for same in ("facebook/base", str(base_dir), str(tmp_path / "link"), None):  # the same name, path or directory
        assert warned(same) == [], same
    base_config = json.loads((base_dir / "config.json").read_text())
    (base_dir / "config.json").write_text(json.dumps({**base_config, "_name_or_path": "someone/other-model"}))
    assert warned("someone/other-model") == []  # the base's own config says it is that model
    (base_dir / "config.json").write_text(json.dumps(base_config))

    config_path.write_text(json.dumps({**config, "base_model_name_or_path": "someone/other-model"}))
    capsys.readouterr()
    assert (
        main(
            [
                "merge",
                "--pretrained",
                str(base_dir),
                "--finetuned",
                str(adapter_dir),
                "--alpha",
                "0.5",
                "--output-dir",
                str(tmp_path / "cli"),
            ]
        )
        == 0
    )
    assert capsys.readouterr().err == f"specgen: warning: {message}\n"
