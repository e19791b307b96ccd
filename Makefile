# bertflow: `make quickstart` runs the whole workflow end to end; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.bertflow-installed

# Offline by design: nothing may fetch weights or data from a hub at run time.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
# MLflow: never unpickle model files; no telemetry (on by default in MLflow 3).
export MLFLOW_ALLOW_PICKLE_DESERIALIZATION := false
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export PYTHONUNBUFFERED := 1

.PHONY: setup test quickstart bench clean help

help:
	@echo "make quickstart  set up .venv, then run prep -> pretrain -> register -> fine-tune -> predict"
	@echo "make test        set up .venv, then run the test suite"
	@echo "make bench       run the benchmarks in bench/ (prints ratios against references)"
	@echo "make clean       remove run outputs (not .venv)"

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --durations=20 tests

quickstart: $(STAMP)
	$(VENV)/bin/bertflow quickstart

bench: $(STAMP)
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf quickstart_out mlruns.db mlartifacts runs .pytest_cache
