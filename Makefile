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

.PHONY: setup compile postgres test quickstart bench clean help

help:
	@echo "make quickstart  set up .venv, then run prep -> pretrain -> register -> fine-tune -> predict"
	@echo "make test        set up .venv, then run the test suite"
	@echo "make bench       run the benchmarks in bench/ (prints ratios against references)"
	@echo "make clean       remove run outputs (not .venv)"

setup: $(STAMP)

# uv installs the same pinned set, downloading in parallel: the one on the PATH, else one
# pip puts in the venv first (a second or two); `make UV=pip setup` keeps to pip alone.
# pip's find-links (a local wheel folder, e.g. the CPU torch build) reach uv too;
# pip.conf's other settings do not. Should uv fail, pip installs the same set.
UV ?= $(shell command -v uv 2>/dev/null)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	uv="$(UV)"; \
	if [ -z "$$uv" ] && $(PY) -m pip install -q -c constraints.txt uv 2>/dev/null; then \
	  uv=$(VENV)/bin/uv; fi; \
	if [ "$$uv" != pip ] && [ -n "$$uv" ] && $$uv pip install -q --python $(PY) \
	    -c constraints.txt $${PIP_FIND_LINKS:+--find-links $$PIP_FIND_LINKS} -e ".[dev]"; then \
	  :; \
	else \
	  $(PY) -m pip install -q --upgrade pip && \
	  $(PY) -m pip install -q -c constraints.txt -e ".[dev]"; \
	fi
	$(COMPILE) "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
	  >/dev/null 2>&1 || true
	touch $(STAMP)

# Bytecode, written once: where PYTHONDONTWRITEBYTECODE is set (this machine's image sets
# it) no process writes .pyc files, so every process (each Ray worker and Train
# controller, each CLI call) compiled every module it imported again: `import mlflow`
# took 2.9 s instead of 1.2 s, and a Train run's start ~30% longer. In the venv, some
# packages ship files of another Python's syntax that compileall reports (and skips): its
# status there is not the install's. bertflow's own files are compiled before each
# test, quickstart and bench run (only what changed; a second).
COMPILE = $(PY) -m compileall -q -j 0
compile: $(STAMP)
	@$(COMPILE) bert_core data_prep workflows tests bench

# The cluster test (tests/test_cluster_e2e.py) runs PostgreSQL's initdb and pg_ctl: install
# Debian's postgresql when they are missing (as root; otherwise that test is skipped).
postgres:
	@if ! { command -v pg_ctl && command -v initdb; } >/dev/null 2>&1 && \
	    ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing PostgreSQL (apt-get install postgresql) for the cluster test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	  else \
	    echo "PostgreSQL's server programs are missing: the cluster test will be skipped (apt-get install postgresql)"; \
	  fi; \
	fi

test: $(STAMP) compile postgres
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=30 tests

quickstart: $(STAMP) compile
	$(VENV)/bin/bertflow quickstart

bench: $(STAMP) compile
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf quickstart_out mlruns.db mlartifacts runs .pytest_cache
