"""Graceful shutdown (``server/serve.py``): SIGTERM under load and SIGINT when idle end the
server within ``SHUTDOWN_BUDGET_S`` (3 s, the requirement), with WebSocket sessions closed
with 1001, HTTP requests answered, no traceback in the log, no process left and the
sandbox root emptied."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.conftest import ServerProcess
from tests.test_ws import SLOW, TASK, WAIT_S, eventually, frame, ws_url
from tracefix_rl.sandbox.pool import ROOT_LOCK_SUFFIX
from tracefix_rl.server.serve import SHUTDOWN_BUDGET_S

WS_SESSIONS = 3
HTTP_SLOW_EPISODES = 2
WORKERS = 2


def processes() -> dict[int, list[str]]:
    """The fields of /proc/<pid>/stat after the command name (state, ppid, pgrp, ...)."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                found[int(entry)] = (
                    Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                )
            except OSError:
                continue
    return found


def descendants(pid: int) -> dict[int, str]:
    """Every process below ``pid`` (by parent id), with its start time to rule out pid reuse."""
    parents: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry, fields in processes().items():
        parents.setdefault(int(fields[1]), []).append(entry)
        starts[entry] = fields[19]
    found, todo = {}, [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found[child] = starts[child]
            todo.append(child)
    return found


def alive(pid: int, start: str) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[19] == start and fields[0] != "Z"


def in_group(pgid: int) -> list[int]:
    return [
        pid for pid, fields in processes().items() if int(fields[2]) == pgid and fields[0] != "Z"
    ]


def stop_and_time(proc: ServerProcess, sig: int) -> tuple[float, str]:
    """Send ``sig`` and wait for the exit; the seconds it took and the server's log."""
    started = time.monotonic()
    os.kill(proc.proc.pid, sig)
    proc.proc.wait(timeout=WAIT_S)
    elapsed = time.monotonic() - started
    print(f"{signal.Signals(sig).name}: exited in {elapsed:.2f} s")  # shown with pytest -s
    return elapsed, proc.log()


def assert_clean_exit(proc: ServerProcess, before: dict[int, str], root: Path, log: str) -> None:
    assert "Traceback" not in log, log
    assert "Exception in ASGI application" not in log, log
    assert [pid for pid, start in before.items() if alive(pid, start)] == []
    assert in_group(proc.proc.pid) == []
    assert list(root.iterdir()) == []


def test_sigterm_under_load_closes_everything_within_the_budget(tmp_path):
    root = tmp_path / "sandbox-root"
    proc = ServerProcess(extra_env={
        "SANDBOX_ROOT": str(root), "SANDBOX_WORKERS": str(WORKERS), "LOG_LEVEL": "INFO",
        "SANDBOX_WALL_TIMEOUT_S": "240", "SANDBOX_TEST_TIMEOUT_S": "120",
        "SANDBOX_CPU_S": "240", "SANDBOX_QUEUE_TIMEOUT_S": "120",
    })  # fmt: skip
    threads = ThreadPoolExecutor(max_workers=8)
    with contextlib.ExitStack() as stack:
        stack.callback(proc.stop)
        stack.callback(threads.shutdown, wait=False, cancel_futures=True)
        sockets = []
        for index in range(WS_SESSIONS):  # slow RUN_TESTS: some run, the rest queue
            sock = stack.enter_context(connect(ws_url(proc)))
            sockets.append(sock)
            for message in (frame("reset", {"task_id": TASK}), frame("step", SLOW)):
                sock.send(message)
                assert json.loads(sock.recv(timeout=WAIT_S))["type"] == "observation", index
            sock.send(frame("step", {"action_type": "RUN_TESTS"}))

        http = stack.enter_context(httpx.Client(base_url=proc.url, timeout=WAIT_S))

        def slow_http_step(name: str) -> int:
            reset = http.post("/reset", json={"task_id": TASK, "episode_id": name})
            assert reset.status_code == 200, reset.text
            step = http.post("/step", json={"episode_id": name, "action": SLOW})
            assert step.status_code == 200, step.text
            run = {"episode_id": name, "action": {"action_type": "RUN_TESTS"}}
            with httpx.Client(base_url=proc.url, timeout=WAIT_S) as own:
                return own.post("/step", json=run).status_code

        def quick_http_steps() -> list[Any]:
            outcomes: list[Any] = []
            view = {"episode_id": "quick", "action": {"action_type": "VIEW_CODE"}}
            with httpx.Client(base_url=proc.url, timeout=WAIT_S) as own:
                own.post("/reset", json={"task_id": TASK, "episode_id": "quick"})
                while True:
                    try:
                        outcomes.append(own.post("/step", json=view).status_code)
                    except httpx.HTTPError as exc:  # the server has stopped listening
                        outcomes.append(type(exc).__name__)
                        return outcomes

        slow = [threads.submit(slow_http_step, f"h{i}") for i in range(HTTP_SLOW_EPISODES)]
        quick = threads.submit(quick_http_steps)

        def sandbox() -> dict[str, Any]:
            return http.get("/health").json()["sandbox"]

        # at least: the quick episode reaches max_steps after 50 VIEW_CODEs, and its final
        # grading queues too
        busy = WS_SESSIONS + HTTP_SLOW_EPISODES
        eventually(lambda: (s := sandbox())["in_flight"] + s["queued"] >= busy, "a busy sandbox")
        assert sandbox()["in_flight"] == WORKERS
        before = descendants(proc.proc.pid)
        assert len(before) >= WORKERS
        elapsed, log = stop_and_time(proc, signal.SIGTERM)

        assert elapsed < SHUTDOWN_BUDGET_S, (elapsed, log)
        assert proc.proc.returncode == -signal.SIGTERM  # re-raised after the shutdown
        for sock in sockets:
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    sock.recv(timeout=WAIT_S)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
            assert "shutting down" in closed.value.rcvd.reason
        assert {f.result(timeout=WAIT_S) for f in slow} <= {200, 503}
        outcomes = quick.result(timeout=WAIT_S)
        assert outcomes[:-1] and set(outcomes[:-1]) <= {200, 503}, outcomes
        assert_clean_exit(proc, before, root, log)


def test_sigint_when_idle_removes_the_sandbox_root(tmp_path):
    root = tmp_path / "sandbox-root"
    proc = ServerProcess(extra_env={"SANDBOX_ROOT": str(root), "LOG_LEVEL": "INFO"})
    try:
        own = sorted(p.name for p in root.iterdir())  # its root and the lock that owns it
        assert len(own) == 2 and own[1] == own[0] + ROOT_LOCK_SUFFIX, own
        assert own[0].split("-")[0] == str(proc.proc.pid)
        before = descendants(proc.proc.pid)
        elapsed, log = stop_and_time(proc, signal.SIGINT)
        assert elapsed < SHUTDOWN_BUDGET_S, (elapsed, log)
        assert proc.proc.returncode == 128 + signal.SIGINT
        assert_clean_exit(proc, before, root, log)
    finally:
        proc.stop()
