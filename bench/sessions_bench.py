"""Concurrent sessions, the way an RL trainer drives the server.

    uv run python bench/sessions_bench.py [--sessions 64 256 512] [--http 64 256] [--steps 20]
                                          [--mix mixed|tests-half]

For each N: start a server (room for N sessions), open N sessions, reset each (distinct
seeds), measure the server's RSS with N idle sessions, then let every session play
``--steps`` mixed steps (VIEW_CODE, REPLACE_LINES, RUN_TESTS, UNDO_EDIT, ..., SUBMIT);
with ``--mix tests-half`` every other step is RUN_TESTS (on code that changed since the last
run, so each one is a real evaluation), the others REPLACE_LINES/UNDO_EDIT, SUBMIT last.
``--sessions`` runs go through openenv's typed WebSocket client (``client.TraceFixEnv``);
``--http`` runs use stateful HTTP episodes (``POST /reset``, then ``POST /step`` with the
``episode_id``). Reports per-action P50/P99 latency, errors (including ERROR lines in the
server's log), RSS and RSS per idle session, and CPU use of the server (with its sandbox
workers) and of this client. Writes ``bench/results/sessions.json`` (or into
``--results DIR``). With
``BENCH_DUMP_SERVER_LOG=1`` each server's whole log goes to stderr (for chasing errors).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
from common import REPO, RESULTS, add_results_option, free_port, stop_process_group, write_result

from tracefix_rl import models  # noqa: F401  (before openenv: keeps gradio out)

# isort: split

from tracefix_rl.client import TraceFixEnv
from tracefix_rl.models import TraceFixAction
from tracefix_rl.server import SERVER_MODULE

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STEP_TIMEOUT_S = 600.0
SERVER_ERROR_MARKERS = ("ERROR", "Traceback")


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


def rss_kb(pid: int) -> int:
    """Resident memory of one process, in KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0])


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and its children (the sandbox workers and what they reaped)."""
    total = 0.0
    for candidate in [pid] + children(pid):
        try:
            fields = Path(f"/proc/{candidate}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(f) for f in fields[11:15]) / CLOCK_TICKS
        except (OSError, IndexError):
            pass
    return total


def plan(index: int, steps: int, lines: int, mix: str = "mixed") -> list[TraceFixAction]:
    """A mixed episode: views, harmless edits, test runs, undo; SUBMIT last."""
    if mix == "tests-half":
        return plan_tests_half(index, steps, lines)
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


class Outcome:
    """What the benchmark needs from one observation."""

    def __init__(self, lines: int, error: str | None, done: bool, score: float | None) -> None:
        self.lines, self.error, self.done, self.score = lines, error, done, score


class WsSession:
    """One episode over ``/ws`` through openenv's typed client."""

    def __init__(self, url: str) -> None:
        self.client = TraceFixEnv(base_url=url, message_timeout_s=STEP_TIMEOUT_S)

    async def open(self) -> None:
        await self.client.connect()

    async def reset(self, seed: int) -> Outcome:
        return self._outcome(await self.client.reset(seed=seed))

    async def step(self, action: TraceFixAction) -> Outcome:
        return self._outcome(await self.client.step(action))

    async def close(self) -> None:
        await self.client.close()

    @staticmethod
    def _outcome(result: Any) -> Outcome:
        obs = result.observation
        return Outcome(len(obs.code_dict), obs.last_action_error, result.done, obs.score)


class HttpSession:
    """One stateful HTTP episode: ``/reset``, then ``/step`` with its ``episode_id``.

    Each session keeps one HTTP/1.1 keep-alive connection and speaks the few lines of
    HTTP it needs: httpx's async pool used a whole core of the client at 256 connections
    and became the bottleneck being measured.
    """

    def __init__(self, url: str) -> None:
        self.host, self.port = httpx.URL(url).host, httpx.URL(url).port
        self.episode_id: str | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def reset(self, seed: int) -> Outcome:
        body = await self._post("/reset", {"seed": seed})
        self.episode_id = body["observation"]["episode_id"]
        return self._outcome(body)

    async def step(self, action: TraceFixAction) -> Outcome:
        payload = {"action": action.model_dump(exclude_none=True, exclude={"metadata"}),
                   "episode_id": self.episode_id}  # fmt: skip
        return self._outcome(await self._post("/step", payload))

    async def close(self) -> None:
        self.writer.close()

    async def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        body = json.dumps(payload).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json"
                f"\r\nContent-Length: {len(body)}\r\n\r\n")  # fmt: skip
        self.writer.write(head.encode() + body)
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        data = await self.reader.readexactly(length)
        if status != 200:
            raise RuntimeError(f"{path}: HTTP {status} {data[:200]!r}")
        return json.loads(data)

    @staticmethod
    def _outcome(body: dict[str, Any]) -> Outcome:
        obs = body["observation"]
        return Outcome(
            len(obs["code_dict"]), obs.get("last_action_error"), body["done"], obs.get("score")
        )


TRANSPORTS = {"ws": WsSession, "http": HttpSession}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


def plan_tests_half(index: int, steps: int, lines: int) -> list[TraceFixAction]:
    """RUN_TESTS on every even step, alternately a harmless edit and its undo in between
    (so every run evaluates changed code), SUBMIT last."""
    actions = []
    for step in range(steps - 1):
        if step % 2 == 0:
            actions.append(TraceFixAction(action_type="RUN_TESTS"))
        elif step % 4 == 1:
            edit = {"start_line": lines + 1, "end_line": lines, "new_code_block": f"# s{index}"}
            actions.append(TraceFixAction(action_type="REPLACE_LINES", **edit))
        else:
            actions.append(TraceFixAction(action_type="UNDO_EDIT"))
    actions.append(TraceFixAction(action_type="SUBMIT"))
    return actions


MIXES = ("mixed", "tests-half")


async def run_sessions(url: str, transport: str, sessions: int, steps: int, pid: int,
                       mix: str = "mixed") -> dict:  # fmt: skip
    players = [TRANSPORTS[transport](url) for _ in range(sessions)]
    errors: list[str] = []
    latencies: dict[str, list[float]] = defaultdict(list)
    completed = 0

    async def reset(index: int, player: Any) -> Outcome:
        await player.open()  # connecting is not part of the reset's latency
        start = time.perf_counter()
        outcome = await player.reset(seed=index)
        latencies["RESET"].append((time.perf_counter() - start) * 1000)
        return outcome

    server_before = rss_kb(pid)
    firsts = await asyncio.gather(*(reset(i, p) for i, p in enumerate(players)),
                                  return_exceptions=True)  # fmt: skip
    errors += [f"reset: {r!r}" for r in firsts if isinstance(r, BaseException)]
    server_idle = rss_kb(pid)
    cpu_before, wall_before = cpu_seconds(pid), time.monotonic()
    client_before = time.process_time()

    async def play(index: int, player: Any, first: Outcome) -> None:
        nonlocal completed
        lines, outcome = first.lines, first
        for action in plan(index, steps, lines, mix):
            start = time.perf_counter()
            outcome = await player.step(action)
            latencies[action.action_type].append((time.perf_counter() - start) * 1000)
            if action.action_type == "REPLACE_LINES" and not outcome.error:
                lines += 1
            if action.action_type == "UNDO_EDIT" and not outcome.error:
                lines -= 1
            if outcome.done:
                break
        if outcome.done and outcome.score is not None:
            completed += 1
        else:
            errors.append(f"session {index} did not finish")

    playing = [play(i, p, r) for i, (p, r) in enumerate(zip(players, firsts, strict=True))
               if not isinstance(r, BaseException)]  # fmt: skip
    outcomes = await asyncio.gather(*playing, return_exceptions=True)
    errors += [f"step: {o!r}" for o in outcomes if isinstance(o, BaseException)]
    wall = time.monotonic() - wall_before
    server_cpu = cpu_seconds(pid) - cpu_before
    client_cpu = time.process_time() - client_before
    await asyncio.gather(*(p.close() for p in players), return_exceptions=True)
    cpus = os.cpu_count() or 1
    steps_ms = [ms for kind, values in latencies.items() if kind != "RESET" for ms in values]
    return {
        "transport": transport,
        "sessions": sessions,
        "steps_per_session": steps,
        "mix": mix,
        "completed": completed,
        "errors": len(errors),
        "error_samples": errors[:5],
        "latency_ms": {
            kind: {"n": len(v), "p50": percentile(v, 0.5), "p99": percentile(v, 0.99)}
            for kind, v in sorted(latencies.items())
        },  # fmt: skip
        "step_p99_ms": percentile(steps_ms, 0.99),
        "server_rss_kb_before": server_before,
        "server_rss_kb_idle_sessions": server_idle,
        "server_rss_kb_per_idle_session": round((server_idle - server_before) / sessions, 1),
        "play_wall_s": round(wall, 1),
        "steps_per_s": round(sum(len(v) for k, v in latencies.items() if k != "RESET") / wall),
        "server_cpu_utilisation": round(server_cpu / wall / cpus, 2),
        "client_cpu_utilisation": round(client_cpu / wall / cpus, 2),
    }


async def _when_healthy(server: subprocess.Popen, port: int, transport: str, sessions: int,
                        steps: int, mix: str) -> dict:  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    async with httpx.AsyncClient(base_url=url, timeout=2) as probe:
        while True:
            try:
                if (await probe.get("/health")).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("server did not start")
            await asyncio.sleep(0.1)
    return await run_sessions(url, transport, sessions, steps, server.pid, mix)


def bench(sessions: int, steps: int, transport: str = "ws", mix: str = "mixed") -> dict:
    """Start a server sized for ``sessions``, run them, stop it; one result row."""
    port = free_port()
    env = {**os.environ, "MAX_CONCURRENT_ENVS": str(sessions + 8),
           "HTTP_MAX_EPISODES": str(sessions + 8), "LOG_LEVEL": "WARNING",
           "SANDBOX_QUEUE_TIMEOUT_S": str(STEP_TIMEOUT_S)}  # fmt: skip
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen([sys.executable, "-m", SERVER_MODULE, "--host", "127.0.0.1",
                                   "--port", str(port)], cwd=REPO, env=env,
                                  stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # fmt: skip
        try:
            result = asyncio.run(_when_healthy(server, port, transport, sessions, steps, mix))
        finally:
            stop_process_group(server)
        log.seek(0)
        lines = log.read().decode(errors="replace").splitlines()
    bad = [line for line in lines if any(m in line for m in SERVER_ERROR_MARKERS)]
    result["server_error_lines"] = len(bad)
    result["server_error_samples"] = bad[:3]
    if os.environ.get("BENCH_DUMP_SERVER_LOG"):
        print("\n".join(lines), file=sys.stderr)
    return result


TESTS_HALF_STEPS = 10  # issue 10's load: 10 steps per session, half of them RUN_TESTS


def run(ws: list[int], http: list[int], steps: int, mix: str = "mixed",
        tests_half: list[int] = (), results: Path = RESULTS) -> dict:  # fmt: skip
    """Every requested run, written to ``<results>/sessions.json``; ``tests_half`` are
    extra WebSocket runs of ``TESTS_HALF_STEPS`` steps in the ``tests-half`` mix."""
    plans = [("ws", n, steps, mix) for n in ws] + [("http", n, steps, mix) for n in http]
    plans += [("ws", n, TESTS_HALF_STEPS, "tests-half") for n in tests_half]
    runs = []
    for transport, sessions, length, kind in plans:
        print(f"sessions: {sessions} over {transport} ({kind}, {length} steps)...",
              file=sys.stderr, flush=True)  # fmt: skip
        runs.append(bench(sessions, length, transport, kind))
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    return write_result("sessions", {"steps_per_session": steps, "runs": runs}, results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, nargs="*", default=[64, 256, 512],
                        help="WebSocket session counts")  # fmt: skip
    parser.add_argument("--http", type=int, nargs="*", default=[64, 256],
                        help="HTTP episode counts")  # fmt: skip
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--mix", choices=MIXES, default="mixed")
    parser.add_argument("--tests-half", type=int, nargs="*", default=[],
                        help=f"WebSocket session counts for {TESTS_HALF_STEPS}-step runs in the "
                             "tests-half mix, after the others")  # fmt: skip
    add_results_option(parser)
    args = parser.parse_args()
    run(args.sessions, args.http, args.steps, args.mix, args.tests_half, args.results)


if __name__ == "__main__":
    main()
