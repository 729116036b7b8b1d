"""LoRA (peft): the distance terms act on the effective delta `scale * B @ A`, never on A and B
separately, keep no full-size anchor, and the teacher is the model with its adapters disabled."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ADAPTER, kd_by_hand, lm_batch, lm_dataset, lora_layers, perturb_, step_and_grads, tiny_opt
from peft import LoraConfig, get_peft_model
from torch.overrides import TorchFunctionMode
from transformers import GPT2Config, GPT2LMHeadModel

from hf_specgen import SpecGenTrainer
from hf_specgen.anchor import weight_deltas
from hf_specgen.deltas import LoraDelta
from hf_specgen.regularizers import EWC


def lora_opt(**config):
    """Tiny OPT with LoRA on q_proj / v_proj; LoRA weights moved off their init (B is zero there)."""
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **config}
    model = get_peft_model(tiny_opt(), LoraConfig(**config))
    perturb_(model, scale=0.3)  # only the adapter (and modules_to_save, biases) weights are trainable
    return model


def materialized_deltas(model):
    return {name: m.get_delta_weight(ADAPTER).float() for name, m in lora_layers(model).items()}


def assert_near(actual, expected, rel=1e-5):
    """Equal up to float32 rounding, relative to the tensor's norm (elementwise rtol fails near zero)."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape
    assert (actual - expected).norm() <= rel * expected.norm(), (actual - expected).norm() / expected.norm()


def peft_to_base_name(name):
    """'base_model.model.x.q_proj.base_layer.weight' -> 'x.q_proj.weight' (and 'x.fc1.modules_to_save.default.weight'
    -> 'x.fc1.weight'): the name in the model peft wraps."""
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")


# ---- 1, 2: the effective delta and its squared norm, for each kind of LoRA layer -------------------


def _gpt2():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=1, eos_token_id=1)
    return GPT2LMHeadModel(config)


# name -> (model builder, LoraConfig kwargs, {module-name suffix: (r, closed-form scale)}, transposed)
CASES = {
    "opt_linear": (
        tiny_opt,
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        {"q_proj": (4, 8 / 4), "v_proj": (4, 8 / 4)},
        False,
    ),
    "gpt2_conv1d_fan_in_fan_out": (
        _gpt2,
        dict(r=2, lora_alpha=6, target_modules=["c_attn"], fan_in_fan_out=True),
        {"c_attn": (2, 6 / 2)},
        True,
    ),
    "opt_embedding": (
        tiny_opt,
        dict(r=4, lora_alpha=16, target_modules=["embed_tokens"]),
        {"embed_tokens": (4, 16 / 4)},
        True,
    ),
    "rslora": (
        tiny_opt,
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True),
        {"q_proj": (4, 8 / math.sqrt(4)), "v_proj": (4, 8 / math.sqrt(4))},
        False,
    ),
    "rank_pattern": (
        tiny_opt,
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            rank_pattern={"q_proj": 2},
            alpha_pattern={"v_proj": 2},
        ),
        {"q_proj": (2, 8 / 2), "v_proj": (4, 2 / 4)},
        False,
    ),
}


def build_case(case):
    builder, config, expected, transposed = CASES[case]
    model = get_peft_model(builder(), LoraConfig(**config))
    perturb_(model, scale=0.3)
    return model, expected, transposed


class LargestResult(TorchFunctionMode):
    """Records the largest tensor any torch function returns inside the block."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if torch.is_tensor(out):
            self.numel = max(self.numel, out.numel())
        return out


@pytest.mark.parametrize("case", list(CASES))
def test_lora_delta_matches_get_delta_weight_and_closed_form(case):
    model, expected, transposed = build_case(case)
    layers = lora_layers(model)
    deltas = weight_deltas(model)
    # one LoraDelta per adapted layer and nothing else: A and B are never anchored separately
    assert all(isinstance(d, LoraDelta) for d in deltas)
    assert sorted(d.name for d in deltas) == sorted(f"{n}.base_layer.weight" for n in layers)
    assert len(layers) == len(expected) * (2 if case != "opt_embedding" else 1)
    for d in deltas:
        layer = d.layer
        suffix = d.name.split(".")[-3]
        r, scale = expected[suffix]
        assert d.A.shape[0] == r and d.B.shape[1] == r
        assert d.scale == pytest.approx(scale)

        materialized = layer.get_delta_weight(ADAPTER).float()
        base = layer.get_base_layer().weight
        assert materialized.shape == base.shape
        assert materialized.abs().sum() > 0  # B was moved off its zero init
        # closed form, independent of peft: scale * B @ A, in the base weight's layout
        by_hand = scale * (d.B.detach().double() @ d.A.detach().double())
        by_hand = by_hand.T if transposed else by_hand
        torch.testing.assert_close(materialized.double(), by_hand, rtol=1e-6, atol=1e-7)

        torch.testing.assert_close(d.delta(), materialized, rtol=1e-6, atol=1e-7)
        with LargestResult() as largest, torch.no_grad():
            squared = d.squared_norm()
        torch.testing.assert_close(squared, materialized.pow(2).sum(), rtol=1e-5, atol=0)
        # the trace identity works on r x r Gram matrices: no out x in tensor is ever made
        assert largest.numel < base.numel()


@pytest.mark.parametrize("case", list(CASES))
def test_trace_identity_gradient_matches_materialized(case):
    model, _, _ = build_case(case)
    for d in weight_deltas(model):
        grad_a, grad_b = torch.autograd.grad(d.squared_norm(), [d.A, d.B])
        ref_a, ref_b = torch.autograd.grad(d.layer.get_delta_weight(ADAPTER).float().pow(2).sum(), [d.A, d.B])
        assert ref_a.abs().sum() > 0 and ref_b.abs().sum() > 0
        assert_near(grad_a, ref_a)
        assert_near(grad_b, ref_b)
        # and the closed form 2 s^2 (B A A^T, B^T B A)
        a, b, s = d.A.detach().double(), d.B.detach().double(), d.scale
        assert_near(grad_b, 2 * s * s * b @ a @ a.T)
        assert_near(grad_a, 2 * s * s * b.T @ b @ a)


# ---- 3: L2 in the trainer, and no anchor memory -------------------------------------------------------


def test_trainer_l2_on_lora_is_the_effective_delta_norm(args_factory):
    lam = 0.3
    model = lora_opt()  # LoRA weights already moved: a snapshot taken now would see no distance
    trainer = SpecGenTrainer(model=model, args=args_factory(l2_lambda=lam))
    assert len(trainer.deltas) == 4 and all(isinstance(d, LoraDelta) for d in trainer.deltas)
    batch = lm_batch()
    loss, grads = step_and_grads(trainer, batch)
    model.train()
    task = model(**batch).loss
    expected = lam * sum(d.pow(2).sum() for d in materialized_deltas(model).values())
    assert expected > 1e-3
    torch.testing.assert_close(loss - task.detach(), expected, rtol=1e-5, atol=1e-7)

    # the gradient the term adds to A and B is that of the materialized norm
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names = {id(p): n for n, p in trainable.items()}
    task_grads = dict(zip(trainable, torch.autograd.grad(task, list(trainable.values()))))
    for name, layer in lora_layers(model).items():
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        ref_a, ref_b = torch.autograd.grad(lam * layer.get_delta_weight(ADAPTER).pow(2).sum(), [a, b])
        assert_near(grads[names[id(a)]] - task_grads[names[id(a)]], ref_a)
        assert_near(grads[names[id(b)]] - task_grads[names[id(b)]], ref_b)
    assert trainer.anchor_memory() == {"weights": 0, "teacher": 0, "fisher": 0}


def test_lora_with_l2_kd_and_feature_keeps_no_copy(args_factory):
    model = lora_opt()
    trainer = SpecGenTrainer(model=model, args=args_factory(l2_lambda=1.0, kd_lambda=1.0, feature_lambda=1.0))
    assert trainer.teacher.adapters_disabled and trainer.teacher.module is model
    assert trainer.anchor_memory() == {"weights": 0, "teacher": 0, "fisher": 0}
    model.train()
    loss = trainer.compute_loss(model, lm_batch())
    assert torch.isfinite(loss) and model.training


# ---- 4: the teacher is the model with adapters disabled ----------------------------------------------


@pytest.mark.parametrize("term", ["kd", "feature"])
def test_teacher_is_model_with_adapters_disabled(args_factory, term):
    lam, temperature, seed = 0.8, 2.0, 7
    base = tiny_opt(dropout=0.2)
    pretrained = copy.deepcopy(base).eval()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.2))
    perturb_(model, scale=0.3)
    if term == "kd":
        kwargs = dict(kd_lambda=lam, kd_temperature=temperature)
    else:
        kwargs = dict(feature_lambda=lam, feature_layers=[1, -1])
    trainer = SpecGenTrainer(model=model, args=args_factory(**kwargs))
    model.train()
    batch = lm_batch()

    torch.manual_seed(seed)
    loss = trainer.compute_loss(model, dict(batch))
    # training mode and every dropout are back on after the teacher's (eval mode) pass
    assert model.training
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.training for m in dropouts)

    torch.manual_seed(seed)  # the same dropout masks: the teacher pass (eval mode) draws no random numbers
    student = model(**batch, output_hidden_states=True)
    with torch.no_grad():
        teacher = pretrained(**batch, output_hidden_states=True)
        model.eval()
        with model.disable_adapter():
            disabled = model(**batch, output_hidden_states=True)
        model.train()
    torch.testing.assert_close(disabled.logits, teacher.logits)
    if term == "kd":
        shifted = batch["labels"][:, 1:] != -100  # causal LM: the logits before each supervised token
        expected = lam * kd_by_hand(student.logits[:, :-1], teacher.logits[:, :-1], shifted, temperature)
    else:
        # per layer: squared L2 over features, mean over the (all real) tokens; then mean over layers
        s, t = student.hidden_states, teacher.hidden_states
        expected = lam * sum((s[i] - t[i]).double().pow(2).sum(-1).mean() for i in (1, -1)) / 2
    assert expected > 1e-4
    torch.testing.assert_close((loss - student.loss).double().detach(), expected, rtol=1e-4, atol=1e-7)


# ---- 5: refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, args, match",
    [
        (dict(modules_to_save=["fc1"]), dict(kd_lambda=1.0), "modules_to_save"),
        (dict(modules_to_save=["fc1"]), dict(feature_lambda=1.0), "modules_to_save"),
        (dict(bias="all"), dict(kd_lambda=1.0), "bias"),
        (dict(use_dora=True), dict(l2_lambda=1.0), "DoRA"),
    ],
)
def test_refusals(args_factory, config, args, match):
    model = lora_opt(**config)
    with pytest.raises(ValueError, match=match) as info:
        SpecGenTrainer(model=model, args=args_factory(**args))
    assert "pre-trained" in str(info.value) or "scale * B @ A" in str(info.value)


def test_what_is_not_refused(args_factory):
    # the same configurations with the terms they are compatible with
    SpecGenTrainer(model=lora_opt(modules_to_save=["fc1"]), args=args_factory(l2_lambda=1.0))
    SpecGenTrainer(model=lora_opt(bias="all"), args=args_factory(l2_lambda=1.0))
    SpecGenTrainer(model=lora_opt(use_dora=True), args=args_factory(kd_lambda=1.0))


def test_refused_configuration_works_with_ref_model(args_factory):
    """What the refusal advises: with bias="all", the pre-trained model passed as ref_model is the
    teacher, and the anchor of the trained biases (found under their peft-free names)."""
    lam_l2, lam_kd = 0.2, 0.6
    base = tiny_opt()
    pretrained = copy.deepcopy(base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="all"))
    perturb_(model, scale=0.3)  # moves the LoRA weights and every bias
    trainer = SpecGenTrainer(model=model, args=args_factory(l2_lambda=lam_l2, kd_lambda=lam_kd), ref_model=pretrained)
    assert trainer.teacher.module is pretrained and not trainer.teacher.adapters_disabled
    assert trainer.anchor_memory()["weights"] == 0  # the biases' references are ref_model's own tensors
    ref_params = dict(pretrained.named_parameters())
    biases = {n: p for n, p in model.named_parameters() if p.requires_grad and n.endswith(".bias")}
    assert len(biases) > 10
    l2 = sum((p.double() - ref_params[peft_to_base_name(n)].double()).pow(2).sum() for n, p in biases.items())
    l2 = lam_l2 * (l2 + sum(d.double().pow(2).sum() for d in materialized_deltas(model).values()))

    model.train()
    batch = lm_batch()
    student = model(**batch)
    loss, _ = step_and_grads(trainer, batch)
    with torch.no_grad():
        teacher = pretrained(**batch)
    shifted = batch["labels"][:, 1:] != -100
    kd = lam_kd * kd_by_hand(student.logits[:, :-1].detach(), teacher.logits[:, :-1], shifted)
    assert l2 > 1e-3 and kd > 1e-4
    torch.testing.assert_close((loss - student.loss).detach().double(), l2 + kd, rtol=1e-4, atol=1e-8)


# ---- 6: modules_to_save: the reference is peft's original_module ------------------------------------


def test_modules_to_save_reference_is_original_module(args_factory):
    lam = 0.4
    model = lora_opt(modules_to_save=["fc1"])  # the fc1 copies are perturbed too, the originals are frozen
    trainer = SpecGenTrainer(model=model, args=args_factory(l2_lambda=lam))
    assert trainer.anchor_memory()["weights"] == 0
    params = dict(model.named_parameters())
    saved = [n for n in params if ".modules_to_save." in n]
    assert len(saved) == 4  # weight and bias of fc1, two layers
    dense = {d.name: d for d in trainer.deltas if not isinstance(d, LoraDelta)}
    assert sorted(dense) == sorted(saved)
    expected = 0.0
    for name in saved:
        original = params[name.replace(".modules_to_save.default.", ".original_module.")]
        assert not original.requires_grad
        assert dense[name].reference.data_ptr() == original.data_ptr()  # the original itself, not a copy
        diff = (params[name].double() - original.double()).pow(2).sum()
        assert diff > 1e-3
        expected = expected + diff
    expected = lam * (expected + sum(d.double().pow(2).sum() for d in materialized_deltas(model).values()))

    model.train()
    batch = lm_batch()
    task = model(**batch).loss.detach()
    loss, _ = step_and_grads(trainer, batch)
    torch.testing.assert_close((loss - task).double(), expected, rtol=1e-5, atol=1e-7)


# ---- 7: EWC: a Fisher for the base weight, applied to the effective delta ------------------------------


@pytest.mark.parametrize("modules_to_save", [None, ["fc1"]])
def test_ewc_fisher_on_base_weights(args_factory, modules_to_save):
    lam, n = 50.0, 8
    base = tiny_opt()
    pretrained = copy.deepcopy(base).eval()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=modules_to_save)
    model = get_peft_model(base, config)
    perturb_(model, scale=0.3)  # the Fisher must still be the pre-trained model's
    dataset = lm_dataset(n)
    args = args_factory(ewc_lambda=lam, ewc_num_samples=n, ewc_fisher="empirical")
    trainer = SpecGenTrainer(model=model, args=args, train_dataset=dataset)
    trainer.specgen.begin_training(None)
    fisher = next(r for r in trainer.regularizers if isinstance(r, EWC)).fisher
    layers = lora_layers(model)
    params = dict(model.named_parameters())
    saved = [name for name in params if ".modules_to_save." in name]
    assert len(saved) == (4 if modules_to_save else 0)
    assert sorted(fisher) == sorted([f"{name}.base_layer.weight" for name in layers] + saved)
    for key, f in fisher.items():
        assert f.shape == params[key].shape and f.dtype == torch.float32
        assert (f >= 0).all() and f.sum() > 0, key  # also the modules_to_save copies
    fisher_bytes = sum(f.numel() * 4 for f in fisher.values())
    assert trainer.anchor_memory() == {"weights": 0, "teacher": 0, "fisher": fisher_bytes}

    # independently: the empirical Fisher of the pre-trained model over all n examples (order-free),
    # per-example squared gradients divided by the supervised-token count
    targets = {k: dict(pretrained.named_parameters())[peft_to_base_name(k)] for k in fisher}
    by_hand = {k: torch.zeros_like(p) for k, p in targets.items()}
    for i in range(n):
        row = {k: torch.tensor([dataset[i][k]]) for k in dataset.column_names}
        logits = pretrained(input_ids=row["input_ids"], attention_mask=row["attention_mask"]).logits[:, :-1]
        labels = row["labels"][:, 1:]
        mask = labels != -100
        score = F.log_softmax(logits[mask], -1).gather(-1, labels[mask].unsqueeze(-1)).sum()
        grads = torch.autograd.grad(score, list(targets.values()))
        for k, g in zip(targets, grads):
            by_hand[k] += g.pow(2) / mask.sum()
    for k in fisher:
        torch.testing.assert_close(fisher[k], by_hand[k] / n, rtol=1e-4, atol=1e-9)

    model.train()
    batch = lm_batch()
    task = model(**batch).loss.detach()
    loss, _ = step_and_grads(trainer, batch)
    deltas = {f"{name}.base_layer.weight": d for name, d in materialized_deltas(model).items()}
    for name in saved:  # theta - theta_pre of a modules_to_save copy: against peft's original module
        deltas[name] = (params[name] - params[name.replace(".modules_to_save.default.", ".original_module.")]).detach()
    assert sorted(deltas) == sorted(fisher)
    expected = lam * sum((fisher[k].double() * deltas[k].double().pow(2)).sum() for k in fisher)
    assert expected > 1e-6
    torch.testing.assert_close((loss.detach() - task).double(), expected, rtol=1e-4, atol=1e-8)


# ---- 8: decoupled L2 scales each effective delta by (1 - lr * lambda) ---------------------------------


def test_decoupled_l2_scales_effective_delta(args_factory):
    lr, lam = 0.1, 0.5
    model = lora_opt(modules_to_save=["fc1"])
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer = SpecGenTrainer(model=model, args=args_factory(l2_lambda=lam, l2_mode="decoupled", learning_rate=lr))
    optimizer = trainer.create_optimizer()
    before = materialized_deltas(model)
    dense_before = {d.name: d.delta().clone() for d in trainer.deltas if not isinstance(d, LoraDelta)}
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    after = materialized_deltas(model)
    factor = 1 - lr * lam
    for name in before:
        assert before[name].abs().sum() > 0
        assert_near(after[name], factor * before[name], rel=1e-6)
    for d in trainer.deltas:
        if not isinstance(d, LoraDelta):
            assert_near(d.delta(), factor * dense_before[d.name], rel=1e-6)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), n


# ---- several active adapters, frozen factors --------------------------------------------------------


def two_adapter_opt():
    """Tiny OPT with two LoRA adapters active together on q_proj / v_proj, both moved off their init."""
    model = get_peft_model(tiny_opt(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"]))
    model.base_model.set_adapter([ADAPTER, "second"])
    perturb_(model, scale=0.3)
    return model


def test_several_active_adapters_are_penalized_as_their_sum(args_factory):
    """The weight's change is the sum of the adapters' deltas: L2 is the squared norm of that sum (not the
    sum of each adapter's squared norm), its gradient reaches both adapters, and EWC has one Fisher per weight."""
    lam = 0.4
    model = two_adapter_opt()
    layers = lora_layers(model)
    assert all(set(layer.active_adapters) == {ADAPTER, "second"} for layer in layers.values())
    trainer = SpecGenTrainer(
        model=model, args=args_factory(l2_lambda=lam, ewc_lambda=1.0, ewc_num_samples=2), train_dataset=lm_dataset(4)
    )
    assert len(trainer.deltas) == len(layers) == 4  # one per weight, not one per adapter
    trainer.specgen.begin_training(None)
    fisher = next(r for r in trainer.regularizers if isinstance(r, EWC)).fisher
    assert sorted(fisher) == sorted(f"{n}.base_layer.weight" for n in layers)

    summed = {n: m.get_delta_weight(ADAPTER).float() + m.get_delta_weight("second").float() for n, m in layers.items()}
    for d in trainer.deltas:
        assert_near(d.delta(), summed[d.name.removesuffix(".base_layer.weight")])
    l2 = trainer.specgen.weight_terms[0]
    model.zero_grad()
    value = l2.apply_(trainer.deltas, grad_scale=1.0)
    expected = lam * sum(s.double().pow(2).sum() for s in summed.values())
    separate = lam * sum(
        m.get_delta_weight(a).double().pow(2).sum() for m in layers.values() for a in (ADAPTER, "second")
    )
    assert abs(expected - separate) > 1e-3 * expected  # the two readings differ here
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=0)
    factors = [p for n, p in model.named_parameters() if "lora_" in n]
    closed_form = [p.grad.clone() for p in factors]
    model.zero_grad()
    by_autograd = torch.autograd.grad(
        lam
        * sum(
            (m.get_delta_weight(ADAPTER).float() + m.get_delta_weight("second").float()).pow(2).sum()
            for m in layers.values()
        ),
        factors,
    )
    for got, want in zip(closed_form, by_autograd):
        assert want.abs().sum() > 0
        assert_near(got, want)


def test_frozen_lora_factor_gets_no_penalty_gradient(args_factory):
    """LoRA-FA: lora_A frozen. The penalties act on the delta, and their gradient goes to B only."""
    lam = 0.3
    model = lora_opt()
    frozen = [p for n, p in model.named_parameters() if "lora_A" in n]
    for p in frozen:
        p.requires_grad_(False)
    trainer = SpecGenTrainer(model=model, args=args_factory(l1_lambda=0.01, l2_lambda=lam, l2_mode="penalty"))
    assert len(trainer.deltas) == 4 and all(d.trainable == [d.B] for d in trainer.deltas)
    model.zero_grad()
    for reg in trainer.specgen.weight_terms:
        reg.apply_(trainer.deltas, grad_scale=1.0)
    assert all(p.grad is None for p in frozen)
    model.zero_grad()
    trainer.specgen.weight_terms[1].apply_(trainer.deltas, grad_scale=1.0)
    for d in trainer.deltas:
        a, b, s = d.A.detach().double(), d.B.detach().double(), d.scale
        assert_near(d.B.grad, lam * 2 * s * s * b @ a @ a.T)
    # decoupled L2 decays the delta through the trainable factor
    decoupled = SpecGenTrainer(model=model, args=args_factory(l2_lambda=0.5, l2_mode="decoupled"))
    before = materialized_deltas(model)
    a_before = [p.detach().clone() for p in frozen]
    decoupled.specgen.step_terms[0].before_step_(0.2, decoupled.deltas)
    after = materialized_deltas(model)
    for name in before:
        assert_near(after[name], (1 - 0.2 * 0.5) * before[name], rel=1e-6)
    assert all(torch.equal(p, q) for p, q in zip(frozen, a_before))
