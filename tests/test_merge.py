"""WiSE-FT merging of full checkpoints: `theta = (1 - alpha) * theta_pre + alpha * theta_ft`,
streamed shard by shard, against independent computations on the saved tensors."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, FakeHub, perturb_, read_weights, save, tiny_opt
from merge_helpers import (
    PicklePayload,
    assert_interpolated,
    count_reads,
    fail_after,
    leftovers,
    read_card,
    reference,
    rule_tensors,
    tiny_llama,
    tiny_tokenizer,
    write_checkpoint,
)
from safetensors.torch import load_file, save_file
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTForCausalLM,
)

import hf_specgen.merge.chunked as chunked_module
import hf_specgen.merge.writer as writer_module
from hf_specgen.merge import MergeError, PushError, alpha_dirname, iter_wise_ft, wise_ft, wise_ft_sweep
from hf_specgen.merge.checkpoint import Checkpoint
from hf_specgen.merge.plan import MergedTensor
from hf_specgen.merge.writer import ShardedWriter


SHARD_NAME = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")


# ---- full checkpoints ---------------------------------------------------------------------------


def test_merge_interpolates_every_tensor_and_loads_tied(opt, tmp_path):
    alpha = 0.3
    out = wise_ft(opt["pre"], opt["ft"], alpha, tmp_path / "merged")
    assert out == tmp_path / "merged"
    merged = read_weights(out)
    assert set(merged) == set(opt["ft_sd"]) and "lm_head.weight" not in merged  # the tie is written once
    for key, tensor in merged.items():
        assert_interpolated(tensor, opt["pre_sd"][key], opt["ft_sd"][key], alpha)
    assert not torch.equal(
        merged["model.decoder.layers.0.fc1.weight"], opt["ft_sd"]["model.decoder.layers.0.fc1.weight"]
    )

    model = OPTForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    for name, param in model.state_dict().items():
        source = "model.decoder.embed_tokens.weight" if name == "lm_head.weight" else name
        assert torch.equal(param, merged[source]), name
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("alpha, side", [(0.0, "pre_sd"), (1.0, "ft_sd")])
def test_alpha_ends_are_bit_exact_copies(opt, tmp_path, alpha, side):
    merged = read_weights(wise_ft(opt["pre"], opt["ft"], alpha, tmp_path / "out"))
    assert set(merged) == set(opt[side])
    for key, tensor in merged.items():
        assert torch.equal(tensor, opt[side][key]), key


@pytest.mark.parametrize("pre, ft", [("pre", "ft_sharded"), ("pre_sharded", "ft")])
def test_differently_sharded_inputs_give_hf_sharded_output(opt, tmp_path, pre, ft):
    alpha = 0.6
    out = wise_ft(opt[pre], opt[ft], alpha, tmp_path / "out", max_shard_size="3KB")
    shards = sorted(out.glob("model-*.safetensors"))
    names = [SHARD_NAME.fullmatch(s.name) for s in shards]
    assert len(shards) > 2 and all(names)
    assert [int(m.group(1)) for m in names] == list(range(1, len(shards) + 1))
    assert {int(m.group(2)) for m in names} == {len(shards)}
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    merged = read_weights(out)
    assert set(weight_map) == set(merged) == set(opt["ft_sd"])
    assert set(weight_map.values()) == {s.name for s in shards}
    for key, file in weight_map.items():
        assert (out / file).is_file() and key in load_file(out / file)
    for shard in shards:  # no shard above the limit, unless one tensor alone
        tensors = load_file(shard)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= 3 * 1000 or len(tensors) == 1
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())
    for key, tensor in merged.items():
        assert_interpolated(tensor, opt["pre_sd"][key], opt["ft_sd"][key], alpha)
    # the same bits as a merge of unsharded inputs into one file
    single = read_weights(wise_ft(opt["pre"], opt["ft"], alpha, tmp_path / "single"))
    assert all(torch.equal(single[k], merged[k]) for k in single)
    model = OPTForCausalLM.from_pretrained(out)
    assert torch.equal(model.model.decoder.layers[1].fc2.weight, merged["model.decoder.layers.1.fc2.weight"])


def test_streamed_one_tensor_at_a_time_shards_written_as_they_fill(opt, tmp_path, monkeypatch):
    events = []
    original_get, original_close = Checkpoint.get, writer_module.ShardedWriter._close_shard

    def get(self, key):
        events.append(("get", self.directory.name, key))
        return original_get(self, key)

    def close_shard(self):
        events.append(("close", self._shard_bytes, len(self._entries)))
        return original_close(self)

    monkeypatch.setattr(Checkpoint, "get", get)
    monkeypatch.setattr(writer_module.ShardedWriter, "_close_shard", close_shard)
    wise_ft(opt["pre"], opt["ft_sharded"], 0.5, tmp_path / "out", max_shard_size="3KB")

    reads = [e[1:] for e in events if e[0] == "get"]
    assert sorted(k for d, k in reads if d == "ft_sharded") == sorted(opt["ft_sd"])  # each key once
    assert sorted(k for d, k in reads if d == "pre") == sorted(opt["pre_sd"])
    closes = [i for i, e in enumerate(events) if e[0] == "close"]
    last_read = max(i for i, e in enumerate(events) if e[0] == "get")
    assert len(closes) > 2 and closes[0] < last_read  # shards are finished while inputs are still being read
    assert all(events[i][1] <= 3000 or events[i][2] == 1 for i in closes)


def test_bin_checkpoints_are_read_with_weights_only(opt, tmp_path, monkeypatch):
    ft = OPTForCausalLM.from_pretrained(opt["ft"])
    bin_dir = tmp_path / "ft_bin"
    bin_dir.mkdir()
    torch.save(ft.state_dict(), bin_dir / "pytorch_model.bin")  # holds the tied lm_head.weight too
    shutil.copy(opt["ft"] / "config.json", bin_dir)
    calls = []
    original_load = torch.load

    def load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return original_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    out = wise_ft(opt["pre"], bin_dir, 0.25, tmp_path / "out")
    assert calls and all(c is True for c in calls)
    merged = read_weights(out)
    assert set(merged) == set(opt["ft_sd"])  # the tie is written once, as save_pretrained writes it
    for key, tensor in merged.items():
        assert_interpolated(tensor, opt["pre_sd"][key], opt["ft_sd"][key], 0.25)
    model = OPTForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()


def test_bin_checkpoint_never_runs_pickled_code(opt, tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save(
        {"model.decoder.embed_tokens.weight": torch.zeros(2), "x": PicklePayload(str(marker))},
        bad / "pytorch_model.bin",
    )
    with pytest.raises(Exception):
        wise_ft(opt["pre"], bad, 0.5, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


# ---- tensor rules -------------------------------------------------------------------------------


def test_integer_and_bool_tensors_copied_when_equal(tmp_path):
    pre = write_checkpoint(tmp_path / "pre", rule_tensors(0))
    ft = write_checkpoint(tmp_path / "ft", rule_tensors(1))
    out = read_weights(wise_ft(pre, ft, 0.5, tmp_path / "out", dtype="bfloat16"))
    assert out["steps"].dtype == torch.int64 and torch.equal(out["steps"], rule_tensors(0)["steps"])
    assert out["mask"].dtype == torch.bool and torch.equal(out["mask"], rule_tensors(0)["mask"])
    assert out["w"].dtype == torch.bfloat16
    assert torch.equal(out["w"], reference(rule_tensors(0)["w"], rule_tensors(1)["w"], 0.5).to(torch.bfloat16))


@pytest.mark.parametrize(
    "key, value",
    [("steps", torch.tensor([3, 1, 5], dtype=torch.int64)), ("mask", torch.tensor([True, True, True]))],
)
def test_differing_integer_or_bool_tensors_are_refused(tmp_path, key, value):
    pre = write_checkpoint(tmp_path / "pre", rule_tensors(0))
    ft = write_checkpoint(tmp_path / "ft", rule_tensors(1, **{key: value}))
    with pytest.raises(MergeError, match=key):
        wise_ft(pre, ft, 0.5, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_integer_buffer_in_a_real_model_checkpoint(opt, tmp_path):
    """A model whose checkpoint has an integer buffer (a step counter): equal, copied; different, refused."""
    pre_sd, ft_sd = dict(opt["pre_sd"]), dict(opt["ft_sd"])
    config = json.loads((opt["pre"] / "config.json").read_text())
    counter = "model.decoder.layers.0.self_attn.num_batches_tracked"
    pre = write_checkpoint(tmp_path / "pre", {**pre_sd, counter: torch.tensor(7)}, config)
    same = write_checkpoint(tmp_path / "same", {**ft_sd, counter: torch.tensor(7)}, config)
    other = write_checkpoint(tmp_path / "other", {**ft_sd, counter: torch.tensor(8)}, config)
    out = read_weights(wise_ft(pre, same, 0.5, tmp_path / "out"))
    assert torch.equal(out[counter], torch.tensor(7))
    assert_interpolated(
        out["model.decoder.layers.0.fc1.weight"],
        pre_sd["model.decoder.layers.0.fc1.weight"],
        ft_sd["model.decoder.layers.0.fc1.weight"],
        0.5,
    )
    with pytest.raises(MergeError, match=re.escape(counter)):
        wise_ft(pre, other, 0.5, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_float_in_one_model_integer_in_the_other_is_refused(tmp_path):
    pre = write_checkpoint(tmp_path / "pre", rule_tensors(0))
    ft = write_checkpoint(tmp_path / "ft", rule_tensors(1, steps=torch.tensor([3.0, 1.0, 4.0])))
    with pytest.raises(MergeError, match="steps"):
        wise_ft(pre, ft, 0.5, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "pre_overrides, ft_overrides, pattern",
    [
        ({"extra": torch.ones(2)}, {}, r"missing in finetuned: extra"),
        ({}, {"extra": torch.ones(2)}, r"missing in pretrained: extra"),
        ({}, {"w": torch.zeros(4, 5)}, r"w: shape \(4, 3\) in pretrained, \(4, 5\) in finetuned"),
    ],
)
def test_missing_key_or_shape_is_refused_naming_it(tmp_path, pre_overrides, ft_overrides, pattern):
    pre = write_checkpoint(tmp_path / "pre", rule_tensors(0, **pre_overrides))
    ft = write_checkpoint(tmp_path / "ft", rule_tensors(1, **ft_overrides))
    with pytest.raises(MergeError, match=pattern):
        wise_ft(pre, ft, 0.5, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_floats_interpolated_in_float32_and_cast_to_the_finetuned_dtype(tmp_path):
    g = torch.Generator().manual_seed(0)
    pre_w = torch.randn(64, 64, generator=g)  # float32, most values not representable in bfloat16
    ft_w = (pre_w + 0.05 * torch.randn(64, 64, generator=g)).to(torch.bfloat16)
    pre = write_checkpoint(tmp_path / "pre", {"w": pre_w})
    ft = write_checkpoint(tmp_path / "ft", {"w": ft_w})
    out = read_weights(wise_ft(pre, ft, 0.3, tmp_path / "out"))["w"]
    assert out.dtype == torch.bfloat16
    exact = reference(pre_w, ft_w, 0.3).to(torch.bfloat16)
    in_bf16 = torch.lerp(pre_w.to(torch.bfloat16), ft_w, 0.3)  # what interpolating in bfloat16 gives
    assert (out != exact).float().mean() < 0.01  # double rounding only, float32 -> bfloat16
    assert (out != in_bf16).float().mean() > 0.1
    # an explicit dtype wins over the fine-tuned one
    out32 = read_weights(wise_ft(pre, ft, 0.3, tmp_path / "out32", dtype="float32"))["w"]
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), reference(pre_w, ft_w, 0.3), rtol=1e-6, atol=1e-7)


def test_dtype_option_casts_weights_and_updates_config(opt, tmp_path):
    out = wise_ft(opt["pre"], opt["ft"], 0.5, tmp_path / "out", dtype="float16")
    merged = read_weights(out)
    for key, tensor in merged.items():
        assert tensor.dtype == torch.float16
        expected = reference(opt["pre_sd"][key], opt["ft_sd"][key], 0.5).float().to(torch.float16)
        torch.testing.assert_close(tensor, expected, rtol=1e-3, atol=1e-4)
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float16"
    assert json.loads((opt["ft"] / "config.json").read_text())["dtype"] == "float32"  # the input is untouched
    assert OPTForCausalLM.from_pretrained(out).config.dtype == torch.float16
    with pytest.raises(MergeError, match="dtype"):
        wise_ft(opt["pre"], opt["ft"], 0.5, tmp_path / "bad", dtype="int8")


def test_untied_model_merges_lm_head_separately(tmp_path):
    pre, ft = tiny_llama(), tiny_llama()
    perturb_(ft)
    pre_dir, ft_dir = save(pre, tmp_path / "pre"), save(ft, tmp_path / "ft")
    pre_sd, ft_sd = read_weights(pre_dir), read_weights(ft_dir)
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(ft_sd)
    out = wise_ft(pre_dir, ft_dir, 0.4, tmp_path / "out")
    merged = read_weights(out)
    assert set(merged) == set(ft_sd)
    for key, tensor in merged.items():
        assert_interpolated(tensor, pre_sd[key], ft_sd[key], 0.4)
    model = LlamaForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, merged["lm_head.weight"])
    assert torch.equal(model.model.embed_tokens.weight, merged["model.embed_tokens.weight"])


def test_an_untied_pretrained_lm_head_is_not_dropped_for_a_tied_finetuned_one(tmp_path):
    """A pre-trained model with its own lm_head and a fine-tuned one that ties it to the embeddings: the
    output (tied, as the fine-tuned config says) could not hold the pre-trained lm_head, so the merge is
    refused, naming it, before anything is written. The other way round the output is untied, its lm_head
    interpolated from the pre-trained embeddings."""
    pre, ft = tiny_llama(), tiny_llama()
    perturb_(ft)
    tied = LlamaForCausalLM(LlamaConfig(**{**ft.config.to_dict(), "tie_word_embeddings": True}))
    tied.load_state_dict(ft.state_dict(), strict=False)  # lm_head now the embeddings
    untied_dir, tied_dir = save(pre, tmp_path / "untied"), save(tied, tmp_path / "tied")
    assert "lm_head.weight" in read_weights(untied_dir) and "lm_head.weight" not in read_weights(tied_dir)
    with pytest.raises(MergeError, match=r"pretrained stores lm_head\.weight, which the fine-tuned model ties"):
        wise_ft(untied_dir, tied_dir, 0.5, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    tied_pre = save(tied, tmp_path / "tied_pre")
    out = read_weights(wise_ft(tied_pre, save(pre, tmp_path / "untied_ft"), 0.5, tmp_path / "back"))
    embed = read_weights(tied_pre)["model.embed_tokens.weight"]
    assert_interpolated(out["lm_head.weight"], embed, pre.lm_head.weight.detach(), 0.5)


@pytest.mark.parametrize("build", [tiny_opt, tiny_llama], ids=["opt_tied", "llama_untied"])
@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_added_tokens_come_from_the_finetuned_model(tmp_path, build, alpha):
    grown = VOCAB + 8
    pre, ft = build(seed=0), build(seed=0)
    ft.resize_token_embeddings(grown)
    assert ft.config.vocab_size == grown
    perturb_(ft)
    pre_dir, ft_dir = save(pre, tmp_path / "pre"), save(ft, tmp_path / "ft")
    pre_sd, ft_sd = read_weights(pre_dir), read_weights(ft_dir)
    out = wise_ft(pre_dir, ft_dir, alpha, tmp_path / "out")
    merged = read_weights(out)
    vocab_keys = [k for k in ft_sd if ft_sd[k].shape[0] == grown]
    assert vocab_keys and ("lm_head.weight" in vocab_keys) == (build is tiny_llama)
    for key, tensor in merged.items():
        if key in vocab_keys:
            assert tensor.shape == (grown, 16)
            assert torch.equal(tensor[VOCAB:], ft_sd[key][VOCAB:]), key  # new tokens: fine-tuned rows
            if alpha == 0:
                assert torch.equal(tensor[:VOCAB], pre_sd[key]), key
            assert_interpolated(tensor[:VOCAB], pre_sd[key], ft_sd[key][:VOCAB], alpha)
        else:
            assert_interpolated(tensor, pre_sd[key], ft_sd[key], alpha)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == grown
    model = type(ft).from_pretrained(out)
    assert model.get_input_embeddings().weight.shape == (grown, 16)


def test_smaller_finetuned_vocabulary_is_refused(tmp_path):
    pre, ft = tiny_opt(), tiny_opt()
    ft.resize_token_embeddings(VOCAB - 4)
    pre_dir, ft_dir = save(pre, tmp_path / "pre"), save(ft, tmp_path / "ft")
    with pytest.raises(MergeError, match="embed_tokens"):
        wise_ft(pre_dir, ft_dir, 0.5, tmp_path / "out")


def test_non_finite_output_is_refused(opt, tmp_path):
    ft_sd = dict(opt["ft_sd"])
    key = "model.decoder.layers.1.fc1.weight"
    ft_sd[key] = ft_sd[key].clone()
    ft_sd[key][0, 0] = float("inf")
    config = json.loads((opt["ft"] / "config.json").read_text())
    bad = write_checkpoint(tmp_path / "bad", ft_sd, config)
    with pytest.raises(MergeError, match=re.escape(key)):
        wise_ft(opt["pre"], bad, 0.5, tmp_path / "out", max_shard_size="3KB")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    # alpha = 0 is the pre-trained model, which has no inf: nothing to refuse
    zero = read_weights(wise_ft(opt["pre"], bad, 0.0, tmp_path / "zero"))
    assert torch.equal(zero[key], opt["pre_sd"][key])
    # extrapolating far enough overflows the output dtype; beyond float32, alpha itself is refused
    with pytest.raises(MergeError, match="NaN or inf"):
        wise_ft(opt["pre"], opt["ft"], 1e7, tmp_path / "far", extrapolate=True, dtype="float16")
    with pytest.raises(MergeError, match="float32 range"):
        wise_ft(opt["pre"], opt["ft"], 1e40, tmp_path / "far", extrapolate=True)
    assert not (tmp_path / "far").exists() and leftovers(tmp_path) == []


# ---- side files and model card ------------------------------------------------------------------


PREPROCESSOR = {
    "crop_size": {"height": 16, "width": 16},
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": {"shortest_edge": 16},
}


def test_side_files_come_from_the_finetuned_model(opt, tmp_path):
    """Config, generation config, tokenizer and its chat template, processor configs: the fine-tuned
    model's, byte for byte (PIL and torchvision are not installed here, so the image processor and
    processor configs are written as a CLIPProcessor would write them)."""
    pre_dir, ft_dir = tmp_path / "pre", tmp_path / "ft"
    shutil.copytree(opt["pre"], pre_dir)
    shutil.copytree(opt["ft"], ft_dir)
    tiny_tokenizer(words=5).save_pretrained(pre_dir)  # a different tokenizer on the pre-trained side
    tiny_tokenizer().save_pretrained(ft_dir)
    GenerationConfig(max_new_tokens=7, do_sample=False, bos_token_id=2, eos_token_id=2).save_pretrained(ft_dir)
    (ft_dir / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    (ft_dir / "processor_config.json").write_text(json.dumps({"processor_class": "CLIPProcessor"}, indent=2))
    (ft_dir / "training_args.bin").write_bytes(b"not a side file")
    ft_files = {p.name for p in ft_dir.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"} <= ft_files

    out = wise_ft(pre_dir, ft_dir, 0.5, tmp_path / "out")
    side = ft_files - {"model.safetensors", "training_args.bin"}
    assert {p.name for p in out.iterdir()} == side | {"model.safetensors", "README.md", "specgen_merge.json"}
    for name in side:
        assert (out / name).read_bytes() == (ft_dir / name).read_bytes(), name
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == 32 and tokenizer.chat_template == tiny_tokenizer().chat_template
    assert tokenizer.apply_chat_template([{"role": "user", "content": "w1 w2"}], tokenize=False) == "[user] w1 w2\n"
    assert GenerationConfig.from_pretrained(out).max_new_tokens == 7

    out16 = wise_ft(pre_dir, ft_dir, 0.5, tmp_path / "out16", dtype="bfloat16")
    config, ft_config = (
        json.loads((out16 / "config.json").read_text()),
        json.loads((ft_dir / "config.json").read_text()),
    )
    assert config.pop("dtype") == "bfloat16" and ft_config.pop("dtype") == "float32"
    assert config == ft_config
    assert (out16 / "tokenizer.json").read_bytes() == (ft_dir / "tokenizer.json").read_bytes()


def test_model_card_base_model_lists_the_hub_ids(tmp_path):
    from hf_specgen.merge.card import write_model_card

    write_model_card(tmp_path, "facebook/galactica-125m", str(tmp_path), alpha=0.5)
    metadata, body = read_card(tmp_path)
    assert metadata["base_model"] == ["facebook/galactica-125m"] and f"- finetuned: `{tmp_path}`" in body


def test_model_card_metadata_and_scores(opt, tmp_path):
    scores = "| alpha | speciality | generality |\n|---|---|---|\n| 0.35 | 71.2 | 55.0 |"
    out = wise_ft(opt["pre"], opt["ft"], 0.35, tmp_path / "out", scores=scores)
    metadata, body = read_card(out)
    assert "base_model" not in metadata  # local directories: the Hub refuses them as base_model
    assert f"- pretrained: `{opt['pre']}`" in body and f"- finetuned: `{opt['ft']}`" in body
    assert metadata["tags"] == ["hf_specgen", "wise-ft", "merge"]
    assert metadata["wise_ft"]["alpha"] == 0.35
    assert scores in body and "0.35" in body
    _, plain = read_card(wise_ft(opt["pre"], opt["ft"], 0.35, tmp_path / "plain"))
    assert "|---|" not in plain


# ---- sweeps -------------------------------------------------------------------------------------


def test_sweep_reads_each_tensor_once_and_matches_single_merges(opt, tmp_path, monkeypatch):
    alphas = [0.0, 0.25, 0.5, 1.0]
    reads = count_reads(monkeypatch)
    outs = wise_ft_sweep(opt["pre_sharded"], opt["ft"], alphas, tmp_path / "sweep", max_shard_size="4KB")
    expected_reads = {("pre_sharded", k): 1 for k in opt["pre_sd"]} | {("ft", k): 1 for k in opt["ft_sd"]}
    assert reads == expected_reads
    monkeypatch.undo()
    assert outs == {a: tmp_path / "sweep" / alpha_dirname(a) for a in alphas}
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == [
        "alpha-0",
        "alpha-0.25",
        "alpha-0.5",
        "alpha-1",
        "specgen_merge.json",
    ]
    for alpha, out in outs.items():
        single = wise_ft(opt["pre_sharded"], opt["ft"], alpha, tmp_path / f"single-{alpha}", max_shard_size="4KB")
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in single.iterdir())
        swept, alone = read_weights(out), read_weights(single)
        assert set(swept) == set(alone)
        assert all(torch.equal(swept[k], alone[k]) for k in alone)
        assert read_card(out)[0]["wise_ft"]["alpha"] == alpha
        assert (out / "model.safetensors.index.json").read_text() == (
            single / "model.safetensors.index.json"
        ).read_text()
    for key in opt["ft_sd"]:
        assert_interpolated(read_weights(outs[0.25])[key], opt["pre_sd"][key], opt["ft_sd"][key], 0.25)
    assert leftovers(tmp_path) == []


def test_iter_wise_ft_yields_the_written_state_dicts(opt, tmp_path):
    alphas = [0.0, 0.4, 1.0]
    outs = wise_ft_sweep(opt["pre"], opt["ft"], alphas, tmp_path / "sweep")
    seen = []
    for alpha, state_dict in iter_wise_ft(opt["pre"], opt["ft"], alphas):
        seen.append(alpha)
        written = read_weights(outs[alpha])
        assert set(state_dict) == set(written)
        assert all(torch.equal(state_dict[k], written[k]) for k in written)
        model = OPTForCausalLM.from_pretrained(opt["ft"])
        model.load_state_dict(state_dict, strict=False)
        assert torch.equal(model.lm_head.weight, written["model.decoder.embed_tokens.weight"])
    assert seen == alphas
    assert not any(p.name.startswith("alpha") for p in tmp_path.iterdir())


def test_sweep_refuses_bad_alphas_before_writing(opt, tmp_path):
    for alphas, pattern in [
        ([0.5, 1.2], "alpha must be in"),
        ([0.5, 0.5], "repeat"),
        ([], "no alpha"),
        ([0.1234561, 0.1234562], "same output directory names"),
    ]:
        with pytest.raises(MergeError, match=pattern):
            wise_ft_sweep(opt["pre"], opt["ft"], alphas, tmp_path / "sweep")
        assert not (tmp_path / "sweep").exists()
    outs = wise_ft_sweep(opt["pre"], opt["ft"], [1.5], tmp_path / "sweep", extrapolate=True)
    assert outs[1.5].name == "alpha-1.5"


# ---- safety -------------------------------------------------------------------------------------


@pytest.mark.parametrize("target, name", [(ShardedWriter, "begin"), (MergedTensor, "compute")])
@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()], ids=["oserror", "ctrl_c"])
def test_failure_mid_write_leaves_nothing(opt, tmp_path, monkeypatch, target, name, error):
    """The failure comes once a shard has been written (the writers run behind the computing: the failing
    call waits for the first closed shard)."""
    import threading

    parent = tmp_path / "outputs"
    parent.mkdir()
    flushed, closed = [], threading.Event()
    original_close = ShardedWriter._close_shard

    def close_shard(self):
        original_close(self)
        flushed.append(1)
        closed.set()

    monkeypatch.setattr(ShardedWriter, "_close_shard", close_shard)
    count = fail_after(monkeypatch, target, name, 20, error, before=lambda: closed.wait(30))
    with pytest.raises(type(error)):
        wise_ft(opt["pre"], opt["ft"], 0.5, parent / "out", max_shard_size="3KB")
    assert count["n"] == 21 and flushed  # it failed after shards had been written
    assert list(parent.iterdir()) == []
    count["n"], flushed[:] = 0, []
    closed.clear()
    with pytest.raises(type(error)):
        wise_ft_sweep(opt["pre"], opt["ft"], [0.2, 0.8], parent / "sweep", max_shard_size="3KB")
    assert count["n"] in (21, 22) and flushed  # the other alpha's writer thread may be inside `add` too
    assert list(parent.iterdir()) == []


def test_existing_output_refused_without_overwrite_replaced_with_it(opt, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MergeError, match=re.escape(str(out))):
        wise_ft(opt["pre"], opt["ft"], 0.5, out)
    with pytest.raises(MergeError, match="already exists"):
        wise_ft_sweep(opt["pre"], opt["ft"], [0.5], out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"

    # a failure while overwriting keeps the old output
    fail_after(monkeypatch, ShardedWriter, "begin", 3, OSError("disk full"))
    with pytest.raises(OSError):
        wise_ft(opt["pre"], opt["ft"], 0.5, out, overwrite="any")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    monkeypatch.undo()

    wise_ft(opt["pre"], opt["ft"], 0.5, out, overwrite="any")
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    merged = read_weights(out)
    assert_interpolated(
        merged["model.decoder.final_layer_norm.weight"],
        opt["pre_sd"]["model.decoder.final_layer_norm.weight"],
        opt["ft_sd"]["model.decoder.final_layer_norm.weight"],
        0.5,
    )
    wise_ft_sweep(opt["pre"], opt["ft"], [0.0, 1.0], out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["alpha-0", "alpha-1", "specgen_merge.json"]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), float("inf")])
def test_alpha_outside_unit_interval_refused(opt, tmp_path, alpha):
    with pytest.raises(MergeError, match="alpha"):
        wise_ft(opt["pre"], opt["ft"], alpha, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("alpha", [1.5, -0.5])
def test_extrapolate(opt, tmp_path, alpha):
    merged = read_weights(wise_ft(opt["pre"], opt["ft"], alpha, tmp_path / "out", extrapolate=True))
    for key, tensor in merged.items():
        pre, ft = opt["pre_sd"][key].double(), opt["ft_sd"][key].double()
        beyond = ft + (alpha - 1) * (ft - pre)  # alpha = 1.5: ft + 0.5 * (ft - pre)
        torch.testing.assert_close(tensor.double(), beyond, rtol=1e-6, atol=1e-6)


def test_mismatched_architectures_refused_before_writing(opt, tmp_path, monkeypatch):
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32))
    gpt2_dir = save(gpt2, tmp_path / "gpt2")
    added = []
    monkeypatch.setattr(ShardedWriter, "begin", lambda self, key, dtype, shape: added.append(key))
    with pytest.raises(MergeError, match="mismatched architectures.*opt.*gpt2"):
        wise_ft(opt["pre"], gpt2_dir, 0.5, tmp_path / "out")
    # same tensors, a different model_type in config.json
    other = tmp_path / "other"
    shutil.copytree(opt["ft"], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(MergeError, match="model_type"):
        wise_ft_sweep(opt["pre"], other, [0.5], tmp_path / "out")
    assert added == [] and not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# ---- push to the Hub ----------------------------------------------------------------------------


def test_push_to_hub_uploads_weights_and_card(opt, tmp_path):
    hub = FakeHub()
    out = wise_ft(
        opt["pre"],
        opt["ft"],
        0.45,
        tmp_path / "out",
        "me/opt-wise-ft",
        private=True,
        hub_api=hub,
        max_shard_size="4KB",
    )
    assert (
        len(hub.created) == 1 and hub.created[0]["repo_id"] == "me/opt-wise-ft" and hub.created[0]["private"] is True
    )
    (upload,) = hub.uploads
    assert upload["repo_id"] == "me/opt-wise-ft" and Path(upload["folder_path"]) == out
    files = upload["files"]
    assert "model.safetensors.index.json" in files and "config.json" in files
    shards = [name for name in files if SHARD_NAME.fullmatch(name)]
    assert len(shards) > 1 and all(files[s] == (out / s).read_bytes() for s in shards)
    assert "alpha: 0.45" in files["README.md"].decode()
    assert not any(".partial" in name for name in files)

    public = FakeHub()
    wise_ft(opt["pre"], opt["ft"], 0.45, tmp_path / "public", "me/public", hub_api=public)
    assert public.created[0]["private"] is False


def test_failed_push_raises_push_error_and_keeps_the_output(opt, tmp_path):
    hub = FakeHub(fail=True)
    with pytest.raises(PushError, match="503") as error:
        wise_ft(opt["pre"], opt["ft"], 0.5, tmp_path / "out", "me/opt", hub_api=hub)
    assert "intact" in str(error.value)
    merged = read_weights(tmp_path / "out")
    assert set(merged) == set(opt["ft_sd"]) and (tmp_path / "out" / "README.md").is_file()
    assert hub.uploads and hub.uploads[0]["files"].keys() == {p.name for p in (tmp_path / "out").iterdir()}


def _ordered(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns as integers in the order of the values (the gap of two is their distance in ulps)."""
    bits = tensor.view({torch.float32: torch.int32, torch.bfloat16: torch.int16}[tensor.dtype]).long()
    sign = torch.iinfo(torch.int32 if tensor.dtype == torch.float32 else torch.int16).min
    return torch.where(bits < 0, sign - bits, bits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wise_ft_is_within_one_ulp_of_the_float64_interpolation(tmp_path, dtype, monkeypatch):
    """Every output within 1 ulp of `(1 - alpha) * pre + alpha * ft` computed in float64 and rounded to the tensor's
    dtype (the merge computes in float64), over six decades of magnitude and both signs, for fine-tuned weights
    within 45% of the pre-trained ones (a fine-tune's) and for rows where the two nearly or exactly cancel (ft = -pre
    to 1e-6 at alpha 0.5; 3 s and -7 s at alpha 0.3 and 0.7: float32 arithmetic, torch.lerp, is off by up to 2**23
    ulps of such near-zero results, and by 2**30 and more for bf16 inputs); alpha 0 and 1 bit-identical."""
    monkeypatch.setattr(chunked_module, "CHUNK_ELEMENTS", 10_000)  # 27 chunks, the last one short
    torch.manual_seed(0)
    pre = torch.randn(512, 512, dtype=torch.float64) * torch.logspace(-3, 3, 512, dtype=torch.float64)
    ft = (
        pre
        + torch.randn(512, 512, dtype=torch.float64).clamp(-3, 3)
        * pre.abs()
        * torch.rand(512, 1, dtype=torch.float64)
        * 0.15
    )
    ft[::8] = -pre[::8] * (1 + 1e-6 * torch.randn(64, 512, dtype=torch.float64))  # nearly cancelling rows
    # exactly cancelling at alpha 0.3 and 0.7 in any dtype: 0.7 * 3 s = 0.3 * 7 s for s a power of two
    scale = 2.0 ** torch.randint(-20, 4, (32, 512), dtype=torch.float64)
    pre[1::16], ft[1::16] = -3 * scale, 7 * scale
    pre[2::16], ft[2::16] = 7 * scale, -3 * scale
    pre, ft = pre.to(dtype), ft.to(dtype)
    for name, tensor in (("pre", pre), ("ft", ft)):
        (tmp_path / name).mkdir()
        save_file({"w": tensor}, tmp_path / name / "model.safetensors")
    for alpha in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0):
        with pytest.warns(UserWarning, match="config.json"):  # bare tensors, no model around them
            out = wise_ft(tmp_path / "pre", tmp_path / "ft", alpha, tmp_path / f"out-{alpha}")
        merged = load_file(out / "model.safetensors")["w"]
        assert merged.dtype == dtype
        reference = ((1 - alpha) * pre.double() + alpha * ft.double()).to(dtype)
        assert (_ordered(merged) - _ordered(reference)).abs().max().item() <= 1, alpha
        if alpha in (0.0, 1.0):
            assert torch.equal(merged.view(torch.uint8), (pre if alpha == 0 else ft).contiguous().view(torch.uint8))
