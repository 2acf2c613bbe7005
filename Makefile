# dlm-pretrain: `make train` and `make test` set everything up on a fresh machine.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
RUN_DIR ?= runs/stdlib-cpu-$(shell date +%Y%m%d-%H%M%S)

.PHONY: install train test test-fast lint format bench clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch 2.13.0 first, so that nothing pulls a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Train the default tiny DLM on this Python's standard library (CPU, a few minutes).
train: install
	$(VENV)/bin/dlm train experiment=stdlib_cpu run.dir=$(RUN_DIR) $(ARGS)

## Lint, then the whole test suite (multi-process tests included).
test: install lint
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

## Skip the multi-process trainer runs.
test-fast: install
	$(PY) -m pytest -q -m "not slow" tests $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install
	$(PY) bench/train_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info
