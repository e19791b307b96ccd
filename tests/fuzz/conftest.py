"""Fuzz suite plumbing: shared Hypothesis settings, and a terminal summary of how many
inputs each reader was given (printed with or without -s)."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, settings

# Every example must finish in seconds (a hang fails the test, not the machine); no
# example database is written into the repository.
settings.register_profile(
    "bertflow-fuzz", max_examples=150, deadline=5000, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture])

INPUTS_TRIED: Counter = Counter()
OUTCOMES: dict[str, Counter] = {}


@pytest.fixture(scope="session")
def tried():
    """Call `tried(reader, outcome)` once per input: counted for the summary."""
    def record(reader: str, outcome: str = "read") -> None:
        INPUTS_TRIED[reader] += 1
        OUTCOMES.setdefault(reader, Counter())[outcome] += 1
    return record


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not INPUTS_TRIED:
        return
    terminalreporter.write_sep("-", "fuzz: inputs tried per reader")
    for reader in sorted(INPUTS_TRIED):
        outcomes = ", ".join(f"{k} {v}" for k, v in OUTCOMES[reader].most_common())
        terminalreporter.write_line(f"{reader:28s} {INPUTS_TRIED[reader]:6d}  ({outcomes})")
    terminalreporter.write_line(f"{'total':28s} {sum(INPUTS_TRIED.values()):6d}")
