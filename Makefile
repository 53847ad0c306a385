# The course in two commands:  `make course` (set up, then JupyterLab)  and  `make test`.
# Set-up is done once: re-running either skips every install (a stamp file records it).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.course-installed
HOST ?= 127.0.0.1
PORT ?= 8888
# Jupyter refuses to run as root unless told to (containers, CI, Colab-like machines).
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root)
# A Linux laptop without an NVIDIA GPU: `make course TORCH_INDEX=https://download.pytorch.org/whl/cpu`
# installs PyTorch's CPU-only wheel (a few hundred MB) before the rest, instead of the default
# build from PyPI, which brings several GB of CUDA libraries (docs/setup.md).
TORCH_INDEX ?=
TORCH_PIN := $(shell sed -n 's/^torch==//p' requirements.txt)
# Per-cell time limit for notebooks under test (seconds).
CELL_TIMEOUT ?= 900
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# torch's OpenMP threads spin after each parallel region (libgomp's default: ~300,000 turns).
# On 2 cores shared with anything else (a browser, a second kernel, a busy CI host) the spinning
# starves the thread it waits for: lessons 02+05 took 465 s instead of 95 s with one core busy,
# 185 s with a spin count of 10,000, which cost 3 % on an idle machine (98 s; docs/setup.md).
export GOMP_SPINCOUNT ?= 10000

.PHONY: course setup model browser sandbox test lint bench sweeps results timings exercises check-exercises grade clean help
OUT ?= outputs/grading

help:
	@echo "make course   set up (once) and start JupyterLab on notebooks/00_start_here.ipynb;"
	@echo "              your exercises go to my-work/ (INSTRUCTOR=1: every file and nbgrader's tools)"
	@echo "make test     set up (once) and run the whole test suite (lint, unit, notebooks)"
	@echo "make lint     ruff check + ruff format --check over course_utils, course_tools, tests, notebooks"
	@echo "make timings  run every notebook with the full profile and record its wall time"
	@echo "make bench    speed, MFU and peak memory of full/LoRA/QLoRA, scoring speed, estimator vs measured (bench/results/)"
	@echo "make exercises  regenerate exercises/ (student versions) from solutions/ (nbgrader)"
	@echo "make grade SUBMISSIONS=dir/  grade dir/<student>/<notebook>.ipynb into $(OUT)/grades.csv"
	@echo "make sweeps   every run of lesson 08's hyperparameter grid (about an hour; docs/hyperparameters.md)"
	@echo "make results  full FT, LoRA and QLoRA on three tasks, one table (15 runs; docs/results_table.md)"
	@echo "make frameworks  Axolotl and LLaMA-Factory in their own environments (lesson 11; GBs, minutes)"
	@echo "make test-frameworks  train each framework a few steps and load its adapter (after make frameworks)"

setup: $(STAMP)

# The virtual environment and everything in it. Re-made only when a requirements file changes.
$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] >= (3, 10), "Python 3.10+ needed (3.11 is the tested one)"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(TORCH_INDEX),$(BIN)/python -m pip install -q torch==$(TORCH_PIN) --index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements-nodeps.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

# The offline model: GGUF -> fp32 safetensors in the cache, once (checksums verified every time).
# Then GOMP_SPINCOUNT for every Python of .venv (a .pth file: a plain `jupyter lab` or VS Code
# kernel gets it too, not only what make starts).
model: setup
	$(BIN)/python -m course_utils.assets --prepare
	$(BIN)/python -c 'from course_utils import env; env.main(["--install-openmp-setting"])'

course: model
	$(BIN)/python -m course_tools.lab --ip=$(HOST) --port=$(PORT) $(if $(INSTRUCTOR),--instructor) \
		-- $(ROOT_FLAG) $(LAB_ARGS)

# Debian's chromium for the widget tests in a real browser (Playwright drives it; it never
# downloads a browser of its own). Installed with apt-get when we are root and it is missing.
browser:
	@command -v chromium >/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
		else echo "Install Debian's chromium (sudo apt-get install chromium) for the browser tests."; exit 1; fi; }

# bubblewrap for grading in an OS sandbox (course_tools/grading/isolation.py), installed the way
# chromium is; prlimit and setpriv come with util-linux. Without it grading falls back to the
# in-process guard and says so.
sandbox:
	@command -v bwrap >/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap; \
		else echo "For grading in an OS sandbox install bubblewrap (sudo apt-get install bubblewrap)."; fi; }

lint: setup
	$(BIN)/ruff check conftest.py course_utils course_tools examples tests notebooks solutions
	$(BIN)/ruff format --check conftest.py course_utils course_tools examples tests notebooks solutions

# The exercise masters in solutions/ are executed by `nbgrader validate` (tests/notebooks/test_exercises.py),
# which also checks that every graded cell passes, so nbval does not run them a second time.
# Two pytest workers with one torch thread each (TEST_WORKERS=0 runs in one process with torch's
# default threads): in one process the suite kept 1.4 of 2 cores busy, waiting on kernels,
# browsers and subprocesses; two workers took 22 min instead of 33 on the AMD EPYC (docs/tests.md,
# Tests). A file's tests (a notebook's cells) stay on one worker; conftest.py keeps a lesson's
# two runs from overlapping.
TEST_WORKERS ?= 2
TEST_THREADS := $(if $(filter 0,$(TEST_WORKERS)),,OMP_NUM_THREADS=1)
test: model browser sandbox lint
	COURSE_PROFILE=ci HF_HUB_OFFLINE=1 MPLBACKEND=Agg $(TEST_THREADS) $(BIN)/python -m pytest \
		tests notebooks -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder \
		--nbval-lax --nbval-current-env --nbval-cell-timeout=$(CELL_TIMEOUT) --durations=30 \
		--junitxml=outputs/test-artifacts/junit.xml $(PYTEST_ARGS)

# Lesson 08's evidence: every run of the hyperparameter grid, two at a time (58 min on 2 cores),
# written to course_utils/data/sweeps.json, docs/hyperparameters.md and its figure. Not part of
# `make test`; an interrupted sweep goes on where it stopped (SWEEP_ARGS=--fresh starts over).
sweeps: model
	HF_HUB_OFFLINE=1 MPLBACKEND=Agg $(BIN)/python -m course_tools.sweeps --jobs 2 $(SWEEP_ARGS)

# The three-domain table: full fine-tuning, LoRA (4,16) (8,32) (16,32) and QLoRA (16,32) on the
# classification, causal-LM and rentals tasks (course_utils/data/results.json,
# docs/results_table.md; 15 runs of 16 steps, 26 min on 2 cores). Not part of `make test`.
results: model
	HF_HUB_OFFLINE=1 MPLBACKEND=Agg $(BIN)/python -m course_tools.results --jobs 2 $(RESULTS_ARGS)

timings: model
	$(BIN)/python -m course_tools.timings notebooks/*.ipynb

# The performance record: speed, MFU and peak memory of full / LoRA / QLoRA (bench/results/),
# then the memory estimator against a hand-written training step. Not part of `make test`.
bench: model
	HF_HUB_OFFLINE=1 MPLBACKEND=Agg $(BIN)/python -m course_tools.bench train --out bench/results
	HF_HUB_OFFLINE=1 MPLBACKEND=Agg $(BIN)/python -m course_tools.bench train --data chat \
		--out bench/results
	HF_HUB_OFFLINE=1 $(BIN)/python -m course_tools.bench loss --out bench/results
	HF_HUB_OFFLINE=1 $(BIN)/python -m course_tools.bench eval --out bench/results
	set -o pipefail; HF_HUB_OFFLINE=1 $(BIN)/python -m course_tools.bench memory \
		--json bench/results/memory.json | tee bench/results/memory.txt

# Graded exercises (nbgrader, configured in course_tools/grading/config.py); never edit exercises/ by hand.
exercises: setup
	$(BIN)/python -m course_tools.grading generate

check-exercises: setup
	$(BIN)/python -m course_tools.grading validate

# SUBMISSIONS/<student>/<notebook>.ipynb -> $(OUT)/grades.csv + $(OUT)/feedback/
grade: setup sandbox
	@test -n "$(SUBMISSIONS)" || { echo "usage: make grade SUBMISSIONS=path/ [OUT=outputs/grading] [GRADE_ARGS='--jobs 2']"; exit 2; }
	$(BIN)/python -m course_tools.grading "$(SUBMISSIONS)" --out "$(OUT)" $(GRADE_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache

# Lesson 11's frameworks, each in its own virtual environment (their pins clash with .venv's):
# `make frameworks` builds both, once (Axolotl 4.3 GB, LLaMA-Factory 2.1 GB; 3 and 4 min here with
# pip's cache warm, up to 9 and 5 min without). TORCH_INDEX works as for `make setup`.
# PyPI has no CPU build of torchvision/torchaudio, and its CUDA builds fail to load beside the
# CPU torch: torchvision goes (neither framework imports it); LLaMA-Factory imports torchaudio,
# so it keeps its pure-Python part without the CUDA-linked libraries (torchaudio then reports
# its extension unavailable, the case it supports; only audio datasets would need it).
.PHONY: axolotl llamafactory frameworks test-frameworks

axolotl: .venv-axolotl/.course-installed
llamafactory: .venv-llamafactory/.course-installed
frameworks: axolotl llamafactory

.venv-%/.course-installed: requirements-%.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 needed (Axolotl 0.19, the CPU torch wheel)"'
	test -x .venv-$*/bin/python || $(PYTHON) -m venv .venv-$*
	.venv-$*/bin/python -m pip install -q --upgrade pip
	$(if $(TORCH_INDEX),.venv-$*/bin/python -m pip install -q torch==$(TORCH_PIN) --index-url $(TORCH_INDEX))
	.venv-$*/bin/python -m pip install -q -r requirements-$*.txt
	.venv-$*/bin/python -m pip uninstall -q -y torchvision
	rm -f .venv-$*/lib/python3.11/site-packages/torchaudio/lib/*.so
	touch $@

# Trains each framework a few steps and loads its adapter in .venv (tests/frameworks), then runs
# lesson 11 with the environments (make test runs it without them). A clean clone gets the course
# environment and model first; an existing .venv is used as it is.
test-frameworks: frameworks $(if $(wildcard $(STAMP)),,model)
	COURSE_PROFILE=ci HF_HUB_OFFLINE=1 COURSE_FRAMEWORKS=1 MPLBACKEND=Agg $(BIN)/python -m pytest \
		tests/frameworks notebooks/11_frameworks.ipynb --nbval-lax --nbval-current-env $(PYTEST_ARGS)
