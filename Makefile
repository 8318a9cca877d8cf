# isoflop-engram — everything runs from a fresh clone: `make demo`, `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= data/stdlib_bpe8k
BUDGET ?= 6e12
# auto: the family whose budget range holds BUDGET (cpu, gpu, paper), said when picked; or name one
FAMILY ?= auto
RHOS   ?=
OUT    ?= sweeps_out
NPROC  ?= 1
SWEEP_ARGS ?=
PLAN_ARGS ?=
PYTEST_ARGS ?=

.PHONY: install data demo train test test-fast bench plan sweep study clean-demo

# torch first, from its CPU wheel: an unpinned resolve (or deepspeed first) pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

$(DATA)/manifest.json: | $(VENV)/.installed
	$(PY) -m data_prep.prepare --source stdlib --tokenizer bpe --vocab-size 8192 \
		--max-bytes 12000000 --val-fraction 0.05 --out $(DATA)

data: $(DATA)/manifest.json

# The main job on the embedded default: an allocation sweep (MoE + Engram, 4 rho, one seed) on this
# machine's Python stdlib, fitted, plotted and logged to offline W&B (sweeps/demo.py; 2m24s on 2 quiet cores).
DEMO_OUT ?= demo_out
demo: data
	OMP_NUM_THREADS=1 $(PY) -m sweeps.demo --out $(DEMO_OUT)

# One run under torchrun, e.g. `make train NPROC=2 ARGS="+experiment=engram_25pct"`.
train: data
	$(PY) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC) train/main.py $(ARGS)

test: install
	WANDB_MODE=disabled $(PY) -m pytest -q $(PYTEST_ARGS)

# tests/unit: one process, no training loop, no second rank; the slow ones (many solver calls, the
# calibration simulations) are left to `make test`. Under 2 minutes on 2 cores.
test-fast: install
	WANDB_MODE=disabled $(PY) -m pytest -q tests/unit -m "not slow" $(PYTEST_ARGS)

# CPU ratios, each measured side by side in one run (benchmarks/README.md records them with dates).
bench: data
	@echo "== benchmarks/bench_moe.py" && $(PY) benchmarks/bench_moe.py
	@echo "== benchmarks/bench_engram.py" && $(PY) benchmarks/bench_engram.py
	@echo "== benchmarks/bench_train.py" && OMP_NUM_THREADS=1 $(PY) benchmarks/bench_train.py \
		--experiment moe_baseline --experiment engram_25pct --steps 20 --repeats 3

# Print the iso-parameter / iso-FLOP family for a budget (no training).
# e.g. `make plan BUDGET=2e20 PLAN_ARGS="--ep-size 8 --round-experts-to-ep --engram-tables sharded"`
plan: install
	$(PY) -m sweeps.plan --budget $(BUDGET) --family $(FAMILY) $(if $(RHOS),--rho $(RHOS),) $(PLAN_ARGS)

sweep: data
	$(PY) -m sweeps.run --budget $(BUDGET) --family $(FAMILY) --out $(OUT) $(if $(RHOS),--rho $(RHOS),) $(SWEEP_ARGS)

clean-demo:
	rm -rf $(DEMO_OUT)

# A committed study (studies/<name>/study.yaml): trains only the points not yet in the folder, then
# rewrites its RESULTS.md and the README's results section, e.g. `make study STUDY=studies/cpu-allocation`.
STUDY ?= studies/cpu-allocation
study: data
	OMP_NUM_THREADS=1 $(PY) -m sweeps.study $(STUDY)
