# dlm-pretrain: `make train` and `make test` set everything up on a fresh machine.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
RUN_DIR ?= runs/stdlib-cpu-$(shell date +%Y%m%d-%H%M%S)

.PHONY: install data train test test-fast gpu-check lint format bench clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch 2.13.0 first, so that nothing pulls a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## The embedded corpus (this Python's standard library): a 4k BPE tokenizer, then shards
## of 128 tokens (conf/data/stdlib_shards.yaml reads them). Both steps are idempotent.
TOKENIZER := runs/data/tokenizer-stdlib/tokenizer.model
SHARDS    := runs/data/stdlib-128/manifest.json

$(TOKENIZER): | $(STAMP)
	$(VENV)/bin/dlm tokenizer input=[stdlib] output=$(dir $(TOKENIZER)) vocab_size=4096

$(SHARDS): $(TOKENIZER)
	$(VENV)/bin/dlm prepare input=[stdlib] output=$(dir $(SHARDS)) tokenizer=$(TOKENIZER) \
		seq_len=128 eval_fraction=0.01 samples_per_shard=256

data: $(SHARDS)

## Train the default tiny DLM on this Python's standard library (CPU, a few minutes).
train: install data
	$(VENV)/bin/dlm train experiment=stdlib_cpu run.dir=$(RUN_DIR) $(ARGS)

## Lint, then the whole test suite (multi-process tests included).
test: install lint
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

## Skip the multi-process trainer runs.
test-fast: install
	$(PY) -m pytest -q -m "not slow" tests $(PYTEST_ARGS)

## On a GPU machine: every gpu-marked test, a 20-step bf16 Transformer Engine run, and a
## tp=2 run with two GPUs; one verdict line (tests/gpu_check.py).
gpu-check: install
	$(PY) tests/gpu_check.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

## Benchmarks print figures (never asserted): trainer, data pipeline, HF conversion.
bench: install
	$(PY) bench/train_throughput.py
	$(PY) bench/prepare_throughput.py
	$(PY) bench/loader_throughput.py
	$(PY) bench/loader_sources.py
	$(PY) bench/convert_throughput.py
	$(PY) bench/curriculum_throughput.py
	$(PY) bench/engines.py
	$(PY) bench/pipeline_bubble.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info
