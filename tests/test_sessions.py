"""Scaled-down sessions benchmark: 32 concurrent sessions, each resetting and playing 20
mixed steps, over WebSocket (openenv's client) and over stateful HTTP episodes. Asserts
correctness, not timing."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

import sessions_bench  # noqa: E402

SESSIONS = 32


@pytest.mark.parametrize("transport", ["ws", "http"])
def test_32_concurrent_sessions_complete_without_errors(transport):
    result = sessions_bench.bench(sessions=SESSIONS, steps=20, transport=transport)
    assert result["errors"] == 0, result["error_samples"]
    assert result["completed"] == SESSIONS
    latency = result["latency_ms"]
    assert latency["RESET"]["n"] == SESSIONS and latency["SUBMIT"]["n"] == SESSIONS
    assert latency["RUN_TESTS"]["n"] == SESSIONS * 4
    # Closing sessions must not log tracebacks (openenv 0.3's /ws close race).
    assert result["server_error_lines"] == 0, result["server_error_samples"]
