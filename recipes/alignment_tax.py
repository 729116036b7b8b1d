"""The alignment tax: preference alignment (DPO, or RSF: reward-ranked fine-tuning) raises the reward
and lowers common sense, reading comprehension and translation; regularizers and model averaging
(WiSE-FT, its auto alpha, HMA's layer-group ratios) buy the generality back, always relative to the
SFT model the alignment starts from.

    accelerate launch recipes/alignment_tax.py --config recipes/configs/alignment_tax.yaml
    accelerate launch --config_file recipes/accelerate/zero3.yaml recipes/alignment_tax.py \\
        --config recipes/configs/alignment_tax.yaml --methods dpo dpo+l2 --push-to-hub me/zephyr-wise
    python recipes/alignment_tax.py --config recipes/configs/alignment_tax_tiny.yaml   # offline, CPU

Methods: `dpo` (plain DPO, `SpecGenDPOTrainer`), `dpo+l2`, `dpo+kd`, `dpo+ewc`, `dpo+mas`, `lora` (DPO
of a LoRA adapter), `rsf` (best-of-n samples of the SFT model scored by the reward, then SFT on the best:
`SpecGenSFTTrainer`), `rsf+l2`, ... and the combinations the methods syntax allows; a name without an
algorithm (`l2`, `lora`) trains with DPO.

Speciality, on the test split's prompts: the mean reward of the policy's generations under the reward
(`reward_model_name_or_path`: a sequence-classification reward model, or the tiny world's rule-based
reward), their win rate against the SFT model's generations under the same reward, and the held-out
preference accuracy of the implicit DPO reward (no generation). Generality: the `alignment_tax` suite
(ARC, RACE, PIQA, SQuAD v2, DROP, WMT14 fr-en through lm-eval) or the tiny suites. Any field of
`SpecGenDPOConfig`, `ExperimentArguments` or `AlignmentArguments` can be set in the YAML file or on
the command line (which wins).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import PartialState
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_specgen import SpecGenTrainingArguments
from hf_specgen.alignment import (
    check_reward,
    completion_logps,
    implicit_reward_accuracy,
    is_rule,
    load_reward,
    sample_best_of_n,
    win_rate,
)
from hf_specgen.atomic import atomic_file
from hf_specgen.data.preferences import answer_text, explicit_prompt, is_conversational, prompt_text
from hf_specgen.eval.suites import LM_SUITES, check_suites, evaluate_suites
from hf_specgen.experiment import (
    ConfigError,
    ExperimentArguments,
    Recipe,
    check_model,
    is_local_path,
    load_split,
    one_process_models,
)
from hf_specgen.merge import GroupSearch, generate_completions, search_group_alphas
from hf_specgen.tiny.names import TINY_INSTRUCTION_REWARD
from hf_specgen.trl import SpecGenDPOConfig, SpecGenDPOTrainer, SpecGenSFTConfig, SpecGenSFTTrainer


SPECIALITY_METRICS = ("reward", "win_rate", "preference_accuracy")
RSF_SAMPLES = "rsf_samples.jsonl"  # a run's best-of-n data, beside its fine-tuned model


@dataclass
class AlignmentArguments:
    """The SFT model, the preference data, the reward, the generation and the evaluation suites."""

    model_name_or_path: str = field(
        default="HuggingFaceH4/mistral-7b-sft-beta",
        metadata={
            "help": "The SFT model: where alignment starts, DPO's reference, and the model the tax and every "
            "merge are measured against (Hub id or directory)."
        },
    )
    dataset_name: str = field(
        default="HuggingFaceH4/ultrafeedback_binarized",
        metadata={
            "help": "Preference data set (Hub id or directory): prompt/chosen/rejected text, conversational "
            "chosen/rejected messages, or hh-rlhf-style dialogues (`hf_specgen.data.preferences`)."
        },
    )
    train_split: str = field(default="train_prefs", metadata={"help": "Split to align on."})
    test_split: str = field(
        default="test_prefs", metadata={"help": "Held-out split: its prompts and pairs score speciality."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Align on the first N pairs only."})
    max_eval_prompts: int = field(
        default=200, metadata={"help": "Held-out pairs scored per model (generation, reward, implicit reward)."}
    )
    reward_model_name_or_path: str = field(
        default="weqweasdas/RM-Mistral-7B",
        metadata={
            "help": "The reward: a sequence-classification reward model (Hub id or directory, one output), or "
            f"{TINY_INSTRUCTION_REWARD} (the tiny world's rule)."
        },
    )
    reward_batch_size: int = field(default=8, metadata={"help": "Texts per reward-model forward pass."})
    reward_max_length: int | None = field(
        default=None, metadata={"help": "Reward model's input tokens at most (kept from the end)."}
    )
    speciality_metrics: list[str] = field(
        default_factory=lambda: list(SPECIALITY_METRICS),
        metadata={
            "help": "What the speciality score averages, of " + ", ".join(SPECIALITY_METRICS) + ". A reward model's "
            "raw score is unbounded: leave `reward` out to average the two [0, 1] measures only."
        },
    )
    eval_suites: list[str] = field(
        default_factory=lambda: ["alignment_tax"],
        metadata={
            "help": "Generality suites (the tax): "
            + ", ".join(n for n, s in LM_SUITES.items() if s.role == "generality")
            + "."
        },
    )
    eval_limit: int | None = field(
        default=None, metadata={"help": "At most N examples per generality task (quick runs)."}
    )
    eval_num_fewshot: int | None = field(default=None, metadata={"help": "Few-shot examples per question (lm-eval)."})
    eval_batch_size: int = field(default=16, metadata={"help": "Generality evaluation batch size."})
    generation_max_new_tokens: int = field(
        default=256, metadata={"help": "Tokens generated per held-out prompt at most."}
    )
    generation_temperature: float = field(
        default=0.0, metadata={"help": "0: greedy generation; > 0: sampled at this temperature."}
    )
    generation_top_p: float = field(
        default=1.0, metadata={"help": "Nucleus sampling's mass (with a temperature > 0)."}
    )
    generation_batch_size: int = field(default=8, metadata={"help": "Prompts per generate call."})
    stop_sequence: str | None = field(
        default=None,
        metadata={"help": "Generations are cut at its first occurrence (e.g. a newline for one-line answers)."},
    )
    rsf_samples: int = field(default=8, metadata={"help": "RSF: completions sampled per training prompt (best-of-n)."})
    rsf_temperature: float = field(default=1.0, metadata={"help": "RSF: sampling temperature (> 0)."})
    rsf_top_p: float = field(default=1.0, metadata={"help": "RSF: nucleus sampling's mass."})
    rsf_max_new_tokens: int = field(default=256, metadata={"help": "RSF: tokens per sample at most."})
    hma_max_new_tokens: int = field(
        default=64, metadata={"help": "HMA with generated samples: tokens per answer at most."}
    )


class AlignmentTax(Recipe):
    name = "alignment_tax"
    arguments = AlignmentArguments
    unkeyed_fields = ("eval_batch_size", "generation_batch_size", "reward_batch_size")  # change no result: in no key
    training_arguments = SpecGenDPOConfig
    algorithms = ("dpo", "rsf")
    reference_method = "sft"

    def __init__(self, options: AlignmentArguments, seed: int) -> None:
        super().__init__(options, seed)
        self.test_data: Any = None  # `prepare` loads it
        self._reward: Any = None
        self._baseline: _Measured | None = None  # the SFT model's, measured once per process

    def local_paths(self) -> dict[str, str]:
        o = self.options
        names = {"dataset_name": o.dataset_name, "reward_model_name_or_path": o.reward_model_name_or_path}
        return {**super().local_paths(), **{k: v for k, v in names.items() if is_local_path(v)}}

    def prepare(self) -> None:
        o = self.options
        _check_options(o)
        check_suites(o.eval_suites)
        sides = [name for name in o.eval_suites if LM_SUITES[name].role != "generality"]
        if sides:
            raise ConfigError(
                f"eval_suites {sides} measure speciality; here the speciality is the reward: name generality "
                "suites only"
            )
        self.pretrained = check_model(o.model_name_or_path)
        self.train_data = _pairs(o.dataset_name, o.train_split, self.seed, o.max_train_samples)
        self.test_data = _pairs(o.dataset_name, o.test_split, self.seed, o.max_eval_prompts)
        # conversational pairs: the SFT model generates after its chat template, a reward model scores in its own
        messages = is_conversational(self.train_data[0]["prompt"]) or is_conversational(self.test_data[0]["prompt"])
        if messages and AutoTokenizer.from_pretrained(self.pretrained).chat_template is None:
            raise ConfigError(
                f"{o.dataset_name!r} holds conversational pairs, but model_name_or_path "
                f"{o.model_name_or_path!r} has no chat template to render them"
            )
        try:
            check_reward(o.reward_model_name_or_path, messages=messages)
        except ValueError as error:
            raise ConfigError(f"reward_model_name_or_path {error}") from error

    def load_model(self) -> tuple[Any, Any]:
        tokenizer = AutoTokenizer.from_pretrained(self.pretrained)
        model = AutoModelForCausalLM.from_pretrained(self.pretrained)
        if tokenizer.pad_token is None:
            tokenizer.pad_token_id = (
                model.config.pad_token_id if model.config.pad_token_id is not None else tokenizer.eos_token_id
            )
        return model, tokenizer

    def build_trainer(self, model: Any, tokenizer: Any, args: SpecGenDPOConfig, algorithm: str | None = None) -> Any:
        if algorithm == "rsf":
            samples = self._best_of_n(Path(args.output_dir).parent / RSF_SAMPLES)
            return SpecGenSFTTrainer(
                model=model, args=_sft_config(args), train_dataset=samples, processing_class=tokenizer
            )
        if hasattr(model, "peft_config"):  # a LoRA run: DPO wraps the base model itself, its reference the adapter off
            reference = {"peft_config": model.peft_config["default"]}
            model = model.unload()
        else:
            # loaded here like the policy (under ZeRO-3: partitioned, before the trainer finalizes DeepSpeed's config)
            reference = {"ref_model": self.load_model()[0]}
        return SpecGenDPOTrainer(
            model=model, args=args, train_dataset=self.train_data, processing_class=tokenizer, **reference
        )

    def _best_of_n(self, path: Path) -> datasets.Dataset:
        """The run's RSF data: sampled once by the main process (from a whole SFT model, whatever the
        launch partitions), written beside the run, read by every process (a resumed run reads it again)."""
        state, o = PartialState(), self.options
        if state.is_main_process and not path.is_file():
            with one_process_models():  # loaded whole; and `generate` does not wait for the other processes (ZeRO-3)
                model, tokenizer = self.load_model()
                rows = sample_best_of_n(
                    model.to(_device()),
                    tokenizer,
                    self.train_data["prompt"],
                    self._scorer(),
                    n=o.rsf_samples,
                    temperature=o.rsf_temperature,
                    top_p=o.rsf_top_p,
                    max_new_tokens=o.rsf_max_new_tokens,
                    batch_size=o.generation_batch_size,
                    seed=self.seed,
                    stop=o.stop_sequence,
                )
            with atomic_file(path) as temporary:  # a resumed run finds the whole file or none
                temporary.write_text("".join(json.dumps(row) + "\n" for row in rows))
            rewards = [row["reward"] for row in rows]
            print(
                f"[{self.name}] rsf: best of {o.rsf_samples} samples for {len(rows)} prompts, mean reward "
                f"{statistics.fmean(rewards):.3f}",
                flush=True,
            )
            del model
        state.wait_for_everyone()
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return datasets.Dataset.from_list(
            [{"prompt": r["prompt"], "completion": _answer_like(r["prompt"], r["completion"])} for r in rows]
        )

    def _scorer(self) -> Any:
        if self._reward is None:
            o = self.options
            options = (
                {}
                if is_rule(o.reward_model_name_or_path)
                else {"batch_size": o.reward_batch_size, "max_length": o.reward_max_length}
            )
            self._reward = load_reward(o.reward_model_name_or_path, **options)
        return self._reward

    def evaluate(self, model_dir: Path) -> dict[str, dict[str, float]]:
        o = self.options
        model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
        measured = self._measure(model, tokenizer)  # moves the model to the GPU where there is one
        if self._baseline is None:
            self._baseline = (
                measured if Path(model_dir) == Path(self.pretrained) else self._measure(*self.load_model())
            )
        base = self._baseline
        speciality = {
            "reward": statistics.fmean(measured.rewards),
            "win_rate": win_rate(measured.rewards, base.rewards),
            "preference_accuracy": implicit_reward_accuracy(
                measured.chosen, measured.rejected, base.chosen, base.rejected
            ),
        }
        generality = evaluate_suites(
            model,
            o.eval_suites,
            tokenizer=tokenizer,
            limit=o.eval_limit,
            num_fewshot=o.eval_num_fewshot,
            batch_size=o.eval_batch_size,
        )["generality"]
        return {"speciality": {name: speciality[name] for name in o.speciality_metrics}, "generality": generality}

    def _measure(self, model: Any, tokenizer: Any) -> _Measured:
        """A model's rewards on the held-out prompts and its log-probabilities of their pairs' answers."""
        o = self.options
        model.to(_device())
        given = self.test_data["prompt"]  # text or messages: the reward renders messages in its own format
        prompts = [prompt_text(p, tokenizer) for p in given]
        pairs = generate_completions(
            model,
            tokenizer,
            prompts,
            max_new_tokens=o.generation_max_new_tokens,
            batch_size=o.generation_batch_size,
            temperature=o.generation_temperature,
            top_p=o.generation_top_p,
            seed=self.seed,
            stop=o.stop_sequence,
        )
        rewards = self._scorer()(given, [completion for _, completion in pairs])
        chosen, rejected = ([answer_text(a) for a in self.test_data[side]] for side in ("chosen", "rejected"))
        batch = o.generation_batch_size
        return _Measured(
            rewards,
            completion_logps(model, tokenizer, prompts, chosen, batch_size=batch),
            completion_logps(model, tokenizer, prompts, rejected, batch_size=batch),
        )

    def search_group_alphas(
        self, finetuned: Path, groups: int, mean_alpha: float, experiment: ExperimentArguments
    ) -> GroupSearch:
        """HMA's ratios on the first `hma_max_samples` training prompts, each with the aligned model's greedy
        answer (`generated`, the paper's proxy) or the pair's chosen answer (`targets`)."""
        docs = self.train_data.select(range(min(experiment.hma_max_samples, len(self.train_data))))
        tokenizer = AutoTokenizer.from_pretrained(finetuned)
        prompts = [prompt_text(p, tokenizer) for p in docs["prompt"]]
        if experiment.hma_samples == "generated":
            model = AutoModelForCausalLM.from_pretrained(finetuned).to(_device())
            answers = generate_completions(
                model,
                tokenizer,
                prompts,
                max_new_tokens=self.options.hma_max_new_tokens,
                batch_size=self.options.generation_batch_size,
                stop=self.options.stop_sequence,
            )
            completions = [completion for _, completion in answers]
        else:
            completions = [answer_text(a) for a in docs["chosen"]]
        return search_group_alphas(
            self.pretrained,
            finetuned,
            list(zip(prompts, completions)),
            groups=groups,
            mean_alpha=mean_alpha,
            steps=experiment.hma_steps,
            seed=self.seed,
        )

    def fingerprint(self) -> dict[str, Any]:
        o = self.options
        return {
            "recipe": self.name,
            "model": o.model_name_or_path,
            "data": [o.dataset_name, o.train_split, o.max_train_samples],
        }

    def algorithm_fingerprint(self, algorithm: str) -> dict[str, Any]:
        if algorithm != "rsf":
            return {}
        o = self.options
        return {
            "reward": o.reward_model_name_or_path,
            "reward_max_length": o.reward_max_length,
            "samples": o.rsf_samples,
            "temperature": o.rsf_temperature,
            "top_p": o.rsf_top_p,
            "max_new_tokens": o.rsf_max_new_tokens,
            "stop": o.stop_sequence,
        }

    def eval_fingerprint(self) -> dict[str, Any]:
        o = self.options
        return {
            "suites": o.eval_suites,
            "limit": o.eval_limit,
            "fewshot": o.eval_num_fewshot,
            "test": [o.test_split, o.max_eval_prompts],
            "reward": [o.reward_model_name_or_path, o.reward_max_length],
            "metrics": o.speciality_metrics,
            "generation": [o.generation_max_new_tokens, o.generation_temperature, o.generation_top_p, o.stop_sequence],
        }

    def hma_fingerprint(self) -> dict[str, Any]:
        return {"max_new_tokens": self.options.hma_max_new_tokens, "stop": self.options.stop_sequence}


@dataclass(frozen=True)
class _Measured:
    rewards: list[float]  # per held-out prompt
    chosen: list[float]  # log-probability of each held-out pair's chosen answer
    rejected: list[float]


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _pairs(name: str, split: str, seed: int, max_samples: int | None) -> datasets.Dataset:
    """A preference split as prompt/chosen/rejected (`explicit_prompt`); a malformed pair is a `ConfigError`
    naming its row."""
    data = load_split(name, split, ("chosen", "rejected"), seed=seed, max_samples=max_samples)
    if not len(data):
        raise ConfigError(f"data set {name!r} ({split}) holds no pairs")

    def explicit(row: dict[str, Any], index: int) -> dict[str, Any]:
        try:
            return explicit_prompt(row)
        except ValueError as error:
            raise ConfigError(f"data set {name!r} ({split}), row {index}: {error}") from None

    return data.map(explicit, with_indices=True, remove_columns=data.column_names, desc="prompts")


def _answer_like(prompt: Any, completion: str) -> Any:
    """An RSF sample's answer in its prompt's format: text, or the assistant's message after a conversational
    prompt."""
    return [{"role": "assistant", "content": completion}] if is_conversational(prompt) else completion


def _sft_config(args: SpecGenDPOConfig) -> SpecGenSFTConfig:
    """RSF's SFT configuration: the run's training arguments and regularizers, DPO's options left out."""
    shared = {f.name: getattr(args, f.name) for f in dataclasses.fields(SpecGenTrainingArguments) if f.init}
    return SpecGenSFTConfig(**shared, max_length=args.max_length)


def _check_options(o: AlignmentArguments) -> None:
    unknown = [m for m in o.speciality_metrics if m not in SPECIALITY_METRICS]
    if unknown or not o.speciality_metrics or len(set(o.speciality_metrics)) != len(o.speciality_metrics):
        raise ConfigError(
            f"speciality_metrics must name one or more of {', '.join(SPECIALITY_METRICS)} once each, "
            f"got {o.speciality_metrics}"
        )
    for name in (
        "max_eval_prompts",
        "reward_batch_size",
        "generation_max_new_tokens",
        "generation_batch_size",
        "rsf_samples",
        "rsf_max_new_tokens",
        "hma_max_new_tokens",
    ):
        if getattr(o, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(o, name)}")
    if o.generation_temperature < 0 or o.rsf_temperature <= 0:
        raise ConfigError(
            f"generation_temperature must be >= 0 and rsf_temperature > 0, got {o.generation_temperature} "
            f"and {o.rsf_temperature}"
        )
    for name in ("generation_top_p", "rsf_top_p"):
        if not 0 < getattr(o, name) <= 1:
            raise ConfigError(f"{name} must be in (0, 1], got {getattr(o, name)}")
    if o.stop_sequence == "":
        raise ConfigError("stop_sequence is empty: give text to cut generations at, or leave it unset")


if __name__ == "__main__":
    AlignmentTax.main()
