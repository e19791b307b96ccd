"""`bertflow --help` and `bertflow VERB --help` work for every verb, without heavy imports."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from workflows.cli import VERBS

HEAVY = ("torch", "ray", "mlflow", "transformers", "pyarrow")


def run_cli(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "workflows.cli", *args],
                          capture_output=True, text=True, timeout=120)
    return proc, time.perf_counter() - start


def test_top_level_help_lists_every_verb():
    proc, seconds = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    for verb in VERBS:
        assert f"  {verb}" in proc.stdout
    print(f"bertflow --help: {seconds:.2f} s")


@pytest.mark.parametrize("verb", list(VERBS))
def test_every_verb_has_help(verb):
    proc, seconds = run_cli(verb, "--help")
    assert proc.returncode == 0, f"bertflow {verb} --help failed:\n{proc.stderr[-2000:]}"
    assert f"bertflow {verb}" in proc.stdout and "usage:" in proc.stdout
    print(f"bertflow {verb} --help: {seconds:.2f} s")  # reported, never asserted


@pytest.mark.parametrize("verb", list(VERBS))
def test_verb_help_imports_no_heavy_library(verb):
    # Instant help is a design rule: verb modules import torch/ray/mlflow inside run().
    code = ("import sys\nfrom workflows.cli import main\n"
            f"try:\n    main([{verb!r}, '--help'])\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_unknown_verb_names_the_valid_ones():
    proc, _ = run_cli("pretrian")
    assert proc.returncode == 2
    assert "unknown verb 'pretrian'" in proc.stderr and "pretrain" in proc.stderr


@pytest.mark.parametrize("argv,expected", [
    (["jobs", "stop"], "the following arguments are required: ID"),
    (["registry", "promote", "bert", "3"], "--alias"),
    (["submit", "serve"], "invalid choice"),
])
def test_usage_errors_say_what_is_missing(argv, expected):
    proc, _ = run_cli(*argv)
    assert proc.returncode == 2 and expected in proc.stderr
