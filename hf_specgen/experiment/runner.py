"""The experiment loop every recipe shares: per method and strength, fine-tune with `SpecGenTrainer`,
merge the WiSE-FT alphas, score both sides (and the early-stopping checkpoints), record; then the
report, and optionally publish the chosen model.

Each run (a method at one of its strengths) lives in `output_dir/runs/<method>-<key>/`, `key` hashing
everything that changes its fine-tuned model (`run_key`: recipe data and model, method, training
arguments, LoRA and averaging options), and its scores in `records-<key>/`, keyed by the evaluation's
settings. Re-running skips what exists: a fine-tuned model is not retrained, a scored alpha is not
re-scored, and an interrupted training resumes from its last checkpoint. Training runs on every
process of a launch; merging and scoring run on the main process while the others wait.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from transformers.trainer_utils import get_last_checkpoint

from ..args import SpecGenTrainingArguments
from ..atomic import distributed_atomic_directory
from ..eval.markdown import markdown_table
from ..eval.pareto import best_generality
from ..eval.records import ResultRecord, schedule_summary
from ..eval.report import DEFAULT_TITLE, write_report
from ..merge import AlphaSchedule, MergeError, MergeOptions, merge, merge_sweep, select_alpha
from ..merge.checkpoint import Checkpoint, resolve
from ..merge.run import alpha_dirname
from ..merge.search import check_groups
from .arguments import ExperimentArguments
from .config import ConfigError
from .early_stopping import EarlyCheckpoints, checkpoint_directory, saved_checkpoint
from .grid import TrainingPoint, expand_points, grid_summary
from .methods import Method, parse_methods
from .recipe_base import RecipeBase
from .sources import check_output_dir, check_paths, remove_created


TRAINING_LOG = "specgen_training.json"  # beside the fine-tuned model
# Training arguments that do not change a run's results (where it logs, saves or is launched).
_NOT_IN_KEY = {
    "output_dir",
    "logging_dir",
    "logging_strategy",
    "logging_steps",
    "logging_first_step",
    "report_to",
    "disable_tqdm",
    "save_strategy",
    "save_steps",
    "save_total_limit",
    "save_only_model",
    "run_name",
    "push_to_hub",
    "hub_model_id",
    "hub_strategy",
    "hub_token",
    "hub_private_repo",
    "hub_always_push",
    "local_rank",
    "deepspeed",
    "ddp_backend",
    "ddp_timeout",
    "use_cpu",
    "dataloader_num_workers",
    "overwrite_output_dir",
}


def run_experiment(
    recipe: RecipeBase, experiment: ExperimentArguments, base: SpecGenTrainingArguments, hub_api: Any = None
) -> list[ResultRecord]:
    """Runs every method of `experiment` on `recipe`; returns the records the report was made of.

    Args:
        recipe: the fine-tuning task (model, data, trainer, evaluation).
        experiment: which methods, strengths and alphas to run, and how to report and publish.
        base: the training arguments every run starts from.
        hub_api: an `HfApi`-like object for publishing (default: `huggingface_hub.HfApi()`).

    Returns:
        The records the report was made of.
    """
    state = PartialState()
    root = Path(base.output_dir)
    created: list[Path] = []
    try:
        methods = parse_methods(experiment.methods, base)
        for method in methods:
            if method.algorithm is not None and method.algorithm not in recipe.algorithms:
                offers = (
                    f"offers {', '.join(recipe.algorithms)}" if recipe.algorithms else "trains with its own loss only"
                )
                raise ValueError(
                    f"method {method.name!r} trains with {method.algorithm}; recipe {recipe.name} {offers}"
                )
        points = expand_points(
            methods, experiment.strength_grids, _strength_defaults(base, experiment), experiment.strength_combination
        )
        for method in methods:
            if method.average:
                weight_averaging(method, experiment)  # its options, checked before anything trains
        if base.push_to_hub and not base.hub_model_id:
            raise ValueError("push_to_hub needs hub_model_id (or --push-to-hub REPO_ID): where to publish")
        if experiment.publish_point == "auto" and not any(experiment.chooses(m.name) for m in methods):
            raise ValueError(
                f"publish_point auto, but none of methods {experiment.methods} is among selection_methods "
                f"{experiment.selection_methods}: no auto pick to publish"
            )
        check_paths(recipe.local_paths())
        created = check_output_dir(root)  # before the model and data load, let alone get scored
        recipe.prepare()
        if experiment.hma_groups:
            _check_hma(recipe, experiment.hma_groups)
    except BaseException as error:
        remove_created(created)  # nothing is written when the configuration cannot run
        if isinstance(error, ValueError) and not isinstance(error, ConfigError):  # a method, suite or option
            raise ConfigError(str(error)) from error
        raise
    reference = _reference(recipe, root, state)
    records = [reference]
    runs = [_Run(recipe, point, experiment, base, root) for point in points]
    if state.is_main_process:
        done = sum(run.finetuned.is_dir() for run in runs)
        print(f"[{recipe.name}] {grid_summary(points)}" + (f"; {done} already trained" if done else ""), flush=True)
    for run in runs:
        records += run.execute(state, reference)
    if state.is_main_process:
        title = experiment.report_title or f"{recipe.name}: {DEFAULT_TITLE.lower()}"
        write_report(records, root, title=title, keep=experiment.keep_speciality)
        if base.push_to_hub:
            with one_process_models():
                publish(records, runs, experiment.keep_speciality, base, hub_api)
    state.wait_for_everyone()
    return records


def _strength_defaults(base: SpecGenTrainingArguments, experiment: ExperimentArguments) -> dict[str, float]:
    """Every strength option's single value: the training arguments' `<name>_lambda`s and `lora_r`."""
    return {
        **{f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.name.endswith("_lambda")},
        "lora_r": experiment.lora_r,
    }


def weight_averaging(method: Method, experiment: ExperimentArguments, anchor_device: str = "auto") -> Any:
    """The callback that makes a `<method>+ema` / `+sma` run's model the moving average of its weights,
    kept on `anchor_device` (the training arguments'; "auto": beside each weight)."""
    from ..averaging import WeightAveraging

    device = None if anchor_device == "auto" else anchor_device
    if method.average == "ema":
        return WeightAveraging("ema", ema_decay=experiment.ema_decay, device=device)
    return WeightAveraging("sma", sma_start=experiment.sma_start, sma_window=experiment.sma_window, device=device)


def _check_hma(recipe: RecipeBase, groups: int) -> None:
    """HMA points need the recipe's ratio search and a model with at least `groups` blocks per stack."""
    if type(recipe).search_group_alphas is RecipeBase.search_group_alphas:
        raise ConfigError(f"recipe {recipe.name} has no HMA ratio search (search_group_alphas): remove hma_groups")
    try:
        check_groups(Checkpoint(resolve(recipe.pretrained)).keys(), groups)
    except MergeError as error:
        raise ConfigError(f"hma_groups {groups}: {error}") from error


@contextlib.contextmanager
def one_process_models() -> Iterator[None]:
    """Within it, models the main process loads alone (to merge or score) are loaded whole: under ZeRO-3,
    `from_pretrained` would otherwise enter `deepspeed.zero.Init`, a collective that the waiting
    processes never join.

    Yields:
        Nothing: the block runs with ZeRO-3's partitioned loading switched off.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    from .. import compat

    config = compat.hf_deepspeed_config()
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if config is not None:
            hf_deepspeed.set_hf_deepspeed_config(config)


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def training_algorithm(recipe: RecipeBase, method: Method) -> str | None:
    """The algorithm `method` trains with on `recipe`.

    Returns:
        The one the method names, else the recipe's first (`algorithms`), else None (the recipe's own loss).
    """
    return method.algorithm or (recipe.algorithms[0] if recipe.algorithms else None)


def run_key(
    recipe: RecipeBase,
    method: Method,
    base: SpecGenTrainingArguments,
    experiment: ExperimentArguments,
    lora_r: int,
) -> str:
    """The key of a run's directory (`runs/<method>-<key>`): a hash of everything that changes its fine-tuned model.

    That is the recipe's `fingerprint()`, the training arguments (every field but `_NOT_IN_KEY`, this method's
    regularizers on and the others off), a LoRA run's `lora_*` options, the algorithm and its
    `algorithm_fingerprint()` (for recipes that offer algorithms), an averaged run's averaging options, and the
    recipe's options that no fingerprint reads (`RecipeBase.unclaimed_options`). Each of the last three is hashed
    only where it exists, so that the runs of the other recipes and methods keep their keys.

    Args:
        recipe: the recipe (its options set).
        method: the method trained.
        base: the training arguments with this run's strengths.
        experiment: the experiment's options (LoRA and averaging).
        lora_r: this run's LoRA rank.

    Returns:
        Ten hexadecimal digits.
    """
    options = {k: v for k, v in dataclasses.asdict(experiment).items() if k != "strength_grids"}
    lora = {k: v for k, v in options.items() if k.startswith("lora_")} if method.lora else None
    if lora is not None:
        lora["lora_r"] = lora_r
    training = {k: v for k, v in method.training_arguments(base).to_dict().items() if k not in _NOT_IN_KEY}
    parts = [recipe.fingerprint(), training, lora]
    algorithm = training_algorithm(recipe, method)
    if algorithm is not None:  # only then: the runs of single-algorithm recipes keep their keys
        parts.append({"algorithm": algorithm, **recipe.algorithm_fingerprint(algorithm)})
    if method.average:  # only then: the runs of the other methods keep their keys
        parts.append(
            {k: options[k] for k in ("ema_decay",) if method.average == "ema"}
            | {k: options[k] for k in ("sma_start", "sma_window") if method.average == "sma"}
        )
    unclaimed = recipe.unclaimed_options()
    if unclaimed:  # only then: recipes whose fingerprints read every option keep their keys
        parts.append({"options": unclaimed})
    return _key(*parts)


def _reference(recipe: RecipeBase, root: Path, state: PartialState) -> ResultRecord:
    """The pre-trained model's scores (every method's alpha = 0), evaluated once."""
    unclaimed = recipe.unclaimed_options()  # an option no fingerprint reads may change the scores too
    key = _key(recipe.options.model_name_or_path, recipe.eval_fingerprint(), *([unclaimed] if unclaimed else []))
    path = root / "runs" / recipe.reference_method / f"records-{key}" / "record.json"
    if state.is_main_process and not path.is_file():
        start = time.perf_counter()
        with one_process_models():
            scores = recipe.evaluate(Path(recipe.pretrained))
        cost = {"eval_s": round(time.perf_counter() - start, 1)}
        given = recipe.options.model_name_or_path  # as named (a tiny name, Hub id or path), not the resolved directory
        ResultRecord(method=recipe.reference_method, cost=cost, model=given, **scores).save(path)
    state.wait_for_everyone()
    record = ResultRecord.load(path)
    if state.is_main_process:
        print(f"[{recipe.name}] {recipe.reference_method}: {_scores(record)}", flush=True)
    return record


def _scores(record: ResultRecord) -> str:
    return f"speciality {record.speciality_score:.3f}, generality {record.generality_score:.3f}"


@dataclasses.dataclass
class _Run:
    """One method's fine-tune at one of its strengths, its WiSE-FT merges and early-stopping points, in its own
    directory."""

    recipe: RecipeBase
    point: TrainingPoint
    experiment: ExperimentArguments
    base: SpecGenTrainingArguments  # the configuration's; __post_init__ sets this point's strengths in it
    root: Path

    def __post_init__(self) -> None:
        self.method: Method = self.point.method
        strengths = self.point.values
        self.lora_r = int(strengths.pop("lora_r", self.experiment.lora_r))
        if strengths:
            self.base = dataclasses.replace(self.base, **strengths)
        self.algorithm = training_algorithm(self.recipe, self.method)
        key = run_key(self.recipe, self.method, self.base, self.experiment, self.lora_r)
        self.directory = self.root / "runs" / f"{self.method.name}-{key}"
        self.finetuned = self.directory / "finetuned"
        self.records = self.directory / f"records-{_key(self.recipe.eval_fingerprint())}"
        chooses = self.experiment.chooses(self.method.name)  # selection_methods
        self.auto = self.experiment.auto_alpha and chooses
        self.hma_means = self.experiment.hma_mean_alphas if self.experiment.hma_groups and chooses else []
        # alpha 0 is the pre-trained model itself; HMA's means are scored uniformly too, to compare
        self.alphas = [a for a in dict.fromkeys([*self.experiment.alphas, *self.hma_means]) if a > 0]

    def record_path(self, alpha: float) -> Path:
        return self.records / f"{alpha_dirname(alpha)}{self.groups_suffix()}.json"

    def groups_suffix(self) -> str:
        shape = self.experiment.merge_group_alphas
        return "" if shape is None else "-groups-" + "_".join(f"{a:g}" for a in shape)

    def early_path(self, fraction: float) -> Path:
        return self.records / f"early-{fraction:g}.json"

    def auto_path(self) -> Path:
        e = self.experiment
        return self.records / f"auto-keep-{e.auto_keep:g}-budget-{e.auto_budget}{self.groups_suffix()}.json"

    def hma_path(self, mean: float) -> Path:
        e = self.experiment
        own = self.recipe.hma_fingerprint()
        return self.records / (
            f"hma-{e.hma_groups}-mean-{mean:g}-{e.hma_samples}-{e.hma_max_samples}-{e.hma_steps}"
            + (f"-{_key(own)}" if own else "")
            + ".json"
        )

    def execute(self, state: PartialState, reference: ResultRecord) -> list[ResultRecord]:
        if not self.finetuned.is_dir():
            self.train(state)
        if state.is_main_process:
            with one_process_models():
                self.score_merges()
                self.score_early_points()
                if self.auto and not self.auto_path().is_file():
                    self.select(reference)
                for mean in self.hma_means:
                    if not self.hma_path(mean).is_file():
                        self.search_hma(mean)
            if not self.experiment.keep_merged_models:  # also what an interrupted run left there
                shutil.rmtree(self.directory / "merged", ignore_errors=True)
        state.wait_for_everyone()
        records = [ResultRecord.load(self.record_path(a)) for a in self.alphas]
        if self.auto:  # the points the search scored besides the grid, then its pick
            pick = ResultRecord.load(self.auto_path())
            records += [
                ResultRecord.load(self.record_path(a)) for a in pick.selection["scored"] if a not in self.alphas
            ]
            records.append(pick)
        records += [ResultRecord.load(self.hma_path(mean)) for mean in self.hma_means]
        records += [
            ResultRecord.load(self.early_path(f))
            for f in self.experiment.eval_fractions
            if self.early_path(f).is_file()
        ]
        if state.is_main_process:
            self.summarize(records)
        return records

    def select(self, reference: ResultRecord) -> None:
        """The auto-alpha pick (`select_alpha`), each point it needs scored once: a point the grid
        (or an earlier search) recorded is read, a new one merged, scored and recorded like a grid point."""
        shape = self.experiment.merge_schedule(1.0)
        upper = shape.max_mean if shape is not None else 1.0
        reused = []

        def evaluate(alpha: float) -> tuple[float, float]:
            if self.record_path(alpha).is_file():
                reused.append(alpha)
            else:
                self.score_merges([alpha])
            record = ResultRecord.load(self.record_path(alpha))
            return record.speciality_score, record.generality_score

        e = self.experiment
        choice = select_alpha(
            evaluate,
            keep=e.auto_keep,
            budget=e.auto_budget,
            upper=upper,
            known={0.0: (reference.speciality_score, reference.generality_score)},
        )
        inner = sorted(a for a in choice.evaluated if 0.0 < a < upper)  # what the bracket scored besides the ends
        alpha, reason = choice.alpha, choice.reason
        # never less general than a point the run already shows: a grid point the bracket did not visit may meet
        # the floor
        shown = {a: ResultRecord.load(self.record_path(a)) for a in self.alphas if self.record_path(a).is_file()}
        better = {
            a: r
            for a, r in shown.items()
            if r.speciality_score >= choice.floor and r.generality_score > choice.generality
        }
        if better:
            alpha = max(better, key=lambda a: (better[a].generality_score, -a))
            reason += f"; the grid's alpha {alpha:g} also reaches the floor and is more general: chosen instead"
        selection = {
            "rule": "auto",
            "keep": e.auto_keep,
            "budget": e.auto_budget,
            "floor": choice.floor,
            "evaluations": len(inner),
            "reused": len([a for a in reused if a in inner]),
            "scored": [a for a in sorted(choice.evaluated) if a > 0],
            "monotone": choice.monotone,
            "searched_alpha": choice.alpha,
            "reason": reason,
        }
        if alpha > 0:
            point = ResultRecord.load(self.record_path(alpha))
        else:  # no speciality gained: the pre-trained model keeps all of it
            hyperparameter, value = self.method.hyperparameter(self.base, self.lora_r)
            point = ResultRecord(
                method=self.method.name,
                alpha=0.0,
                hyperparameter=hyperparameter,
                value=value,
                strengths=self.strengths(),
                speciality=reference.speciality,
                generality=reference.generality,
            )
        dataclasses.replace(point, selection=selection).save(self.auto_path())

    def search_hma(self, mean: float) -> None:
        """HMA at `mean`: the recipe's ratio search on the full fine-tuned model (a LoRA run's adapter
        merged at alpha 1 for it), then that merge scored and recorded with its ratios and search."""
        e = self.experiment
        start = time.perf_counter()
        with self._full_model(self.finetuned) as finetuned:
            found = self.recipe.search_group_alphas(finetuned, e.hma_groups, mean, e)
        search_s = round(time.perf_counter() - start, 1)
        schedule = AlphaSchedule(group_alphas=found.group_alphas)
        target = self.directory / "merged" / f"hma-{e.hma_groups}-mean-{mean:g}"
        merge(self.recipe.pretrained, self.finetuned, schedule, target, MergeOptions(overwrite="any"))
        selection = {
            "rule": "hma",
            "samples": e.hma_samples,
            "max_samples": e.hma_max_samples,
            "held_out_loss": found.held_out_loss,
            "uniform_loss": found.uniform_loss,
            "steps": len(found.history),
            "loss_curve": [h["held_out_loss"] for h in found.history],
            "state_bytes": found.state_bytes,
        }
        self._score(
            mean,
            target,
            kept=e.keep_merged_models,
            merge=schedule.describe(),
            selection=selection,
            path=self.hma_path(mean),
            search_s=search_s,
        )
        if not e.keep_merged_models:
            shutil.rmtree(target)
            with contextlib.suppress(OSError):
                target.parent.rmdir()

    @contextlib.contextmanager
    def _full_model(self, trained: Path) -> Iterator[Path]:
        """A model this run saved (`finetuned`, an early-stopping checkpoint) as a full checkpoint: itself,
        or its LoRA adapter merged at alpha 1 into a directory removed afterwards."""
        if not self.method.lora:
            yield trained
            return
        target = self.directory / "full-merged"
        try:
            yield merge(self.recipe.pretrained, trained, 1.0, target, MergeOptions(overwrite="any"))
        finally:
            shutil.rmtree(target, ignore_errors=True)

    def score_early_points(self) -> None:
        """Scores the checkpoints saved at `eval_fractions` of training that have no record yet (a run trained
        before a fraction was asked has no checkpoint at it: said once, nothing retrained)."""
        missing = [f for f in self.experiment.eval_fractions if not self.early_path(f).is_file()]
        saved = {f: saved_checkpoint(self.early_root, f) for f in missing}  # each checkpoint's info read once
        absent = [f for f in missing if saved[f] is None]
        if absent:
            print(
                f"[{self.recipe.name}] {self.point.describe()}: trained without a checkpoint at eval_fractions "
                f"{', '.join(f'{f:g}' for f in absent)}; no early-stopping point there (delete {self.directory} "
                "to retrain)",
                flush=True,
            )
        for fraction in (f for f in missing if saved[f] is not None):
            with self._full_model(checkpoint_directory(self.early_root, fraction)) as model:
                self._score(
                    None, model, kept=not self.method.lora, path=self.early_path(fraction), checkpoint=saved[fraction]
                )

    @property
    def early_root(self) -> Path:
        return self.directory / "early"

    def strengths(self) -> dict[str, float] | None:
        """This run's strengths for its records (`lora_r` as a number), None for a method without any."""
        return {name: float(value) for name, value in self.point.strengths} or None

    def train(self, state: PartialState) -> None:
        model, processor = self.recipe.load_model()
        if self.method.lora:
            model = self._with_lora(model)
        args = self.method.training_arguments(
            self.base,
            output_dir=str(self.directory / "trainer"),
            push_to_hub=False,
            learning_rate=(self.experiment.lora_learning_rate if self.method.lora else None)
            or self.base.learning_rate,
        )
        trainer = self.recipe.build_trainer(model, processor, args, algorithm=self.algorithm)
        averaging = (
            weight_averaging(self.method, self.experiment, self.base.anchor_device) if self.method.average else None
        )
        if averaging is not None:
            trainer.add_callback(averaging)  # first: the early checkpoints save the average of the same step
        if self.experiment.eval_fractions:
            trainer.add_callback(
                EarlyCheckpoints(
                    self._saver(trainer, processor, averaging), self.experiment.eval_fractions, self.early_root
                )
            )
        checkpoint = get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
        start = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=checkpoint)
        # written aside and renamed in once complete: an interrupted save (Ctrl-C, SIGTERM, a crash) leaves no
        # directory that looks finished, and the next run trains again from the last checkpoint
        with distributed_atomic_directory(self.finetuned, what="the fine-tuned model") as temporary:
            trainer.save_model(str(temporary))  # every process: ZeRO-3 gathers the weights to write them
            if state.is_main_process:
                processor.save_pretrained(temporary)
                metrics = {
                    "train_s": round(time.perf_counter() - start, 1),
                    "steps": result.global_step,
                    "train_loss": result.training_loss,
                    "resumed_from": checkpoint,
                }
                (temporary / TRAINING_LOG).write_text(json.dumps(metrics, indent=2))
        if state.is_main_process:
            shutil.rmtree(args.output_dir, ignore_errors=True)  # its checkpoints were for resuming only
        state.wait_for_everyone()
        del trainer, model
        _free_memory()

    @staticmethod
    def _saver(trainer: Any, processor: Any, averaging: Any) -> Any:
        """Saves the model as the run would at that moment (with averaging: its average) and its processor."""

        def save(path: str) -> None:
            with averaging.swapped(trainer.model) if averaging is not None else contextlib.nullcontext():
                trainer.save_model(path)
            if PartialState().is_main_process:
                processor.save_pretrained(path)

        return save

    def _with_lora(self, model: Any) -> Any:
        from peft import LoraConfig, get_peft_model

        targets = self.experiment.lora_target_modules or self.recipe.default_lora_targets
        config = LoraConfig(
            r=self.lora_r,
            lora_alpha=self.experiment.lora_alpha,
            lora_dropout=self.experiment.lora_dropout,
            target_modules=targets,
        )
        return get_peft_model(model, config)

    def score_merges(self, alphas: list[float] | None = None) -> None:
        """Merges and scores the alphas (default: the run's) without a record (alpha 1 of a full
        fine-tune is the model itself)."""
        missing = [a for a in (self.alphas if alphas is None else alphas) if not self.record_path(a).is_file()]
        direct = {1.0: self.finetuned} if 1.0 in missing and not self.method.lora else {}
        to_merge = [a for a in missing if a not in direct]
        merged_root = self.directory / "merged"
        models = dict(direct)
        if to_merge:
            models.update(self._merge(to_merge, merged_root))
        for alpha in missing:
            schedule = self.experiment.merge_schedule(alpha)
            self._score(
                alpha,
                models[alpha],
                kept=alpha in direct or self.experiment.keep_merged_models,
                merge=schedule.describe() if schedule else None,
                path=self.record_path(alpha),
            )
        if not self.experiment.keep_merged_models:
            for alpha in to_merge:
                shutil.rmtree(models[alpha])
            with contextlib.suppress(OSError):  # empty unless an earlier run kept merges there
                merged_root.rmdir()

    def _score(
        self,
        alpha: float | None,
        model: Path,
        *,
        kept: bool,
        path: Path,
        search_s: float | None = None,
        merge: dict[str, Any] | None = None,
        selection: dict[str, Any] | None = None,
        checkpoint: dict[str, Any] | None = None,
    ) -> None:
        """Scores `model` (the merge at `alpha`, or with `checkpoint` an early-stopping point) and writes its record
        to `path`."""
        hyperparameter, value = self.method.hyperparameter(self.base, self.lora_r)
        start = time.perf_counter()
        scores = self.recipe.evaluate(model)
        cost = {"train_s": self.training_log()["train_s"], "eval_s": round(time.perf_counter() - start, 1)}
        if search_s is not None:
            cost["search_s"] = search_s
        ResultRecord(
            method=self.method.name,
            alpha=alpha,
            hyperparameter=hyperparameter,
            value=value,
            strengths=self.strengths(),
            **scores,
            cost=cost,
            model=str(model) if kept else None,
            merge=merge,
            selection=selection,
            checkpoint=checkpoint,
        ).save(path)

    def _merge(self, alphas: list[float], merged_root: Path) -> dict[float, Path]:
        """Sweeps `alphas` into `merged_root/alpha-<a>/`, beside the merges an earlier run kept there
        (`keep_merged_models`): the sweep is written aside, then each alpha moved in."""
        sweep_root = self.directory / "merging"
        # the run's own directories: replace whatever an interrupted run left (inputs stay protected)
        shape = self.experiment.merge_schedule(1.0)  # the group shape, scaled to each alpha
        swept = merge_sweep(
            self.recipe.pretrained, self.finetuned, alphas, sweep_root, MergeOptions(overwrite="any"), shape=shape
        )
        merged_root.mkdir(exist_ok=True)
        models = {}
        for alpha, directory in swept.items():
            target = merged_root / directory.name
            if target.exists():
                shutil.rmtree(target)
            directory.rename(target)
            models[alpha] = target
        shutil.rmtree(sweep_root)
        return models

    def training_log(self) -> dict[str, Any]:
        """What `train` measured: seconds, optimizer steps, final loss, the checkpoint it resumed from."""
        return json.loads((self.finetuned / TRAINING_LOG).read_text())

    def summarize(self, records: list[ResultRecord]) -> None:
        training = self.training_log()
        points = " | ".join(
            f"{_where(r)}{_chosen(r)}: {r.speciality_score:.3f} / {r.generality_score:.3f}" for r in records
        )
        resumed = (
            f" (resumed from {Path(training['resumed_from']).name}: the time is the last session's)"
            if training.get("resumed_from")
            else ""
        )
        print(
            f"[{self.recipe.name}] {self.point.describe()}: {training['steps']} steps in "
            f"{training['train_s']:.0f} s{resumed}; speciality / generality {points}",
            flush=True,
        )


def _chosen(record: ResultRecord) -> str:
    if record.checkpoint is not None:
        return f" (step {record.checkpoint['step']})"
    if record.selection is None:
        return ""
    return (
        " (auto)"
        if record.selection["rule"] == "auto"
        else " (HMA " + schedule_summary(record.merge or {"kind": "?"}) + ")"
    )


def _where(record: ResultRecord) -> str:
    return (
        f"{record.checkpoint['fraction']:g} of training"
        if record.checkpoint is not None
        else f"alpha {record.alpha:g}"
    )


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _schedule_of(record: ResultRecord) -> AlphaSchedule | float:
    """What merges `record`'s point again: its group alphas (a group shape or an HMA search), or its alpha
    (an early-stopping checkpoint: itself, alpha 1)."""
    if record.alpha is None:
        return 1.0
    if record.merge is not None and record.merge["kind"] == "groups":
        return AlphaSchedule(
            group_alphas=tuple(record.merge["group_alphas"]), outside_alpha=record.merge.get("outside_alpha")
        )
    return record.alpha


def publish(
    records: list[ResultRecord], runs: list[_Run], keep: float, base: SpecGenTrainingArguments, hub_api: Any = None
) -> Path:
    """Merges the chosen point again (at its alpha) and pushes it with the report's table in its card.

    The rule: among the fine-tuned points keeping at least `keep` of the best speciality, the most
    general one (`best_generality`); with `publish_point` auto, among the methods' auto-alpha picks.

    Args:
        records: the experiment's records.
        runs: the experiment's runs (where each fine-tuned model lies).
        keep: the share of the best speciality the published point keeps (`keep_speciality`).
        base: the training arguments (`hub_model_id`, `hub_private_repo`, ...).
        hub_api: an `HfApi`-like object (default: `huggingface_hub.HfApi()`).

    Returns:
        The local directory of the published merge (`output_dir/published`).
    """

    def run_of(record: ResultRecord) -> _Run | None:  # the run (method and strengths) that made the record
        return next(
            (run for run in runs if (run.method.name, run.strengths()) == (record.method, record.strengths)), None
        )

    candidates = [r for r in records if run_of(r) is not None]
    if runs and runs[0].experiment.publish_point == "auto":  # the auto-alpha picks only
        candidates = [r for r in candidates if r.selection is not None and r.selection["rule"] == "auto"]
    pick = best_generality(candidates, keep)
    run = run_of(pick)
    print(f"[{run.recipe.name}] publishing {pick.label} ({_scores(pick)}) to {base.hub_model_id}", flush=True)
    schedule = _schedule_of(pick)
    trained = (
        run.finetuned if pick.checkpoint is None else checkpoint_directory(run.early_root, pick.checkpoint["fraction"])
    )
    return merge(
        run.recipe.pretrained,
        trained,
        schedule,
        Path(base.output_dir) / "published",
        MergeOptions(overwrite="any"),
        push_to_hub=base.hub_model_id,
        private=bool(base.hub_private_repo),
        scores=markdown_table(records),
        hub_api=hub_api,
    )
