# hf_specgen: `make install` once, then `make demo`, `make test`, `make bench`; `make foundations`, `make phenomenon` (tiny foundations).
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install lint docs demo test bench selection foundations phenomenon tiny-sweep clean

# torch==2.13.0 first: its CPU wheel lies on disk; any other torch request pulls a CUDA build.
install:
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install torch==2.13.0
	$(VENV)/bin/pip install -e ".[dev,docs,deepspeed,trl]"

# The three recipes on their tiny offline presets, two at a time (one CPU thread each: the tiny models train
# 1.5x faster per core that way than one recipe on two threads; the alignment tax after the CLIP, the
# shorter of the two): every method, L2-SP at 3 strengths and
# LoRA at 2 ranks, alphas 0.5 and 1, an early-stopping point, an auto-alpha pick for full fine-tuning;
# the alignment tax: DPO plain and regularized, LoRA, RSF; a report per recipe and one over all three
# (results/demo/). Re-running skips what is done.
LAUNCH = $(VENV)/bin/accelerate launch --cpu --num_processes 1 --num_cpu_threads_per_process 1 --num_machines 1 --mixed_precision no --dynamo_backend no
demo:
	$(LAUNCH) recipes/galactica_med.py --config recipes/configs/galactica_med_tiny.yaml --output_dir results/demo/galactica_med & lm=$$!; \
	( $(LAUNCH) recipes/clip_imagenet.py --config recipes/configs/clip_tiny.yaml --output_dir results/demo/clip_imagenet && \
	  $(LAUNCH) recipes/alignment_tax.py --config recipes/configs/alignment_tax_tiny.yaml --output_dir results/demo/alignment_tax ) & clip=$$!; \
	wait $$lm; lm_status=$$?; wait $$clip; clip_status=$$?; \
	test $$lm_status -eq 0 -a $$clip_status -eq 0
	$(VENV)/bin/specgen report --combine results/demo/galactica_med results/demo/clip_imagenet results/demo/alignment_tax --output-dir results/demo

# ruff (pyproject.toml): lint and formatting, checked, not rewritten; `$(VENV)/bin/ruff format .` rewrites.
lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The documentation site (docs/, mkdocs.yml) into site/, offline, warnings as errors (extra [docs]).
docs:
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

test:
	$(PYTHON) -m pytest -q --timeout 900 tests

bench:
	$(PYTHON) benchmarks/bench_trainer.py --output benchmarks/results/trainer.json
	$(PYTHON) benchmarks/bench_trainer.py --shape galactica-125m --output benchmarks/results/trainer_125m.json
	$(PYTHON) benchmarks/bench_trainer.py --suite trl --output benchmarks/results/trainer_trl.json
	$(PYTHON) benchmarks/bench_merge.py --output benchmarks/results/merge.json

# Auto alpha against 5- and 11-point grids, HMA against uniform averaging, on the demo's fine-tunes
# (after `make demo`; its copies run in /tmp, the demo's reports stay as they are).
selection:
	$(PYTHON) benchmarks/bench_selection.py --output benchmarks/results/selection.json

# Rebuild the shipped tiny foundations (hf_specgen/tiny/models/) from their seeds (builders: tools/tiny/).
foundations:
	$(PYTHON) -m tools.tiny.build

# Forgetting in the tiny foundations, measured: fine-tune, WiSE-FT 0.5, score (table in docs/guides/tiny-foundations.md).
phenomenon:
	$(PYTHON) -m tools.tiny.phenomenon --workdir /tmp/hf_specgen_phenomenon --output benchmarks/results/phenomenon.md

# WiSE-FT sweep of the phenomenon's fine-tunes, scored and reported (after `make phenomenon`).
tiny-sweep:
	PYTHON=$(PYTHON) bash benchmarks/tiny_wise_ft_sweep.sh

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
