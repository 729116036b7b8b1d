"""With every weight at 0, SpecGenTrainer is transformers.Trainer, bit for bit."""

import torch
from conftest import lm_dataset, make_args, tiny_opt
from transformers import Trainer, TrainingArguments

from hf_specgen import SpecGenTrainer


def test_zero_weights_train_bit_for_bit_like_trainer(tmp_path):
    data = lm_dataset(24)
    common = dict(max_steps=5, gradient_accumulation_steps=2, per_device_train_batch_size=2, max_grad_norm=1.0)
    plain_args = TrainingArguments(
        output_dir=str(tmp_path / "plain"),
        use_cpu=True,
        report_to=[],
        learning_rate=1e-2,
        seed=0,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        **common,
    )
    # dropout on: the two runs must also consume the random generator identically
    plain = Trainer(model=tiny_opt(dropout=0.1), args=plain_args, train_dataset=data)
    plain.train()
    spec = SpecGenTrainer(model=tiny_opt(dropout=0.1), args=make_args(tmp_path / "spec", **common), train_dataset=data)
    before = {n: p.detach().clone() for n, p in spec.model.named_parameters()}
    spec.train()
    for (name, p), (_, q) in zip(plain.model.named_parameters(), spec.model.named_parameters()):
        assert torch.equal(p, q), name
    assert any(not torch.equal(before[n], p) for n, p in spec.model.named_parameters())  # it did train
    losses = [(a["loss"], b["loss"]) for a, b in zip(plain.state.log_history, spec.state.log_history) if "loss" in a]
    assert len(losses) == 5 and all(a == b for a, b in losses)
    assert not any("loss_task" in entry for entry in spec.state.log_history)
