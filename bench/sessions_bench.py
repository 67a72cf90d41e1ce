"""Concurrent WebSocket sessions, the way an RL trainer drives the server.

    uv run python bench/sessions_bench.py --sessions 64 256 512 [--steps 20]

For each N: start a server (MAX_CONCURRENT_ENVS = N + 8), open N sessions with the typed
client, reset each (distinct seeds), measure the server's RSS with N idle sessions, then let
every session play ``--steps`` mixed steps (VIEW_CODE, REPLACE_LINES, RUN_TESTS, UNDO_EDIT,
..., SUBMIT). Reports per-action P50/P99 latency, errors, RSS and RSS per idle session, and
the server's CPU utilisation. Writes ``bench/results/sessions.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import models  # noqa: E402,F401  (first: keeps gradio out)

# isort: split

from client import TraceFixEnv  # noqa: E402
from models import TraceFixAction  # noqa: E402

RESULTS = REPO / "bench" / "results"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_kb(pid: int) -> int:
    """Resident memory of ``pid`` plus its children (the sandbox workers), in KiB."""
    total = 0
    for candidate in [pid] + children(pid):
        try:
            status = Path(f"/proc/{candidate}/status").read_text()
            total += int(status.split("VmRSS:")[1].split()[0])
        except (OSError, IndexError):
            pass
    return total


def server_rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0])


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for candidate in [pid] + children(pid):
        try:
            fields = Path(f"/proc/{candidate}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        except (OSError, IndexError):
            pass
    return total


def plan(index: int, steps: int, lines: int) -> list[TraceFixAction]:
    """A mixed episode: views, harmless edits, test runs, undo; SUBMIT last."""
    actions = []
    for step in range(steps - 1):
        kind = step % 5
        if kind == 0:
            actions.append(TraceFixAction(action_type="VIEW_CODE"))
        elif kind == 1:
            actions.append(
                TraceFixAction(
                    action_type="REPLACE_LINES",
                    start_line=lines + 1,
                    end_line=lines,
                    new_code_block=f"# s{index} {step}",
                )
            )
        elif kind == 2:
            actions.append(TraceFixAction(action_type="RUN_TESTS"))
        elif kind == 3:
            actions.append(TraceFixAction(action_type="UNDO_EDIT"))
        else:
            actions.append(TraceFixAction(action_type="VIEW_CODE", start_line=1, end_line=3))
    actions.append(TraceFixAction(action_type="SUBMIT"))
    return actions


async def run_sessions(url: str, sessions: int, steps: int, pid: int) -> dict:
    clients = [TraceFixEnv(base_url=url, message_timeout_s=600) for _ in range(sessions)]
    errors: list[str] = []
    latencies: dict[str, list[float]] = defaultdict(list)
    completed = 0

    async def connect_and_reset(index: int, client: TraceFixEnv):
        await client.connect()
        start = time.perf_counter()
        result = await client.reset(seed=index, source="bench")
        latencies["RESET"].append((time.perf_counter() - start) * 1000)
        return result

    before = rss_kb(pid)
    server_before = server_rss_kb(pid)
    results = await asyncio.gather(*(connect_and_reset(i, c) for i, c in enumerate(clients)),
                                   return_exceptions=True)  # fmt: skip
    errors += [f"reset: {r!r}" for r in results if isinstance(r, BaseException)]
    idle_rss, server_idle = rss_kb(pid), server_rss_kb(pid)
    cpu_before, wall_before = cpu_seconds(pid), time.monotonic()

    async def play(index: int, client: TraceFixEnv, first) -> None:
        nonlocal completed
        lines = len(first.observation.code_dict)
        for action in plan(index, steps, lines):
            start = time.perf_counter()
            result = await client.step(action)
            latencies[action.action_type].append((time.perf_counter() - start) * 1000)
            if action.action_type == "REPLACE_LINES" and not result.observation.last_action_error:
                lines += 1
            if action.action_type == "UNDO_EDIT" and not result.observation.last_action_error:
                lines -= 1
            if result.done:
                break
        if result.done and result.observation.score is not None:
            completed += 1
        else:
            errors.append(f"session {index} did not finish")

    playing = [play(i, c, r) for i, (c, r) in enumerate(zip(clients, results, strict=True))
               if not isinstance(r, BaseException)]  # fmt: skip
    outcomes = await asyncio.gather(*playing, return_exceptions=True)
    errors += [f"step: {o!r}" for o in outcomes if isinstance(o, BaseException)]
    wall = time.monotonic() - wall_before
    cpu = cpu_seconds(pid) - cpu_before
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)

    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    return {
        "sessions": sessions,
        "steps_per_session": steps,
        "completed": completed,
        "errors": len(errors),
        "error_samples": errors[:5],
        "latency_ms": {
            kind: {"n": len(v), "p50": pct(v, 0.5), "p99": pct(v, 0.99)}
            for kind, v in sorted(latencies.items())
        },  # fmt: skip
        "rss_kb_before": before,
        "rss_kb_idle_sessions": idle_rss,
        "server_rss_kb_per_idle_session": round((server_idle - server_before) / sessions, 1),
        "play_wall_s": round(wall, 1),
        "cpu_utilisation": round(cpu / wall / (os.cpu_count() or 1), 2),
    }


def bench(sessions: int, steps: int) -> dict:
    port = free_port()
    env = {**os.environ, "MAX_CONCURRENT_ENVS": str(sessions + 8), "LOG_LEVEL": "WARNING",
           "SANDBOX_QUEUE_TIMEOUT_S": "600"}  # fmt: skip
    server = subprocess.Popen([sys.executable, "-m", "server.app", "--host", "127.0.0.1",
                               "--port", str(port)], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("server did not start")
            time.sleep(0.2)
        return asyncio.run(run_sessions(url, sessions, steps, server.pid))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    report = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
              "runs": []}  # fmt: skip
    for sessions in args.sessions:
        result = bench(sessions, args.steps)
        report["runs"].append(result)
        print(json.dumps(result), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sessions.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
