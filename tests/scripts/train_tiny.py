"""Trains tiny OPT with every regularizer on (or those named: `train_tiny.py OUT kd,feature`); run
by tests in one process, under torchrun or under DeepSpeed.

Every training row is the same, so that how the batch is sharded across processes cannot change
the result: 1 process x batch 4 and 2 processes x batch 2 must end with the same weights.
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import torch  # noqa: E402

from conftest import lm_dataset, make_args, perturb_, tiny_opt  # noqa: E402
from hf_specgen import SpecGenTrainer  # noqa: E402
from hf_specgen.anchor import local_numel  # noqa: E402

REGULARIZERS = dict(l1_lambda=0.01, l2_lambda=0.5, ewc_lambda=2.0, ewc_num_samples=4, kd_lambda=0.7, feature_lambda=0.3)


def regularizers(names: list[str]) -> dict:
    """The settings of the named regularizers (`kd`, `ewc`, ...); all of them when none is named."""
    return {k: v for k, v in REGULARIZERS.items() if not names or k.split("_")[0] in names}


def teacher_numel(trainer: SpecGenTrainer) -> dict | None:
    """The teacher's elements on this process and in all (partitioned under ZeRO-3)."""
    if trainer.teacher is None:
        return None
    params = list(trainer.teacher.module.parameters())
    return {"local": sum(local_numel(p) for p in params), "total": sum(getattr(p, "ds_numel", p.numel()) for p in params)}


def main(output_dir: str, names: list[str]) -> None:
    row = lm_dataset(1)
    data = datasets.Dataset.from_dict({k: list(row[k]) * 16 for k in row.column_names})
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    model = tiny_opt()
    args = make_args(output_dir, max_steps=3, per_device_train_batch_size=4 // world_size, optim="sgd",
                     learning_rate=0.1, **regularizers(names))  # fmt: skip
    trainer = SpecGenTrainer(model=model, args=args, train_dataset=data)
    perturb_(model)
    trainer.train()
    trainer.save_model(os.path.join(output_dir, "model"))  # collective: consolidated under ZeRO-3
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # collective: gathers ZeRO-3 partitions
    if trainer.args.process_index == 0:
        torch.save({n: t.detach().float().cpu() for n, t in state.items()}, os.path.join(output_dir, "weights.pt"))
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        with open(os.path.join(output_dir, "result.json"), "w") as f:
            json.dump({"world_size": trainer.args.world_size, "logs": logs, "teacher": teacher_numel(trainer)}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(",") if len(sys.argv) > 2 else [])
