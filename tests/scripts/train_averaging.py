"""Trains tiny OPT with a `WeightAveraging` callback and saves the averaged model: `train_averaging.py OUT --kind ema`.
Run by tests/test_averaging.py in one process and under DeepSpeed ZeRO-3 (2 processes, the recipes' Accelerate config).

Every training row is the same, so that how the batch is sharded across processes cannot change the result.
Writes OUT/model (`save_model`), OUT/weights.pt (the consolidated state dict, from rank 0) and OUT/result.json (the
loss of the averaged model on the training rows, evaluated after training).
"""

import argparse
import json
import os
import sys


sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import torch  # noqa: E402
from conftest import lm_dataset, make_args, tiny_opt  # noqa: E402
from finish import finish  # noqa: E402  (this folder is the script's sys.path[0])

from hf_specgen import SpecGenTrainer  # noqa: E402
from hf_specgen.averaging import WeightAveraging  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--kind", default="ema")
    parser.add_argument("--ema-decay", type=float, default=0.7)
    parser.add_argument("--sma-start", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--save-steps", type=int, default=0, help="checkpoint every that many steps (0: none)")
    options = parser.parse_args()

    row = lm_dataset(1)
    data = datasets.Dataset.from_dict({k: list(row[k]) * 16 for k in row.column_names})
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    saving = dict(save_strategy="steps", save_steps=options.save_steps) if options.save_steps else {}
    args = make_args(
        options.output_dir,
        max_steps=options.steps,
        per_device_train_batch_size=4 // world_size,
        optim="sgd",
        learning_rate=0.1,
        **saving,
    )
    averaging = WeightAveraging(options.kind, ema_decay=options.ema_decay, sma_start=options.sma_start)
    trainer = SpecGenTrainer(model=tiny_opt(), args=args, train_dataset=data, callbacks=[averaging])
    trainer.train()
    eval_loss = trainer.evaluate(data)["eval_loss"]  # a forward of the averaged model (the weights kept whole too)
    trainer.save_model(os.path.join(options.output_dir, "model"))  # collective: consolidated under ZeRO-3
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # collective: gathers ZeRO-3 partitions
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(
            {n: t.detach().float().cpu() for n, t in state.items()}, os.path.join(options.output_dir, "weights.pt")
        )
        zero3 = any(hasattr(p, "ds_tensor") for p in trainer.model.parameters())
        result = {"world_size": world_size, "eval_loss": eval_loss, "zero3": zero3}
        with open(os.path.join(options.output_dir, "result.json"), "w") as f:
            json.dump(result, f)
    finish(trainer)


if __name__ == "__main__":
    main()
