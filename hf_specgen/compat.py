"""The internals of transformers, TRL and DeepSpeed the trainer stack relies on, read in one place.

The regularizers mirror what `transformers.Trainer` does with the task loss (its normalization over the
accumulated micro-batches, its label shift), collate examples as its training loop does, save their state with
its checkpoints and, under DeepSpeed ZeRO, reach the fp32 partitions of its optimizer. Some of that has no
public API: each such internal is read here by a function named for what it gives, and listed in `INTERNALS`
(where it lives, the parameters passed to it), so that `tests/test_compat.py` checks every one against the
installed versions and fails naming the internal that is gone, and a missing one fails at run time with a
`MissingInternalError` naming it rather than an `AttributeError` deep in a training step.

They were checked against the versions of `CHECKED_VERSIONS` (setup.cfg's ranges); an installed version outside
its range gets a `CompatWarning` when this module is imported.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from packaging.version import Version


# distribution -> (lowest, first excluded) version the internals below were checked against: setup.cfg's ranges
CHECKED_VERSIONS = {"transformers": ("5.0", "6"), "trl": ("1.16", "2"), "deepspeed": ("0.16", "1")}


class CompatWarning(UserWarning):
    """An installed transformers, TRL or DeepSpeed lies outside the versions `hf_specgen.compat` was checked
    against."""


class MissingInternalError(RuntimeError):
    """An internal of transformers, TRL or DeepSpeed that hf_specgen relies on is not there (renamed or removed)."""


@dataclass(frozen=True)
class Internal:
    """One internal relied on: `owner.name` in `package`.

    Args:
        package: the distribution, e.g. `transformers`.
        owner: `module` or `module:Class`, e.g. `transformers.trainer:Trainer`.
        name: the attribute, method or function, e.g. `_loss_shifts_labels`.
        parameters: the parameters passed to it (a callable's); empty for a value.
        set_by: for an attribute set on instances rather than defined on the class, the module or class (or
            function) whose source assigns it (`.<name> =`), e.g. `transformers.trainer:Trainer`.
        use: what hf_specgen uses it for.
    """

    package: str
    owner: str
    name: str
    parameters: tuple[str, ...] = ()
    set_by: str | None = None
    use: str = ""

    @property
    def qualified_name(self) -> str:
        return f"{self.owner.replace(':', '.')}.{self.name}"


_TRAINER = "transformers.trainer:Trainer"
_ZERO12 = "deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer"
_LINKAGE = "deepspeed.utils.mixed_precision_linkage"  # links each weight to its fp32 fragment

INTERNALS = (
    # private internals, read through the functions below
    Internal(
        "transformers",
        _TRAINER,
        "_loss_shifts_labels",
        set_by=_TRAINER,
        use="`loss_shifts_labels`: whether the task loss shifts labels (a causal LM's), as KD's positions must",
    ),
    Internal(
        "transformers",
        _TRAINER,
        "current_gradient_accumulation_steps",
        set_by=_TRAINER,
        use="`accumulation_steps`: the micro-batches of this optimizer step, which the batch terms are divided by",
    ),
    Internal(
        "transformers",
        _TRAINER,
        "_remove_unused_columns",
        ("dataset", "description"),
        use="`remove_unused_columns`: the training set's columns as the training loop keeps them (importances)",
    ),
    Internal(
        "transformers",
        _TRAINER,
        "_prepare_inputs",
        ("inputs",),
        use="`prepare_inputs`: a collated batch on the device, as the training loop moves it (importances)",
    ),
    Internal(
        "transformers",
        _TRAINER,
        "_save_optimizer_and_scheduler",
        ("output_dir",),
        use="overridden by `SpecGenMixin`: the regularizers' state saved with each checkpoint",
    ),
    Internal(
        "transformers",
        "transformers.trainer_pt_utils",
        "nested_gather",
        ("tensors", "parallel_mode"),
        use="`nested_gather`: the logged terms reduced over processes as the Trainer reduces its loss",
    ),
    Internal(
        "transformers",
        "transformers.modeling_utils:PreTrainedModel",
        "_from_config",
        ("config",),
        use="`from_config`: a model built from its config in a given dtype (a partitioned ZeRO-3 copy)",
    ),
    Internal(
        "transformers",
        "transformers.integrations.deepspeed",
        "_hf_deepspeed_config_weak_ref",
        use="`hf_deepspeed_config`: the DeepSpeed config `from_pretrained` obeys, set aside to load a model whole",
    ),
    Internal(
        "deepspeed",
        _LINKAGE,
        "_hp_mapping",
        set_by=_LINKAGE,
        use="`hp_mapping`: the part of a weight in this rank's ZeRO-1/2 fp32 partition",
    ),
    Internal(
        "deepspeed",
        _LINKAGE,
        "_index_in_param_group",
        set_by=_LINKAGE,
        use="`lp_grad_fragment`: a weight's place in its parameter group, where its gradient fragment is",
    ),
    Internal(
        "deepspeed",
        "deepspeed.utils.tensor_fragment:tensor_fragment",
        "get_lp_grad_fragment",
        ("index_in_param_group",),
        use="`lp_grad_fragment`: the averaged gradient of a weight's ZeRO-1/2 fragment",
    ),
    Internal(
        "deepspeed",
        _ZERO12,
        "_wait_for_offload_copies",
        use="`offload_copies_waiter`: the offloaded gradients landed before the weight terms' are added",
    ),
    # public, but what the loss normalization mirrors of `Trainer.training_step` and `compute_loss`
    Internal("transformers", _TRAINER, "compute_loss", ("model", "inputs", "return_outputs", "num_items_in_batch")),
    Internal("transformers", _TRAINER, "training_step", ("model", "inputs", "num_items_in_batch")),
    Internal("transformers", _TRAINER, "loss_is_scaled_for_ga"),
    Internal("transformers", _TRAINER, "model_accepts_loss_kwargs", set_by=_TRAINER),
    Internal("transformers", _TRAINER, "compute_loss_func", set_by=_TRAINER),
    Internal("transformers", _TRAINER, "get_tp_size"),
    Internal("trl", "trl:SFTTrainer", "compute_loss", ("model", "inputs", "return_outputs", "num_items_in_batch")),
    Internal("trl", "trl:DPOTrainer", "compute_loss", ("model", "inputs", "return_outputs", "num_items_in_batch")),
    Internal("trl", "trl:GRPOTrainer", "compute_loss", ("model", "inputs", "return_outputs", "num_items_in_batch")),
)


def installed_version(package: str) -> Version | None:
    """The installed version of a distribution.

    Args:
        package: e.g. `transformers`.

    Returns:
        its version, or None where it is not installed.
    """
    try:
        return Version(importlib.metadata.version(package))
    except importlib.metadata.PackageNotFoundError:
        return None


def unchecked_versions() -> list[str]:
    """The installed packages of `CHECKED_VERSIONS` outside the range their internals were checked against.

    Returns:
        one line per such package, e.g. `transformers 6.1.0 (checked: >=5.0,<6)`.
    """
    lines = []
    for package, (low, high) in CHECKED_VERSIONS.items():
        version = installed_version(package)
        if version is not None and not Version(low) <= version < Version(high):
            lines.append(f"{package} {version} (checked: >={low},<{high})")
    return lines


def warn_unchecked_versions() -> None:
    """Warns (`CompatWarning`) about each installed package outside the versions its internals were checked against."""
    for line in unchecked_versions():
        warnings.warn(
            f"hf_specgen relies on internals of {line}: they may have changed; `pytest tests/test_compat.py` "
            "checks them against the installed versions",
            CompatWarning,
            stacklevel=2,
        )


def resolve(path: str) -> Any:
    """The object at `module` or `module:Qualified.name`.

    Args:
        path: e.g. `transformers.trainer:Trainer` or `transformers.trainer:Trainer.__init__`.

    Returns:
        the module, class or function.
    """
    module, _, qualname = path.partition(":")
    found = importlib.import_module(module)
    for part in filter(None, qualname.split(".")):
        found = getattr(found, part)
    return found


def internal_problems(internal: Internal) -> list[str]:
    """What is wrong with one internal in the installed versions (its package must be installed).

    Args:
        internal: an item of `INTERNALS`.

    Returns:
        one line per problem, each naming the internal: gone, no longer assigned where it was, or a parameter
        passed to it that its signature lacks; empty when it is as relied on.
    """
    where = f"{internal.package} {installed_version(internal.package)}: {internal.qualified_name}"
    try:
        owner = resolve(internal.owner)
    except (ImportError, AttributeError) as error:
        return [f"{where}: its owner {internal.owner} is gone ({error})"]
    if internal.set_by is not None:
        try:
            source = inspect.getsource(resolve(internal.set_by))
        except (ImportError, AttributeError, OSError, TypeError) as error:
            return [f"{where}: {internal.set_by}, which set it, is gone ({error})"]
        if f".{internal.name} =" not in source:
            return [f"{where}: no longer set by {internal.set_by}"]
        return []
    if not hasattr(owner, internal.name):
        return [f"{where}: gone"]
    if not internal.parameters:
        return []
    try:
        signature = inspect.signature(getattr(owner, internal.name))
    except (TypeError, ValueError) as error:
        return [f"{where}: no signature to check ({error})"]
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    return [
        f"{where}: takes no parameter {name!r} any more (signature {signature})"
        for name in internal.parameters
        if name not in signature.parameters and not takes_any
    ]


def _read(owner: Any, name: str, package: str = "transformers") -> Any:
    try:
        return getattr(owner, name)
    except AttributeError:
        low, high = CHECKED_VERSIONS[package]
        owner_name = getattr(owner, "__name__", type(owner).__name__)  # a module or class, else an instance's class
        raise MissingInternalError(
            f"{owner_name} has no {name!r}: hf_specgen relies on this internal of {package} "
            f"(checked against >={low},<{high}; installed: {installed_version(package)})"
        ) from None


# ---- transformers' Trainer -------------------------------------------------------------------------------------


def loss_shifts_labels(trainer: Any) -> bool:
    """Whether the trainer's task loss shifts its labels (a causal LM's: position t predicts label t + 1).

    Args:
        trainer: a `transformers.Trainer`.

    Returns:
        `Trainer._loss_shifts_labels`.
    """
    return bool(_read(trainer, "_loss_shifts_labels"))


def accumulation_steps(trainer: Any) -> int:
    """The micro-batches of the optimizer step being run, as the training loop counts them.

    Args:
        trainer: a `transformers.Trainer`.

    Returns:
        `Trainer.current_gradient_accumulation_steps`, set by the training loop; 1 before it runs.
    """
    return getattr(trainer, "current_gradient_accumulation_steps", 1)


def remove_unused_columns(trainer: Any, dataset: Any, description: str) -> Any:
    """The dataset with the columns the training loop removes removed (those the model's forward does not take).

    Args:
        trainer: a `transformers.Trainer`.
        dataset: a `datasets.Dataset`.
        description: what the dataset is, for the Trainer's log (e.g. `training`).

    Returns:
        `Trainer._remove_unused_columns(dataset, description=description)`.
    """
    return _read(trainer, "_remove_unused_columns")(dataset, description=description)


def prepare_inputs(trainer: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """A collated batch as the training loop prepares it for the model (on its device).

    Args:
        trainer: a `transformers.Trainer`.
        inputs: the collated batch.

    Returns:
        `Trainer._prepare_inputs(inputs)`.
    """
    return _read(trainer, "_prepare_inputs")(inputs)


def nested_gather(tensors: Any, parallel_mode: Any) -> Any:
    """Tensors gathered over the processes as the Trainer gathers its loss for logging.

    Args:
        tensors: a tensor or nested list/tuple/dict of tensors.
        parallel_mode: `TrainingArguments.parallel_mode`.

    Returns:
        `transformers.trainer_pt_utils.nested_gather(tensors, parallel_mode)`.
    """
    from transformers import trainer_pt_utils

    return _read(trainer_pt_utils, "nested_gather")(tensors, parallel_mode)


def from_config(model_class: type, config: Any, **kwargs: Any) -> Any:
    """A model built from its config, with its weights initialized (or partitioned, in a ZeRO-3 context).

    Args:
        model_class: a `PreTrainedModel` class.
        config: its config.
        **kwargs: passed on, e.g. `dtype`.

    Returns:
        `model_class._from_config(config, **kwargs)`.
    """
    return _read(model_class, "_from_config")(config, **kwargs)


def hf_deepspeed_config() -> Any | None:
    """The DeepSpeed config transformers' `from_pretrained` obeys now (under ZeRO-3: it loads models partitioned).

    Returns:
        the `HfDeepSpeedConfig` that `TrainingArguments` (or the user) set, or None.
    """
    from transformers.integrations import deepspeed

    reference = _read(deepspeed, "_hf_deepspeed_config_weak_ref")
    return reference() if reference is not None else None


# ---- DeepSpeed's ZeRO-1/2 optimizer --------------------------------------------------------------------------


def hp_mapping(param: Any) -> Any | None:
    """Where a weight's part in this rank's ZeRO-1/2 fp32 partition is (what `safe_get_full_*` read).

    Args:
        param: a weight of a model under a ZeRO-1/2 optimizer.

    Returns:
        its `_hp_mapping` (`hp_fragment`, `lp_fragment_address`, `param_group_index`, ...), or None where no
        element of the weight is in this rank's partition.
    """
    return getattr(param, "_hp_mapping", None)


def lp_grad_fragment(param: Any) -> Any:
    """The averaged gradient of a weight's ZeRO-1/2 fragment (or the weight's whole accumulation buffer, bf16).

    Args:
        param: a weight with an `hp_mapping`.

    Returns:
        `param._hp_mapping.get_lp_grad_fragment(param._index_in_param_group)`.
    """
    index = _read(param, "_index_in_param_group", "deepspeed")
    return _read(param, "_hp_mapping", "deepspeed").get_lp_grad_fragment(index)


def offload_copies_waiter(optimizer: Any) -> Callable[[], None] | None:
    """What waits for a ZeRO-1/2 optimizer's asynchronous copies of the offloaded gradients.

    Args:
        optimizer: a DeepSpeed ZeRO-1/2 optimizer with `offload_optimizer`.

    Returns:
        its `_wait_for_offload_copies`, or None where it has none (it then copies synchronously).
    """
    return getattr(optimizer, "_wait_for_offload_copies", None)


warn_unchecked_versions()
