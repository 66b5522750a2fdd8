"""Suite-wide fixtures: a place for tests to record what they observed.

Tests call `observe(section, line)` (a session fixture) to note measured figures, such as the
largest difference to onnxruntime, a session's creation time or the ops an exporter emitted;
they are printed in pytest's closing summary, grouped by section, so a plain `pytest -q` run
shows them. SPARSEDNN_TEST_REPORT=path also writes them there as JSON.
"""

from __future__ import annotations

import json
import os

import pytest

_OBSERVATIONS: dict[str, list[str]] = {}


def record_observation(section: str, line: str) -> None:
    _OBSERVATIONS.setdefault(section, []).append(line)


@pytest.fixture(scope="session")
def observe():
    """observe(section, line): keep a measured figure for the closing summary."""
    return record_observation


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _OBSERVATIONS:
        return
    terminalreporter.write_sep("=", "observations")
    for section, lines in _OBSERVATIONS.items():
        terminalreporter.write_line(f"[{section}]")
        for line in lines:
            terminalreporter.write_line(f"  {line}")
    path = os.environ.get("SPARSEDNN_TEST_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(_OBSERVATIONS, f, indent=1)
