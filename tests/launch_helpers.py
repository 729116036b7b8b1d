"""Launching scripts in several processes as users do (`accelerate launch`, `torchrun`), on CPU."""

import os
import socket
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def free_port() -> int:
    """A TCP port of 127.0.0.1 that no one listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(processes: int, config: str | None = None) -> list[str]:
    """The command that starts a script (appended) under `accelerate launch`: on CPU, or with one of the
    recipes' Accelerate configs (`config`, e.g. "zero3": `recipes/accelerate/<config>.yaml`)."""
    machine = (
        ["--config_file", str(ROOT / "recipes" / "accelerate" / f"{config}.yaml")]
        if config
        else ["--cpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    )
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *machine,
        "--num_processes",
        str(processes),
        "--main_process_port",
        "0",
    ]


def torchrun(processes: int) -> list[str]:
    """The command that starts a script (appended) in `processes` processes under `torchrun`, on a free port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_port",
        str(free_port()),
    ]
