"""The soak in small: a few hundred WebSocket episodes, honest and hostile, against one
server, then nothing may be left over. The full run (6,000 episodes, and a flat RSS) is
``uv run python bench/soak_bench.py`` or ``uv run pytest -m slow``."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

import soak_bench  # noqa: E402


def check_clean(result: dict) -> None:
    assert result["errors"] == 0, result["error_samples"]
    assert result["orphans"] == 0 and result["leftover_entries"] == 0, result["after"]
    assert result["processes_after_stop"] == 0 and result["left_behind_after_stop"] == []
    assert result["server_tracebacks"] == 0 and result["server_error_lines"] == 0
    assert result["sandbox_faults"] == 0 and result["sandbox_respawns"] == 0
    # no descriptor leaked (the "before" sample may still count the health probe's socket)
    assert result["after"]["server_fds"] <= result["before"]["server_fds"]


def test_soak_smoke():
    check_clean(soak_bench.soak(episodes=300, concurrency=16))


@pytest.mark.slow
def test_soak_6000_episodes():
    result = soak_bench.soak(episodes=soak_bench.EPISODES)
    check_clean(result)
    assert result["rss_flat"], (result["rss_growth_after_warm_up_mib"],
                                result["rss_slope_mib_per_1000_episodes"])  # fmt: skip
