"""Moving averages of the weights during fine-tuning: the weight-averaging baselines against
catastrophic forgetting, as a `transformers.TrainerCallback` that any Trainer takes.

- `ema`: an exponential moving average started at the weights the training starts from,
  `avg_t = decay * avg_{t-1} + (1 - decay) * theta_t` after each optimizer step t.
- `sma`: the uniform mean of the weights after the steps `t >= s0` (stochastic weight averaging with
  a constant schedule), `s0 = max(1, ceil(sma_start * max_steps))`, or the last `sma_window` steps.

Only the trainable parameters are averaged (under LoRA the adapter: frozen weights never change),
in float32. At the end of training the averages are written into the model's parameters, so the
Trainer's `save_model` afterwards saves the averaged model; `swapped` does so for a while.

Under DeepSpeed ZeRO-3 each rank averages its own partition of each weight (`ds_tensor`), nothing is
gathered; under ZeRO-1/2 and DDP the weights are whole on every rank and averaged whole. The state
goes into each checkpoint, one file per rank, and a resumed run continues it bitwise.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback


KINDS = ("ema", "sma")
STATE_PREFIX = "specgen_weight_average"


def state_file(checkpoint: str, rank: int | None = None) -> str:
    """The file of the averaging state of process `rank` (default: this one) in a checkpoint directory.

    Args:
        checkpoint: a checkpoint directory (`<output_dir>/checkpoint-<step>`).
        rank: the process; None for this process's rank (0 without torch.distributed).

    Returns:
        `<checkpoint>/specgen_weight_average-rank<rank>.pt`.
    """
    return os.path.join(checkpoint, f"{STATE_PREFIX}-rank{_rank() if rank is None else rank}.pt")


class WeightAveraging(TrainerCallback):
    """A moving average of the trainable weights, written into the model when training ends.

    Args:
        kind: "ema" (exponential moving average) or "sma" (uniform mean of the last steps).
        ema_decay: EMA's decay in [0, 1): 0 keeps the last weights.
        sma_start: SMA averages from step `max(1, ceil(sma_start * max_steps))`; in [0, 1).
        sma_window: SMA over the last `sma_window` (>= 1) steps instead of from `sma_start`.
        device: where the float32 averages are kept; None: each parameter's (partition's) own device.

    Raises:
        ValueError: an unknown kind, or an option out of its range (named in the message).
    """

    def __init__(
        self,
        kind: str,
        *,
        ema_decay: float = 0.99,
        sma_start: float = 0.5,
        sma_window: int | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
        _check_fraction("ema_decay", ema_decay)
        _check_fraction("sma_start", sma_start)
        if sma_window is not None:
            if isinstance(sma_window, bool) or not isinstance(sma_window, int) or sma_window < 1:
                raise ValueError(f"sma_window must be an int >= 1 (or None), got {sma_window!r}")
            if kind != "sma":
                raise ValueError(f"sma_window applies to kind='sma' only, not to kind={kind!r}")
        self.kind, self.ema_decay, self.sma_start, self.sma_window = (
            kind,
            float(ema_decay),
            float(sma_start),
            sma_window,
        )
        self.device = _checked_device(device)
        self.averages: dict[str, torch.Tensor] = {}  # float32, by parameter name; empty before SMA's first step
        self.count = 0  # the steps averaged (EMA: updates since the start)
        self.step = 0  # the optimizer step the averages are at

    @property
    def options(self) -> dict[str, Any]:
        """The kind and the options that define its average (what a resumed run must share)."""
        if self.kind == "ema":
            return {"kind": "ema", "ema_decay": self.ema_decay}
        return {"kind": "sma", "sma_start": self.sma_start, "sma_window": self.sma_window}

    def first_step(self, max_steps: int) -> int:
        """The first optimizer step the average takes in: 1 for EMA; for SMA `s0` of a run of `max_steps` steps."""
        if self.kind == "ema":
            return 1
        if self.sma_window is not None:
            return max(1, max_steps - self.sma_window + 1)
        return max(1, math.ceil(self.sma_start * max_steps))

    # ---- the Trainer's events ---------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs: Any) -> None:
        """A new run starts the average (EMA: at the current weights); a resumed one loads it from its checkpoint.

        The Trainer loads the `TrainerState` of the checkpoint before this event, so `state.global_step > 0`
        marks a resumed run: the state comes from `args.resume_from_checkpoint` when that names a directory,
        else from `<args.output_dir>/checkpoint-<global_step>`."""
        if state.global_step > 0:
            self.load(_resumed_checkpoint(args, state.global_step), state.global_step, model)
        else:
            self.reset(model)

    def on_step_end(self, args, state, control, model: nn.Module | None = None, **kwargs: Any) -> None:
        self.update(model, state.global_step, state.max_steps)

    def on_save(self, args, state, control, **kwargs: Any) -> None:
        self.save(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

    def on_train_end(self, args, state, control, model: nn.Module | None = None, **kwargs: Any) -> None:
        self.copy_to(model)

    # ---- the average ------------------------------------------------------------------------------

    def reset(self, model: nn.Module) -> None:
        """Starts a new average: EMA's at the current trainable weights, SMA's empty until its first step."""
        self.averages = {n: self._float32(held) for n, held in _held(model)} if self.kind == "ema" else {}
        self.count, self.step = 0, 0

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, max_steps: int) -> None:
        """Takes the weights after optimizer step `step` (of `max_steps`) into the average.

        Args:
            model: the model being trained (its parameters, or their ZeRO-3 partitions, are read).
            step: the optimizer steps done (`state.global_step`).
            max_steps: the steps of the whole run, which set SMA's first step.
        """
        self.step = step
        if step < self.first_step(max_steps):
            return
        self.count += 1
        if self.kind == "sma" and self.count == 1:
            self.averages = {n: self._float32(held) for n, held in _held(model)}
            return
        weight = 1.0 - self.ema_decay if self.kind == "ema" else 1.0 / self.count
        for name, held in _held(model):
            average = self.averages[name]
            average.lerp_(held.to(average.device, torch.float32), weight)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> bool:
        """Writes the averages into the model's trainable parameters (their dtype; under ZeRO-3 their partitions).

        Under ZeRO-3 this is collective (every rank calls it): the weights DeepSpeed keeps whole on each rank
        (persistent ones) are gathered again from the partitions.

        Returns:
            False (with a warning) where there is no average yet (SMA before its first step): the model is kept.
        """
        if not self.averages:
            warnings.warn(
                f"WeightAveraging({self.kind!r}) has no average yet at step {self.step}: the weights are kept"
            )
            return False
        _write(model, self._checked_names(model, self.averages))
        return True

    @contextlib.contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Puts the current averages into the model's parameters, and the trained weights back on exit.

        Under ZeRO-3 entering and leaving are collective, like `save_model` inside.

        Args:
            model: the model being trained (as the callbacks receive it).

        Returns:
            A context manager yielding `model`, averaged (kept as it is, with a warning, before SMA's first step).
        """
        trained = {n: held.detach().clone() for n, held in _held(model)}
        swapped = self.copy_to(model)
        try:
            yield model
        finally:
            if swapped:
                _write(model, trained)

    # ---- checkpoints ------------------------------------------------------------------------------

    def save(self, checkpoint: str) -> str:
        """Writes this process's averaging state into the checkpoint directory `checkpoint`.

        Returns:
            The file written (`state_file(checkpoint)`).
        """
        os.makedirs(checkpoint, exist_ok=True)
        path = state_file(checkpoint)
        state = {**self.options, "step": self.step, "count": self.count, "averages": self.averages}
        torch.save(state, path)
        return path

    def load(self, checkpoint: str, step: int, model: nn.Module) -> None:
        """Continues the average a run saved in `checkpoint` at optimizer step `step`.

        Raises:
            FileNotFoundError: the checkpoint holds no averaging state for this process.
            ValueError: the state is of another kind or options, another step, or other weights / partitions.
        """
        path = state_file(checkpoint)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} is missing: checkpoint {checkpoint} was written without WeightAveraging (or by fewer "
                "processes); resume from a checkpoint of a run that averaged its weights, or start a new run (a "
                "checkpoint outside "
                "output_dir: name it in TrainingArguments.resume_from_checkpoint too)"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = {k: state[k] for k in self.options}
        if saved != self.options:
            raise ValueError(f"{path} holds an average with {saved}, not {self.options}: resume with the same options")
        if state["step"] != step:
            raise ValueError(f"{path} holds the average at step {state['step']}, not at the resumed step {step}")
        held = dict(_held(model))
        averages = self._checked_names(model, state["averages"]) if state["averages"] else {}
        self.averages = {n: self._float32(held[n], average) for n, average in averages.items()}
        self.count, self.step = state["count"], step

    # ---- helpers ----------------------------------------------------------------------------------

    def _float32(self, held: torch.Tensor, value: torch.Tensor | None = None) -> torch.Tensor:
        """A float32 copy of `value` (default: `held`) on `device`, or on `held`'s device."""
        value = held if value is None else value
        return value.detach().to(self.device or held.device, torch.float32, copy=True)

    @staticmethod
    def _checked_names(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`tensors` if they are the model's trainable weights (or partitions) by name and shape."""
        shapes = {n: held.shape for n, held in _held(model)}
        if {n: t.shape for n, t in tensors.items()} != shapes:
            raise ValueError(
                "the averaged weights are not the model's trainable parameters (names or shapes differ: another "
                "model, other trainable weights, or another number of processes under ZeRO-3)"
            )
        return tensors


def _check_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")


def _checked_device(device: str | torch.device | None) -> torch.device | None:
    if device is None:
        return None
    try:
        checked = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(
            f"device must be a torch device such as 'cpu' or 'cuda:0' (or None), got {device!r}"
        ) from None
    if checked.type == "meta":
        raise ValueError("device cannot be 'meta': a meta tensor holds no values to average")
    return checked


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _resumed_checkpoint(args: Any, step: int) -> str:
    """The checkpoint a run resumed at `step` comes from (the Trainer hands its callbacks no path)."""
    named = getattr(args, "resume_from_checkpoint", None)
    if isinstance(named, str) and os.path.isdir(named):
        return named
    return os.path.join(args.output_dir, f"checkpoint-{step}")


def _held(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The trainable parameters' values this process holds, by name."""
    if model is None:
        raise ValueError("WeightAveraging needs the model: the Trainer passes it to its callbacks as `model`")
    return [(n, _held_values(p)) for n, p in model.named_parameters() if p.requires_grad]


def _held_values(param: nn.Parameter) -> torch.Tensor:
    """The ZeRO-3 partition of `param` (`ds_tensor`, flat, padded on the last rank), else its tensor."""
    return param.ds_tensor if hasattr(param, "ds_tensor") else param.data


def _write(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Copies `values` into the trainable parameters' held values, then refreshes ZeRO-3's gathered weights."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for name, param in params.items():
        held = _held_values(param)
        held.copy_(values[name].to(held.device, held.dtype))
    _regather(list(params.values()))


def _regather(params: list[nn.Parameter]) -> None:
    """Gathers again, from their partitions, the ZeRO-3 weights held whole now (DeepSpeed's persistent
    small weights): their whole copy, which a forward reads, would keep the old values (DeepSpeed's
    consolidated save partitions them first, a forward does not)."""
    if not any(hasattr(p, "ds_tensor") for p in params):
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    whole = [p for p in params if hasattr(p, "ds_tensor") and p.ds_status == ZeroParamStatus.AVAILABLE]
    if whole:  # as DeepSpeed refreshes them after loading a checkpoint: drop the whole copy, gather it again
        whole[0].partition(param_list=whole)
        whole[0].all_gather(param_list=whole)
