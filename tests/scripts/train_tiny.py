"""Trains tiny OPT with every regularizer on (or those named: `train_tiny.py OUT kd,feature`); run
by tests in one process, under torchrun or under DeepSpeed (the recipes' Accelerate configs, or
`--deepspeed CONFIG.json` for `TrainingArguments(deepspeed=...)`). `l2d` is L2-SP in decoupled mode.

Every training row is the same, so that how the batch is sharded across processes cannot change
the result: 1 process x batch 4 and 2 processes x batch 2 must end with the same weights.
"""

import argparse
import contextlib
import json
import os
import sys


sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import torch  # noqa: E402
from conftest import lm_dataset, make_args, perturb_, tiny_opt  # noqa: E402
from finish import finish  # noqa: E402  (this folder is the script's sys.path[0])
from transformers import OPTForCausalLM  # noqa: E402
from transformers.trainer_pt_utils import nested_gather  # noqa: E402

from hf_specgen import SpecGenTrainer  # noqa: E402
from hf_specgen.zero import local_numel  # noqa: E402


REGULARIZERS = dict(
    l1_lambda=0.01,
    l2_lambda=0.5,
    ewc_lambda=2.0,
    ewc_num_samples=4,
    mas_lambda=0.05,
    mas_num_samples=4,
    kd_lambda=0.7,
    feature_lambda=0.3,
)


def regularizers(names: list[str]) -> dict:
    """The settings of the named regularizers (`kd`, `ewc`, `l2d`, ...); all of them when none is named."""
    if "l2d" in names:
        names = [*names, "l2"]
    chosen = {k: v for k, v in REGULARIZERS.items() if not names or k.split("_")[0] in names}
    return {**chosen, "l2_mode": "decoupled"} if "l2d" in names else chosen


def teacher_numel(trainer: SpecGenTrainer) -> dict | None:
    """The teacher's elements on this process and in all (partitioned under ZeRO-3)."""
    if trainer.teacher is None:
        return None
    params = list(trainer.teacher.module.parameters())
    return {
        "local": sum(local_numel(p) for p in params),
        "total": sum(getattr(p, "ds_numel", p.numel()) for p in params),
    }


def gathered(model: torch.nn.Module):
    """The whole weights of a model loaded partitioned, for an edit that rank 0 then scatters."""
    if not any(hasattr(p, "ds_tensor") for p in model.parameters()):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("names", nargs="?", default="")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--accumulation", type=int, default=1, help="micro-batches per step (the global batch stays 4)"
    )
    parser.add_argument("--optim", default="sgd", help="adamw_torch for ZeRO-3 offload, which steps with its CPU Adam")
    parser.add_argument("--save-steps", type=int, default=0, help="checkpoint every that many steps (0: none)")
    parser.add_argument("--resume", default=None, help="a checkpoint to resume from")
    parser.add_argument("--deepspeed", default=None, help="a DeepSpeed JSON for TrainingArguments(deepspeed=...)")
    parser.add_argument(
        "--no-use-cpu",
        action="store_true",
        help="leave use_cpu unset, as a user on a GPU does (accelerate then counts 1 process on CPU)",
    )
    parser.add_argument(
        "--zero-init", action="store_true", help="load the model after the arguments: ZeRO-3 partitions it as it loads"
    )
    options = parser.parse_args()
    output_dir, names = options.output_dir, [n for n in options.names.split(",") if n]

    row = lm_dataset(1)
    data = datasets.Dataset.from_dict({k: list(row[k]) * 16 for k in row.column_names})
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    model = tiny_opt()
    if options.zero_init:  # as users load: from_pretrained once the arguments have set ZeRO-3 up
        pretrained = os.path.join(output_dir, f"pretrained-{os.environ.get('RANK', '0')}")
        model.save_pretrained(pretrained)
    saving = dict(save_strategy="steps", save_steps=options.save_steps) if options.save_steps else {}
    args = make_args(
        output_dir,
        max_steps=options.steps,
        per_device_train_batch_size=4 // world_size // options.accumulation,
        gradient_accumulation_steps=options.accumulation,
        optim=options.optim,
        learning_rate=0.1,
        deepspeed=options.deepspeed,
        use_cpu=not options.no_use_cpu,
        **saving,
        **regularizers(names),
    )
    if options.zero_init:
        assert args.world_size == world_size  # sets the process group up, which zero.Init's batch check needs
        model = OPTForCausalLM.from_pretrained(pretrained)
    trainer = SpecGenTrainer(model=model, args=args, train_dataset=data)
    anchor_at_start = trainer.anchor_memory()["weights"]  # on this rank, before training partitions anything
    estimates = []
    estimate = trainer.specgen.estimate_importance
    trainer.specgen.estimate_importance = lambda reg: estimates.append(1) or estimate(reg)
    with gathered(model):
        perturb_(model)
    trainer.train(resume_from_checkpoint=options.resume)
    memory = torch.tensor(list(trainer.anchor_memory().values()), device=trainer.args.device)
    per_rank = nested_gather(memory, trainer.args.parallel_mode).reshape(-1, len(memory)).tolist()  # collective
    trainer.save_model(os.path.join(output_dir, "model"))  # collective: consolidated under ZeRO-3
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # collective: gathers ZeRO-3 partitions
    # by the launcher's count: without use_cpu, accelerate (and so the Trainer's process_index and world_size) count 1
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save({n: t.detach().float().cpu() for n, t in state.items()}, os.path.join(output_dir, "weights.pt"))
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        result = {
            "world_size": world_size,
            "accelerate_processes": trainer.accelerator.num_processes,
            "use_cpu": trainer.args.use_cpu,
            "max_grad_norm": trainer.args.max_grad_norm,
            "logs": logs,
            "teacher": teacher_numel(trainer),
            "anchor_memory": [dict(zip(trainer.anchor_memory(), values)) for values in per_rank],
            "anchor_at_start": anchor_at_start,
            "fisher_estimated": bool(estimates),
        }
        with open(os.path.join(output_dir, "result.json"), "w") as f:
            json.dump(result, f)
    finish(trainer)


if __name__ == "__main__":
    main()
