"""Scaled-down sessions benchmark: 32 concurrent WebSocket sessions, each resetting and
playing 20 mixed steps through openenv's client. Asserts correctness, not timing."""

from __future__ import annotations

import sys

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

import sessions_bench  # noqa: E402


def test_32_concurrent_sessions_complete_without_errors():
    result = sessions_bench.bench(sessions=32, steps=20)
    assert result["errors"] == 0, result["error_samples"]
    assert result["completed"] == 32
    latency = result["latency_ms"]
    assert latency["RESET"]["n"] == 32 and latency["SUBMIT"]["n"] == 32
    assert latency["RUN_TESTS"]["n"] == 32 * 4
