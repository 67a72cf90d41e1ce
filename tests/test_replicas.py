"""Replicas behind HAProxy sharing HTTP episodes through Redis: ``bench/replicas.py --quick``
run as a subprocess (Redis, two replicas, a reference server and HAProxy on loopback),
checked on its JSON. Correctness only: the timings it reports are too noisy to assert on.

It needs Debian's ``redis-server`` and ``haproxy``; without them the test is skipped, unless
the environment variable ``CI`` is set (CI installs both), where it fails instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "replicas.py"
TIMEOUT_S = 300
STOP_TIMEOUT_S = 60
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
NEEDED = ("redis-server", "haproxy")


def missing_programs() -> list[str]:
    return [name for name in NEEDED if shutil.which(name, path=SEARCH_PATH) is None]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    missing = missing_programs()
    if missing:
        reason = (f"bench/replicas.py needs {' and '.join(missing)} "
                  "(apt-get install redis-server haproxy)")  # fmt: skip
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, and CI installs them")
        pytest.skip(reason)
    results = tmp_path_factory.mktemp("replicas")
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--quick", "--results", str(results)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the script stops Redis, the replicas and HAProxy first
        _, stderr = proc.communicate(timeout=STOP_TIMEOUT_S)
        pytest.fail(f"bench/replicas.py --quick took over {TIMEOUT_S} s:\n{stderr[-6000:]}")
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{stderr[-6000:]}"
    return json.loads((results / "replicas.json").read_text())


def test_episodes_stepped_across_replicas_match_one_server_byte_for_byte(report):
    eq = report["equivalence"]
    assert eq["episodes"] >= 6 and eq["steps_per_episode"] >= 10
    counts = {kind: value.split("/") for kind, value in eq["reference"]["solved"].items()}
    assert counts["correct"][0] == counts["correct"][1]  # the solution solves every task
    assert counts["wrong"][0] == "0"  # the stub solves none
    truncated = eq["reference"]["truncated"]["truncated"].split("/")
    assert truncated[0] == truncated[1]
    for path in ("direct", "haproxy"):
        run = eq[path]
        assert run["identical"] is True, (path, run["mismatches"])
        assert run["bodies"] == eq["bodies_per_run"] and run["mismatches"] == []
        assert len(run["requests_by_replica"]) == report["config"]["replicas"], run
    assert eq["direct"]["replica_switches"] == 1.0  # every step on another replica
    assert eq["haproxy"]["replica_switches"] > 0.5  # round robin without affinity
    lease = eq["concurrent_steps"]
    assert lease["serialised"] is True and lease["final_step_counts_ok"] is True, lease


def test_killed_replicas_websocket_clients_close_cleanly_reconnect_and_finish(report):
    kill = report["kill"]
    ws = kill["ws"]
    assert ws["on_victim"] >= ws["direct"] > 0
    assert ws["clean_closes"] == ws["on_victim"]
    assert set(ws["close_codes"]) == {"1001"}, ws["close_codes"]  # Going Away, no 1006
    assert ws["victim_clients_reconnected_and_finished"] == ws["on_victim"]
    assert kill["victim"] not in ws["reconnected_to"]
    assert ws["others_undisturbed"] is True
    assert ws["finished"] == ws["clients"]
    assert ws["identical"] is True, ws["mismatches"]


def test_http_episodes_survive_the_kill_with_no_step_lost_or_doubled(report):
    kill = report["kill"]
    http = kill["http"]
    assert http["finished"] == http["episodes"] > 0
    assert http["identical"] is True, http["mismatches"]  # every body as on one server
    assert http["mismatched_episodes"] == 0
    assert http["retries_total"] == sum(http["retries"].values())  # each retry counted
    assert kill["timeline_s"]["exit_after"] is not None
    assert kill["server_error_lines"] == 0, kill["server_error_samples"]


def test_the_restarted_replica_serves_again(report):
    restart = report["kill"]["restart"]
    assert restart["requests_served_by_victim"] > 0, restart
    assert restart["identical"] is True


def test_redis_and_memory_step_latencies_are_reported(report):
    latency = report["redis_latency"]
    for store in ("memory", "redis"):
        for action in ("VIEW_CODE", "RUN_TESTS"):
            numbers = latency[store][action]
            assert numbers["n"] > 0 and numbers["p50"] > 0 and numbers["p99"] > 0, numbers
        assert set(latency["difference_ms"]) == set(latency[store])
    assert latency["redis_commands_per_step"] > 0


def test_scaling_runs_every_point_without_errors(report):
    points = report["scaling"]["points"]
    assert [p["replicas"] for p in points] == [1, 2]
    for point in points:
        assert point["errors"] == 0, point["error_samples"]
        assert point["steps"] > 0 and point["ratio_to_1"] > 0
        assert len(point["sessions_by_replica"]) == point["replicas"]
