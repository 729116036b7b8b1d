"""Galactica on MedMCQA: speciality (medical exam accuracy) against generality (common sense,
instruction following), for every method and WiSE-FT alpha.

    accelerate launch recipes/galactica_med.py --config recipes/configs/galactica_med.yaml
    accelerate launch --config_file recipes/accelerate/zero3.yaml recipes/galactica_med.py \\
        --config recipes/configs/galactica_med.yaml --methods full l2 kd --push-to-hub me/galactica-med-wise
    python recipes/galactica_med.py --config recipes/configs/galactica_med_tiny.yaml   # offline, CPU

Prompt (`hf_specgen.data.medmcqa`): "Question: ...\\nOptions:\\nA. ...\\nB. ...\\nC. ...\\nD. ...\\nAnswer:"
followed by the text of the correct option; the loss is on the answer tokens only, and the
`medmcqa` suite scores the four options' texts after the same prompt (lm-eval, validation split).
Any field of `SpecGenTrainingArguments`, `ExperimentArguments` or `MedMCQAArguments` below can be
set in the YAML file or on the command line (which wins).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

from hf_specgen import SpecGenTrainer, SpecGenTrainingArguments
from hf_specgen.data.medmcqa import TRAINING_COLUMNS, answer, doc_to_text, tokenize_for_training
from hf_specgen.eval.suites import LM_SUITES, check_suites, evaluate_suites
from hf_specgen.experiment import ExperimentArguments, Recipe, check_model, is_local_path, load_split
from hf_specgen.merge import GroupSearch, generate_completions, search_group_alphas


@dataclass
class MedMCQAArguments:
    """The model, the MedMCQA-schema training data and the evaluation suites."""

    model_name_or_path: str = field(
        default="facebook/galactica-1.3b", metadata={"help": "Pre-trained causal LM: Hub id or directory."}
    )
    dataset_name: str = field(
        default="openlifescienceai/medmcqa", metadata={"help": "MedMCQA-schema data set: Hub id or directory."}
    )
    train_split: str = field(default="train", metadata={"help": "Split to fine-tune on."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Fine-tune on the first N questions only."})
    max_length: int = field(default=512, metadata={"help": "Longest training sequence (prompt + answer), in tokens."})
    eval_suites: list[str] = field(
        default_factory=lambda: ["medmcqa", "commonsense", "instruction"],
        metadata={
            "help": "Suites scored for every model: "
            + ", ".join(LM_SUITES)
            + " (speciality and generality both needed)."
        },
    )
    eval_limit: int | None = field(default=None, metadata={"help": "At most N examples per task (quick runs)."})
    eval_num_fewshot: int | None = field(default=None, metadata={"help": "Few-shot examples per question (lm-eval)."})
    eval_batch_size: int = field(default=16, metadata={"help": "Evaluation batch size."})
    hma_max_new_tokens: int = field(
        default=32,
        metadata={"help": "HMA with generated samples: answer tokens generated per prompt at most (one line kept)."},
    )


class GalacticaMed(Recipe):
    name = "galactica_med"
    arguments = MedMCQAArguments
    unkeyed_fields = ("eval_batch_size",)  # change no result: in no key

    def local_paths(self) -> dict[str, str]:
        name = self.options.dataset_name
        return {**super().local_paths(), **({"dataset_name": name} if is_local_path(name) else {})}

    def prepare(self) -> None:
        check_suites(self.options.eval_suites, both_sides=True)
        self.pretrained = check_model(self.options.model_name_or_path)
        self.train_data = load_split(
            self.options.dataset_name,
            self.options.train_split,
            TRAINING_COLUMNS,
            seed=self.seed,
            max_samples=self.options.max_train_samples,
        )

    def load_model(self) -> tuple[Any, Any]:
        tokenizer = AutoTokenizer.from_pretrained(self.pretrained)
        model = AutoModelForCausalLM.from_pretrained(self.pretrained)
        if tokenizer.pad_token is None:  # Galactica's tokenizer names no padding token; its config does
            tokenizer.pad_token_id = (
                model.config.pad_token_id if model.config.pad_token_id is not None else tokenizer.eos_token_id
            )
        return model, tokenizer

    def build_trainer(
        self, model: Any, tokenizer: Any, args: SpecGenTrainingArguments, algorithm: str | None = None
    ) -> SpecGenTrainer:
        train = self.train_data.map(
            lambda doc: tokenize_for_training(doc, tokenizer, self.options.max_length),
            remove_columns=self.train_data.column_names,
            desc="tokenizing",
        )
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
        return SpecGenTrainer(
            model=model, args=args, train_dataset=train, data_collator=collator, processing_class=tokenizer
        )

    def evaluate(self, model_dir: Path) -> dict[str, dict[str, float]]:
        # In memory on this process: lm-eval would otherwise split the data over a launch's processes.
        model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
        options = self.options
        return evaluate_suites(
            model,
            options.eval_suites,
            tokenizer=tokenizer,
            limit=options.eval_limit,
            num_fewshot=options.eval_num_fewshot,
            batch_size=options.eval_batch_size,
        )

    def search_group_alphas(
        self, finetuned: Path, groups: int, mean_alpha: float, experiment: ExperimentArguments
    ) -> GroupSearch:
        """HMA's ratios on the first `hma_max_samples` training questions: each prompt with the fine-tuned
        model's greedy answer, its first line (`generated`), or the correct option's text (`targets`)."""
        docs = self.train_data.select(range(min(experiment.hma_max_samples, len(self.train_data))))
        prompts = [doc_to_text(doc) for doc in docs]
        if experiment.hma_samples == "generated":
            model, tokenizer = (
                AutoModelForCausalLM.from_pretrained(finetuned),
                AutoTokenizer.from_pretrained(finetuned),
            )
            model.to("cuda" if torch.cuda.is_available() else "cpu")
            answers = generate_completions(
                model,
                tokenizer,
                prompts,
                max_new_tokens=self.options.hma_max_new_tokens,
                batch_size=self.options.eval_batch_size,
            )
            completions = [completion.split("\n")[0] + "\n" for _, completion in answers]  # an answer is one line
        else:
            completions = [f" {answer(doc)}\n" for doc in docs]  # as `tokenize_for_training` trains it
        return search_group_alphas(
            self.pretrained,
            finetuned,
            list(zip(prompts, completions)),
            groups=groups,
            mean_alpha=mean_alpha,
            steps=experiment.hma_steps,
            max_length=self.options.max_length,
            seed=self.seed,
        )

    def fingerprint(self) -> dict[str, Any]:
        o = self.options
        return {
            "recipe": self.name,
            "model": o.model_name_or_path,
            "data": [o.dataset_name, o.train_split, o.max_train_samples],
            "max_length": o.max_length,
        }

    def eval_fingerprint(self) -> dict[str, Any]:
        o = self.options
        return {"suites": o.eval_suites, "limit": o.eval_limit, "fewshot": o.eval_num_fewshot}

    def hma_fingerprint(self) -> dict[str, Any]:
        return {"max_new_tokens": self.options.hma_max_new_tokens}


if __name__ == "__main__":
    GalacticaMed.main()
