"""Replicas behind HAProxy that share their HTTP episodes through Redis, on loopback.

    uv run python bench/replicas.py [--quick] [--results DIR]

One script, no containers: it starts a throwaway ``redis-server``, N server replicas
(``EPISODE_STORE=redis://...``, the other variables as deploy/compose.yaml's ``tracefix``
service sets them: ``MAX_CONCURRENT_ENVS``, ``HTTP_MAX_EPISODES``, ``SANDBOX_WORKERS``,
``LOG_LEVEL``, ``ENABLE_WEB_INTERFACE``), one reference server with ``EPISODE_STORE=memory``,
and ``haproxy -db`` with deploy/haproxy.cfg rendered for loopback (bench/replicas_config.py
puts the replicas into its server blocks; this script moves its ``bind`` lines to free
ports, adds a stats listener of its own and one response header, ``X-Served-By: rN``, that
names the replica which answered, so the report can say where each step ran). Every
process it starts runs in a session of its own and is stopped by its PID in a ``finally``.
Progress goes to stderr, a summary to stdout, the JSON to ``<results>/replicas.json``.

What it measures (run in the order 1, 2, 4, 3, so that the latencies are measured before the
heavy load):

1. **Equivalence.** Scripted HTTP episodes (VIEW_CODE; RUN_TESTS; TRACE plain and with
   lines and a watch; an edit and UNDO_EDIT; a syntax error, RUN_TESTS on it and its undo;
   RESET_TO_ORIGINAL; the fix; RUN_TESTS twice, the second answered from the remembered
   run; VIEW_CODE; SUBMIT; one step after the end; then ``GET /state``) on several curated
   tasks, three episodes per task: the whole program replaced by the task's ``solution``
   (it solves the task), by a stub (it does not), and the first with ``max_steps`` 8, so it
   ends by the final grading at the limit (on a syntax error) and its later steps are
   refused. Played with explicit episode ids on the reference server, then on the replicas
   directly in round robin (request i of an episode goes to replica i mod N), then through
   HAProxy (round robin per request, no affinity). Every raw response body must be byte for
   byte the reference's. Then bursts of concurrent steps of one episode, spread over the
   replicas: the lease must serialise them (step counts n+1..n+k, each once).
2. **Killing a replica mid-run.** WebSocket clients (through HAProxy, plus a few connected
   straight to the victim) and HTTP episodes (through HAProxy) play padded scripts with a
   pause between steps; once every one of them is under way, the victim gets SIGTERM. The
   victim's WebSocket clients must see a close frame (its codes are recorded), reconnect
   through HAProxy and play their episode again to the end; the others must finish
   undisturbed. HTTP clients retry a 502/503/504 with the step's ``request_id`` (so a
   step whose answer was lost is answered, not applied, again) and a step answered "not
   counted" (a replica's shutdown cancelled its evaluation) with a new one, each counted;
   every HTTP episode's bodies must equal the reference's (so no step was lost or applied
   twice), every WebSocket observation the reference's observation. Then the victim is
   started again on its port and must serve (HAProxy's health check takes it back).
3. **Throughput scaling.** S WebSocket sessions through HAProxy, each looping VIEW_CODE,
   REPLACE_LINES, RUN_TESTS, UNDO_EDIT, VIEW_CODE (a fifth of the steps run the tests),
   with 1, 2 (and 3) replicas behind HAProxy: steps/s in a fixed window after a warm-up, the
   ratio to 1 replica, step latency, and where the CPU went (per process from /proc, the
   replicas with their sandbox workers, HAProxy, Redis, this client) and the machine's
   busy share, because the client, HAProxy and the replicas share the same cores.
4. **Redis round-trip cost.** The same sequential HTTP step sequence (per cycle five
   VIEW_CODE, one REPLACE_LINES, one UNDO_EDIT, two RUN_TESTS of changed code) on the
   reference server (memory) and on one replica directly (Redis), interleaved cycle by
   cycle: per-action p50/p99/mean latency, the difference, Redis commands per step
   (``INFO commandstats``) and Redis' own PING round trip.

``--quick`` (the test suite runs it): 2 replicas, 3 tasks, 8 WebSocket and 6 HTTP clients in
the kill test, 32 sessions for 1 and 2 replicas over 4 s, 20 latency cycles; about a minute.
Full: 3 replicas, 8 tasks, 28 WebSocket and 24 HTTP clients, 256 sessions for 1, 2 and 3
replicas over 20 s, 100 latency cycles (500 VIEW_CODE and 200 RUN_TESTS per store).

The JSON (besides ``date`` and ``machine``, which ``common.write_result`` adds)::

    mode: "quick" | "full"; wall_s
    config: {replicas, server_env (the replicas' settings), compose, haproxy_cfg, tasks}
    equivalence: {episodes, steps_per_episode, bodies_per_run,
        reference: {store: "memory", solved: {correct | wrong | truncated: "n/m"},
                    truncated: {...: "n/m"}},
        direct | haproxy: {identical, bodies, mismatched_episodes,
                           mismatches: [{episode_id, index, reference_bodies, bodies,
                                         reference, got}] (at most 5, bodies cut to 400),
                           retries: {kind: n}, requests_by_replica: {rN: n},
                           replica_switches (share of consecutive requests of an episode
                           answered by another replica than the one before)},
        concurrent_steps: {episodes, bursts, steps_per_burst, serialised, final_step_counts,
                           final_step_counts_ok, retries}}
    kill: {replicas, victim: "rN", sessions_before_kill: {rN: HAProxy's current sessions},
        ws: {clients, through_haproxy, direct, on_victim, on_victim_through_haproxy,
             close_codes: {"1001": n}, clean_closes, close_reasons,
             victim_clients_reconnected_and_finished, reconnected_to: {rN: n},
             others_undisturbed, finished, identical, mismatches, failed_connects},
        http: {episodes, steps, finished, identical, bodies, mismatched_episodes, mismatches,
               retries: {"503_replica" | "503_haproxy" | "502_haproxy" | "504_haproxy" |
                         "not_counted" | "transport_error": n}, retries_total,
               requests_by_replica, replica_switches},
        haproxy: {retries, redispatches, responses_5xx} (HAProxy's own counters, deltas
                 over the kill test: the failures it hid from the clients),
        timeline_s: {exit_after, exit_status, marked_down_after} (seconds after SIGTERM),
        restart: {healthy_after_s, up_in_haproxy_after_s, requests, requests_served_by_victim,
                  requests_by_replica, retries, identical},
        server_error_lines, server_error_samples}
    redis_latency: {cycles, samples_per_store: {action: n}, redis_ping_ms: {p50, p99},
        redis_commands_per_step (commands inside the Lua scripts included),
        redis_commands_per_step_by_command: {command: n},
        memory | redis: {action: {n, p50, p99, mean}} (ms),
        difference_ms: {action: {p50, p99, mean}} (redis minus memory)}
    scaling: {sessions, warmup_s, duration_s, cpus, points: [{replicas, steps, steps_per_s,
        ratio_to_1, latency_ms: {p50, p99}, latency_ms_by_action: {action: {n, p50, p99}},
        errors, error_samples, sessions_by_replica,
        cpu_cores: {replicas, replica_mains, sandboxes, other_servers, haproxy, redis,
        client, total} (CPU seconds per second of the window; replicas = replica_mains, the
        servers' own processes, + sandboxes, their sandbox workers and children),
        replica_main_cores: [per replica's own process],
        machine_busy (share of all cores busy, from /proc/stat), loadavg_1m}]}
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
import websockets
import yaml
from common import REPO, add_results_option, stop_process_group, write_result
from replicas_config import render_loopback
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from tracefix_rl.procs import children_of, free_ports, start_redis, wait_for_port
from tracefix_rl.server import SERVER_MODULE

COMPOSE = REPO / "deploy" / "compose.yaml"
HAPROXY_CFG = REPO / "deploy" / "haproxy.cfg"
CURATED = REPO / "task_data" / "curated"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
LOOPBACK = "127.0.0.1"

# What deploy/compose.yaml's tracefix service sets that applies on loopback; the values
# when the file (or a variable in it) is missing.
COMPOSE_VARIABLES = ("MAX_CONCURRENT_ENVS", "HTTP_MAX_EPISODES", "SANDBOX_WORKERS",
                     "LOG_LEVEL", "ENABLE_WEB_INTERFACE")  # fmt: skip
FALLBACK_ENV = {"MAX_CONCURRENT_ENVS": "256", "HTTP_MAX_EPISODES": "256", "SANDBOX_WORKERS": "2",
                "LOG_LEVEL": "INFO", "ENABLE_WEB_INTERFACE": "false"}  # fmt: skip
_SHELL_DEFAULT = re.compile(r"^\$\{\w+:?-(?P<default>[^}]*)\}$")

SERVED_BY = "X-Served-By"
API_PORT, STATS_PORT = 8000, 8404  # the ports deploy/haproxy.cfg binds
BENCH_STATS_URI = "/bench-stats"
BACKEND_ROW_TYPES = ("1", "2")  # HAProxy's CSV "type": 1 a backend, 2 a server

START_TIMEOUT_S = 120.0
STEP_TIMEOUT_S = 120.0
RETRY_STATUSES = (502, 503, 504)
RETRY_PAUSE_S = 0.1
NOT_COUNTED = "the step was not counted"
RECONNECT_ATTEMPTS = 20
KILL_AFTER_STEPS = 3  # every client has made this many steps when the victim gets SIGTERM
PHASE_TIMEOUT_S = 300.0
LATENCY_WARMUP_CYCLES = 2
LATENCY_MAX_STEPS = 1000  # models.MAX_STEPS_LIMIT: one latency episode per store
REDIS_PINGS = 200
RESTART_EPISODES = 4  # equivalence episodes played through HAProxy after the restart
SERVER_ERROR_MARKERS = ("ERROR", "Traceback")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Profile:
    """Sizes of one run (``--quick`` or full)."""

    name: str
    replicas: int
    tasks: int
    kill_ws_haproxy: int
    kill_ws_direct: int
    kill_http: int
    padding: int  # VIEW_CODE steps before the script in the kill test
    pause_s: float  # between two steps of a client in the kill test
    scaling_points: tuple[int, ...]
    scaling_sessions: int
    warmup_s: float
    duration_s: float
    latency_cycles: int


QUICK = Profile("quick", replicas=2, tasks=3, kill_ws_haproxy=6, kill_ws_direct=2, kill_http=6,
                padding=6, pause_s=0.1, scaling_points=(1, 2), scaling_sessions=32,
                warmup_s=1.0, duration_s=4.0, latency_cycles=20)  # fmt: skip
FULL = Profile("full", replicas=3, tasks=8, kill_ws_haproxy=24, kill_ws_direct=4, kill_http=24,
               padding=10, pause_s=0.15, scaling_points=(1, 2, 3), scaling_sessions=256,
               warmup_s=5.0, duration_s=20.0, latency_cycles=100)  # fmt: skip


def progress(message: str) -> None:
    print(f"[replicas {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


# -- configuration ----------------------------------------------------------------------------


def compose_environment() -> tuple[dict[str, str], bool]:
    """The server variables of deploy/compose.yaml's ``tracefix`` service (a ``${VAR:-x}``
    counts as ``x``), filled in from ``FALLBACK_ENV``; and whether the file was read."""
    try:
        service = yaml.safe_load(COMPOSE.read_text())["services"]["tracefix"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return dict(FALLBACK_ENV), False
    declared = service.get("environment") or {}
    if isinstance(declared, list):
        declared = dict(item.split("=", 1) for item in declared if "=" in item)
    found = {}
    for name in COMPOSE_VARIABLES:
        if name in declared:
            value = str(declared[name])
            match = _SHELL_DEFAULT.match(value)
            found[name] = match["default"] if match else value
    return {**FALLBACK_ENV, **found}, True


@dataclass(frozen=True)
class Task:
    """What the scripts need of a curated task."""

    task_id: str
    solution: str
    entry_point: str


def curated_tasks(count: int) -> list[Task]:
    """``count`` curated tasks spread over the sorted list (so over several tiers)."""
    files = sorted(CURATED.glob("*.toml"))
    chosen = files[:: max(1, len(files) // count)][:count]
    tasks = []
    for path in chosen:
        data = tomllib.loads(path.read_text())
        tasks.append(Task(data["task_id"], data["solution"].strip("\n"), data["entry_point"]))
    return tasks


# -- the scripts ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One scripted episode: its id, task, kind and padding. Kinds: ``correct`` replaces
    the program with the task's solution, ``wrong`` with a stub; ``truncated`` is
    ``correct`` with ``TRUNCATED_MAX_STEPS`` steps, so it ends by the final grading at the
    limit (of a file with a syntax error) and the rest of its steps are refused."""

    episode_id: str
    task: Task
    kind: str
    padding: int = 0

    @property
    def max_steps(self) -> int | None:
        return TRUNCATED_MAX_STEPS if self.kind == "truncated" else None

    def reset_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"task_id": self.task.task_id, "episode_id": self.episode_id}
        if self.max_steps is not None:
            args["max_steps"] = self.max_steps
        return args


KINDS = ("correct", "wrong", "truncated")
TRUNCATED_MAX_STEPS = 8  # the step after the syntax error's RUN_TESTS


def wrong_fix(task: Task) -> str:
    return f"def {task.entry_point}(*args, **kwargs):\n    return None"


def script(spec: Spec, lines: int) -> list[dict[str, Any]]:
    """The actions of ``spec``'s episode on a file of ``lines`` lines: ``padding`` views,
    then every kind of action (TRACE plain and with lines and a watch, an edit and its undo,
    a syntax error run and undone, RESET_TO_ORIGINAL), the fix, RUN_TESTS twice (the second
    answered from the remembered run), SUBMIT, and one step after the end (refused)."""
    views = [{"action_type": "VIEW_CODE", "start_line": 1 + k % lines,
              "end_line": min(lines, 3 + k % lines)} for k in range(spec.padding)]  # fmt: skip
    append = {"action_type": "REPLACE_LINES", "start_line": lines + 1, "end_line": lines}
    code = wrong_fix(spec.task) if spec.kind == "wrong" else spec.task.solution
    return views + [
        {"action_type": "VIEW_CODE", "start_line": 1, "end_line": 3},
        {"action_type": "RUN_TESTS"},
        {"action_type": "TRACE", "test": 1},
        {"action_type": "TRACE", "test": 1, "lines": [1, 2], "watch": ["1 + 1"]},
        {**append, "new_code_block": "# probe"},
        {"action_type": "UNDO_EDIT"},
        {**append, "new_code_block": "x = ("},
        {"action_type": "RUN_TESTS"},
        {"action_type": "UNDO_EDIT"},
        {**append, "new_code_block": "# probe 2"},
        {"action_type": "RESET_TO_ORIGINAL"},
        {
            "action_type": "REPLACE_LINES",
            "start_line": 1,
            "end_line": lines,
            "new_code_block": code,
        },  # fmt: skip
        {"action_type": "RUN_TESTS"},
        {"action_type": "RUN_TESTS"},
        {"action_type": "VIEW_CODE"},
        {"action_type": "SUBMIT"},
        {"action_type": "VIEW_CODE", "start_line": 1, "end_line": 2},
    ]


def specs_for(tasks: list[Task], prefix: str, count: int, padding: int = 0) -> list[Spec]:
    """``count`` episodes over ``tasks``, the kinds in turn; the padding varies from 0 to
    ``padding`` so that the clients of the kill test are at different steps."""
    specs = []
    for i in range(count):
        task, kind = tasks[i // len(KINDS) % len(tasks)], KINDS[i % len(KINDS)]
        pad = (3 * i) % (padding + 1)
        specs.append(Spec(f"{prefix}-{i}-{kind}-{task.task_id}", task, kind, pad))
    return specs


# -- processes --------------------------------------------------------------------------------


class Processes:
    """Every process this benchmark starts (each in a session of its own); ``stop_all``
    stops each by its PID (SIGTERM, then SIGKILL)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[subprocess.Popen] = []

    def popen(self, argv: list[str], log: Path, env: dict[str, str] | None = None
              ) -> subprocess.Popen:  # fmt: skip
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.started.append(proc)
        return proc

    def adopt(self, proc: subprocess.Popen) -> subprocess.Popen:
        self.started.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        stop_process_group(proc)
        if proc in self.started:
            self.started.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            try:
                stop_process_group(proc)
            except Exception as exc:  # noqa: BLE001 - stop the others anyway
                progress(f"stopping pid {proc.pid} failed: {exc!r}")
        self.started.clear()


class Listening:
    """Something serving HTTP and WebSocket on ``LOOPBACK:port``."""

    port: int

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}/ws"


@dataclass
class Replica(Listening):
    """A server process (a replica, or the reference server) and its settings."""

    name: str
    port: int
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen | None = None


def start_replica(processes: Processes, replica: Replica) -> None:
    argv = [sys.executable, "-m", SERVER_MODULE, "--host", LOOPBACK, "--port", str(replica.port)]
    replica.proc = processes.popen(argv, replica.log, replica.env)


async def wait_healthy(replica: Replica) -> float:
    """Seconds until ``GET /health`` answers 200; ``RuntimeError`` if it exits first."""
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=replica.url, timeout=2) as client:
        while time.monotonic() - started < START_TIMEOUT_S:
            assert replica.proc is not None
            if replica.proc.poll() is not None:
                raise RuntimeError(f"{replica.name} exited with {replica.proc.returncode}:\n"
                                   f"{tail(replica.log)}")  # fmt: skip
            try:
                if (await client.get("/health")).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{replica.name} did not become healthy:\n{tail(replica.log)}")


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def server_errors(replicas: Iterable[Replica]) -> list[str]:
    """ERROR and traceback lines in the replicas' logs."""
    found = []
    for replica in replicas:
        text = replica.log.read_text(errors="replace") if replica.log.exists() else ""
        found += [f"{replica.name}: {line}" for line in text.splitlines()
                  if any(marker in line for marker in SERVER_ERROR_MARKERS)]  # fmt: skip
    return found


# -- HAProxy ----------------------------------------------------------------------------------


def rebind(cfg: str, port: int, new_port: int) -> tuple[str, int]:
    """Every ``bind ADDRESS:PORT`` line (``:PORT``, ``*:PORT``, ``0.0.0.0:PORT``, ...) moved
    to ``LOOPBACK:new_port``, its options kept; the text and how many lines changed."""
    address = r"\S*?"  # none, *, 0.0.0.0, a host, [::] ...
    pattern = re.compile(rf"^(?P<indent>[ \t]*)bind[ \t]+{address}:{port}(?P<rest>\b.*)$",
                         re.MULTILINE)  # fmt: skip
    return pattern.subn(lambda m: f"{m['indent']}bind {LOOPBACK}:{new_port}{m['rest']}", cfg)


def default_backend(cfg: str) -> str:
    match = re.search(r"^[ \t]*default_backend[ \t]+(\S+)", cfg, re.MULTILINE)
    if match is None:
        raise ValueError(f"{HAPROXY_CFG} has no default_backend")
    return match[1]


def render_haproxy(ports: list[int], listen_port: int, stats_port: int, spare_port: int) -> str:
    """deploy/haproxy.cfg for replicas on ``ports``: the API frontend on ``listen_port``, its
    own stats page (if any) on ``spare_port``, a stats listener for this script on
    ``stats_port``, and ``X-Served-By`` naming the replica on every answer of the default
    backend."""
    cfg = render_loopback(HAPROXY_CFG.read_text(), ports)
    cfg, count = rebind(cfg, API_PORT, listen_port)
    if count != 1:
        raise ValueError(f"expected one 'bind :{API_PORT}' line in {HAPROXY_CFG}, found {count}")
    cfg, _ = rebind(cfg, STATS_PORT, spare_port)
    backend = default_backend(cfg)
    cfg, count = re.subn(rf"^(backend[ \t]+{re.escape(backend)}[ \t]*)$",
                         rf"\1\n    http-response set-header {SERVED_BY} %s", cfg,
                         count=1, flags=re.MULTILINE)  # fmt: skip
    if count != 1:
        raise ValueError(f"no 'backend {backend}' section in {HAPROXY_CFG}")
    return cfg + (f"\nlisten bench_stats\n    bind {LOOPBACK}:{stats_port}\n    mode http\n"
                  f"    stats enable\n    stats uri {BENCH_STATS_URI}\n")  # fmt: skip


@dataclass
class Balancer(Listening):
    """A running HAProxy."""

    proc: subprocess.Popen
    port: int
    stats_port: int
    backend: str
    servers: list[str]

    async def stats(self) -> dict[str, dict[str, str]]:
        """The default backend's rows of HAProxy's CSV stats, by server name (``BACKEND``
        is the backend's own row)."""
        url = f"http://{LOOPBACK}:{self.stats_port}{BENCH_STATS_URI};csv"
        async with httpx.AsyncClient(timeout=5) as client:
            text = (await client.get(url)).text
        rows = csv.DictReader(io.StringIO(text.removeprefix("# ")))
        return {row["svname"]: row for row in rows
                if row["pxname"] == self.backend and row["type"] in BACKEND_ROW_TYPES}  # fmt: skip

    async def wait_status(self, server: str, prefix: str, timeout_s: float = 60.0) -> float:
        """Seconds until HAProxy reports ``server``'s status starting with ``prefix``."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if (await self.stats())[server]["status"].startswith(prefix):
                return time.monotonic() - started
            await asyncio.sleep(0.1)
        raise RuntimeError(f"HAProxy did not report {server} {prefix} within {timeout_s:.0f}s")


async def start_haproxy(processes: Processes, replicas: list[Replica], tag: str) -> Balancer:
    port, stats_port, spare = free_ports(3)
    cfg = render_haproxy([r.port for r in replicas], port, stats_port, spare)
    path = processes.workdir / f"haproxy-{tag}.cfg"
    path.write_text(cfg)
    proc = processes.popen([HAPROXY, "-f", str(path), "-db"],
                           processes.workdir / f"haproxy-{tag}.log")  # fmt: skip
    await asyncio.to_thread(wait_for_port, port, proc)
    balancer = Balancer(proc, port, stats_port, default_backend(cfg),
                        [f"r{i}" for i in range(1, len(replicas) + 1)])  # fmt: skip
    for server in balancer.servers:
        await balancer.wait_status(server, "UP")
    return balancer


# -- HTTP episodes ----------------------------------------------------------------------------


@dataclass
class Played:
    """The raw bodies of one HTTP episode (reset, each step, ``GET /state``) and the replica
    that answered each (``X-Served-By``, empty when no HAProxy was in between)."""

    bodies: list[bytes] = field(default_factory=list)
    served_by: list[str] = field(default_factory=list)


def not_counted(response: httpx.Response) -> bool:
    """A 200 answering that the step did not happen (its evaluation was cancelled)."""
    if NOT_COUNTED.encode() not in response.content:
        return False
    error = response.json().get("observation", {}).get("last_action_error") or ""
    return NOT_COUNTED in error


async def request(client: httpx.AsyncClient, method: str, path: str, retries: Counter[str],
                  **kwargs: Any) -> httpx.Response:  # fmt: skip
    """One request, retried (each retry counted in ``retries``) on 502/503/504, on a
    transport error and on a step answered "not counted"; any other non-200 raises. A step's
    ``request_id`` stays the same across retries of a lost answer (the server answers a
    repeat instead of applying it twice) and changes for a step answered "not counted"."""
    attempt = 0
    while True:
        try:
            response = await client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            retries["transport_error"] += 1
            progress(f"{method} {path}: {exc!r}; retrying")
            await asyncio.sleep(RETRY_PAUSE_S)
            continue
        if response.status_code in RETRY_STATUSES:
            source = "replica" if b"shutting down" in response.content else "haproxy"
            retries[f"{response.status_code}_{source}"] += 1
            await asyncio.sleep(RETRY_PAUSE_S)
            continue
        if response.status_code != 200:
            raise RuntimeError(f"{method} {path}: HTTP {response.status_code} "
                               f"{response.content[:300]!r}")  # fmt: skip
        if not_counted(response):
            retries["not_counted"] += 1
            attempt += 1
            body = kwargs.get("json")
            if isinstance(body, dict) and "request_id" in body:
                kwargs["json"] = {**body, "request_id": f"{body['request_id']}.{attempt}"}
            await asyncio.sleep(RETRY_PAUSE_S)
            continue
        return response


Route = Callable[[int], httpx.AsyncClient]


async def play_http(spec: Spec, route: Route, retries: Counter[str], pause_s: float = 0.0,
                    on_step: Callable[[], None] | None = None) -> Played:  # fmt: skip
    """Play ``spec`` over HTTP; request ``i`` (0 = the reset) goes to ``route(i)``."""
    played = Played()

    def keep(response: httpx.Response) -> None:
        played.bodies.append(response.content)
        played.served_by.append(response.headers.get(SERVED_BY, ""))

    response = await request(route(0), "POST", "/reset", retries, json=spec.reset_args())
    keep(response)
    actions = script(spec, len(response.json()["observation"]["code_dict"]))
    for index, action in enumerate(actions, 1):
        if pause_s:
            await asyncio.sleep(pause_s)
        payload = {"action": action, "episode_id": spec.episode_id,
                   "request_id": f"{spec.episode_id}.{index}"}  # fmt: skip
        keep(await request(route(index), "POST", "/step", retries, json=payload))
        if on_step is not None:
            on_step()
    params = {"episode_id": spec.episode_id}
    keep(await request(route(len(actions) + 1), "GET", "/state", retries, params=params))
    return played


def http_clients(urls: list[str]) -> list[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    return [httpx.AsyncClient(base_url=url, timeout=STEP_TIMEOUT_S, limits=limits) for url in urls]


async def close_all(clients: list[httpx.AsyncClient]) -> None:
    await asyncio.gather(*(client.aclose() for client in clients))


async def play_all(specs: list[Spec], urls: list[str], retries: Counter[str],
                   sequential: bool = True) -> dict[str, Played]:  # fmt: skip
    """Play every spec; request ``i`` of episode ``e`` goes to ``urls[(i + e) % len(urls)]``
    (one URL: all there). Sequential by default, so that consecutive requests through
    HAProxy alternate replicas."""
    clients = http_clients(urls)
    try:

        def route_of(offset: int) -> Route:
            return lambda i: clients[(i + offset) % len(clients)]

        if sequential:
            return {s.episode_id: await play_http(s, route_of(e), retries)
                    for e, s in enumerate(specs)}  # fmt: skip
        played = await asyncio.gather(
            *(play_http(s, route_of(e), retries) for e, s in enumerate(specs))
        )
        return {s.episode_id: p for s, p in zip(specs, played, strict=True)}
    finally:
        await close_all(clients)


def excerpt(bodies: list[bytes], index: int) -> str | None:
    return bodies[index][:400].decode(errors="replace") if index < len(bodies) else None


def compare(reference: dict[str, Played], played: dict[str, Played]) -> dict[str, Any]:
    """Byte-for-byte comparison of every body with the reference's."""
    mismatches = []
    bodies = 0
    for episode_id, run in played.items():
        expected = reference[episode_id].bodies
        bodies += len(run.bodies)
        if run.bodies == expected:
            continue
        index = next((i for i, (a, b) in enumerate(zip(expected, run.bodies, strict=False))
                      if a != b), min(len(expected), len(run.bodies)))  # fmt: skip
        mismatches.append({
            "episode_id": episode_id, "index": index, "reference_bodies": len(expected),
            "bodies": len(run.bodies), "reference": excerpt(expected, index),
            "got": excerpt(run.bodies, index),
        })  # fmt: skip
    return {"identical": not mismatches, "bodies": bodies, "mismatches": mismatches[:5],
            "mismatched_episodes": len(mismatches)}  # fmt: skip


def served_summary(played: dict[str, Played]) -> dict[str, Any]:
    """Requests per replica, and the share of consecutive requests of an episode that went
    to a different replica than the one before."""
    counts: Counter[str] = Counter()
    switches = pairs = 0
    for run in played.values():
        counts.update(name for name in run.served_by if name)
        for before, after in zip(run.served_by, run.served_by[1:], strict=False):
            pairs += 1
            switches += before != after
    return {"requests_by_replica": dict(sorted(counts.items())),
            "replica_switches": round(switches / pairs, 3) if pairs else None}  # fmt: skip


def final_outcome(run: Played) -> dict[str, Any]:
    """The answer that ended the episode: reward, score, solved, step count."""
    ends = [json.loads(b) for b in run.bodies[1:-1]]
    body = next((b for b in ends if b["done"]), ends[-1])
    obs = body["observation"]
    return {"done": body["done"], "reward": body["reward"], "score": obs.get("score"),
            "solved": obs.get("solved"), "truncated": obs.get("truncated"),
            "step_count": obs.get("step_count")}  # fmt: skip


# -- 1. equivalence ---------------------------------------------------------------------------


async def equivalence(cluster: Cluster, specs: list[Spec]) -> tuple[dict[str, Any],
                                                                   dict[str, Played]]:  # fmt: skip
    progress(f"equivalence: {len(specs)} episodes on the reference server (memory)")
    reference = await play_all(specs, [cluster.reference.url], Counter())
    outcomes: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for spec in specs:
        outcomes[spec.kind].append(final_outcome(reference[spec.episode_id]))
    report: dict[str, Any] = {
        "episodes": len(specs),
        "steps_per_episode": len(reference[specs[0].episode_id].bodies) - 2,
        "bodies_per_run": sum(len(p.bodies) for p in reference.values()),
        "reference": {"store": "memory",
                      "solved": {k: f"{sum(bool(o['solved']) for o in v)}/{len(v)}"
                                 for k, v in outcomes.items()},
                      "truncated": {k: f"{sum(bool(o['truncated']) for o in v)}/{len(v)}"
                                    for k, v in outcomes.items()}},
    }  # fmt: skip
    progress(f"equivalence: the same on {len(cluster.replicas)} replicas directly, round robin")
    retries: Counter[str] = Counter()
    direct = await play_all(specs, [r.url for r in cluster.replicas], retries)
    names = [r.name for r in cluster.replicas]
    for episode, spec in enumerate(specs):  # request i went to names[(i + episode) % N]
        bodies = len(direct[spec.episode_id].bodies)
        direct[spec.episode_id].served_by = [names[(i + episode) % len(names)]
                                             for i in range(bodies)]  # fmt: skip
    report["direct"] = {**compare(reference, direct), "retries": dict(retries),
                        **served_summary(direct)}  # fmt: skip
    progress("equivalence: the same through HAProxy")
    retries = Counter()
    through = await play_all(specs, [cluster.balancer.url], retries)
    report["haproxy"] = {**compare(reference, through), "retries": dict(retries),
                         **served_summary(through)}  # fmt: skip
    report["concurrent_steps"] = await concurrent_steps(cluster, specs[0].task)
    return report, reference


LEASE_EPISODES, LEASE_BURSTS, LEASE_BURST = 3, 3, 6


async def concurrent_steps(cluster: Cluster, task: Task) -> dict[str, Any]:
    """Bursts of ``LEASE_BURST`` steps of one episode sent at once, spread over the replicas:
    the lease serialises them, so the answers carry the step counts n+1..n+LEASE_BURST, each
    once, and the episode's final step count is the number of steps sent."""
    progress(f"equivalence: bursts of {LEASE_BURST} concurrent steps of one episode")
    clients = http_clients([r.url for r in cluster.replicas])
    retries: Counter[str] = Counter()
    serialised, finals = True, []
    try:
        for episode in range(LEASE_EPISODES):
            episode_id = f"lease-{episode}"
            reset = {"task_id": task.task_id, "episode_id": episode_id}
            await request(clients[0], "POST", "/reset", retries, json=reset)
            for burst in range(LEASE_BURSTS):
                answers = await asyncio.gather(*(request(
                    clients[k % len(clients)], "POST", "/step", retries,
                    json={"action": {"action_type": "VIEW_CODE", "start_line": 1,
                                     "end_line": 1 + k}, "episode_id": episode_id})
                    for k in range(LEASE_BURST)))  # fmt: skip
                counts = sorted(a.json()["observation"]["step_count"] for a in answers)
                serialised &= counts == list(range(burst * LEASE_BURST + 1,
                                                   (burst + 1) * LEASE_BURST + 1))  # fmt: skip
            state = await request(clients[-1], "GET", "/state", retries,
                                  params={"episode_id": episode_id})  # fmt: skip
            finals.append(state.json()["step_count"])
    finally:
        await close_all(clients)
    return {"episodes": LEASE_EPISODES, "bursts": LEASE_BURSTS, "steps_per_burst": LEASE_BURST,
            "serialised": serialised, "final_step_counts": finals,
            "final_step_counts_ok": finals == [LEASE_BURSTS * LEASE_BURST] * LEASE_EPISODES,
            "retries": dict(retries)}  # fmt: skip


# -- 2. killing a replica ---------------------------------------------------------------------


class Trigger:
    """Set once ``clients`` clients have each made ``steps`` steps."""

    def __init__(self, clients: int, steps: int) -> None:
        self.clients, self.steps = clients, steps
        self.counts: Counter[str] = Counter()
        self.event = asyncio.Event()

    def step(self, who: str) -> None:
        self.counts[who] += 1
        if sum(1 for n in self.counts.values() if n >= self.steps) >= self.clients:
            self.event.set()


async def ws_call(sock: Any, kind: str, data: dict[str, Any]) -> dict[str, Any]:
    await sock.send(json.dumps({"type": kind, "data": data}))
    frame = json.loads(await asyncio.wait_for(sock.recv(), STEP_TIMEOUT_S))
    if frame.get("type") != "observation":
        raise RuntimeError(f"{kind}: {frame}")
    return frame["data"]


class WsClient:
    """One WebSocket client of the kill test: plays ``spec`` on ``first_url``; if the server
    closes the socket, plays the episode again from its start through ``again_url``. Every
    observation is compared with the reference's HTTP body of the same step."""

    def __init__(self, spec: Spec, reference: Played, first_url: str, again_url: str,
                 pause_s: float, trigger: Trigger, direct_to: str = "") -> None:  # fmt: skip
        self.spec, self.reference = spec, [json.loads(b) for b in reference.bodies]
        self.first_url, self.again_url = first_url, again_url
        self.pause_s, self.trigger = pause_s, trigger
        self.direct_to = direct_to  # the replica's name when connected straight to it
        self.sessions: list[str] = []  # the replica of each connection
        self.closes: list[dict[str, Any]] = []  # {"replica", "code", "reason", "steps"}
        self.failed_connects = 0
        self.mismatches: list[int] = []
        self.finished = False

    async def run(self) -> None:
        url = self.first_url
        for _ in range(RECONNECT_ATTEMPTS):
            steps = [0]
            try:
                await self._play(url, steps)
                self.finished = True
                return
            except ConnectionClosed as exc:
                self.closes.append({"replica": self.sessions[-1] if self.sessions else "",
                                    "code": exc.rcvd.code if exc.rcvd else None,
                                    "reason": exc.rcvd.reason if exc.rcvd else None,
                                    "steps": steps[0]})  # fmt: skip
            except (OSError, TimeoutError, InvalidHandshake):
                self.failed_connects += 1
            url = self.again_url
            await asyncio.sleep(RETRY_PAUSE_S)

    async def _play(self, url: str, steps: list[int]) -> None:
        async with websockets.connect(url, max_size=None, open_timeout=30,
                                      ping_interval=None) as sock:  # fmt: skip
            replica = sock.response.headers.get(SERVED_BY) or self.direct_to
            self.sessions.append(replica)
            observation = await ws_call(sock, "reset", self.spec.reset_args())
            self._check(0, observation)
            actions = script(self.spec, len(observation["observation"]["code_dict"]))
            for index, action in enumerate(actions, 1):
                await asyncio.sleep(self.pause_s)
                self._check(index, await ws_call(sock, "step", action))
                steps[0] += 1
                self.trigger.step(self.spec.episode_id)

    def _check(self, index: int, observation: dict[str, Any]) -> None:
        if observation != self.reference[index]:
            self.mismatches.append(index)


def haproxy_counters(rows: dict[str, dict[str, str]]) -> dict[str, int]:
    backend = rows.get("BACKEND", {})

    def number(name: str) -> int:
        return int(backend.get(name) or 0)

    return {"retries": number("wretr"), "redispatches": number("wredis"),
            "responses_5xx": number("hrsp_5xx")}  # fmt: skip


async def watch_victim(victim: Replica, balancer: Balancer, killed_at: float) -> dict[str, Any]:
    """When the victim exited and when HAProxy marked it down, in seconds after SIGTERM."""
    assert victim.proc is not None
    timeline: dict[str, Any] = {"exit_after": None, "marked_down_after": None}
    while time.monotonic() - killed_at < 60:
        now = time.monotonic() - killed_at
        if timeline["exit_after"] is None and victim.proc.poll() is not None:
            timeline["exit_after"] = round(now, 3)
            timeline["exit_status"] = victim.proc.returncode
        if timeline["marked_down_after"] is None:
            status = (await balancer.stats())[victim.name]["status"]
            if status.startswith("DOWN") or status.startswith("MAINT"):
                timeline["marked_down_after"] = round(now, 3)
        if None not in (timeline["exit_after"], timeline["marked_down_after"]):
            break
        await asyncio.sleep(0.05)
    return timeline


def ws_report(clients: list[WsClient], victim: str) -> dict[str, Any]:
    on_victim = [c for c in clients if c.sessions and c.sessions[0] == victim]
    others = [c for c in clients if c not in on_victim]
    first_closes = [c.closes[0] for c in on_victim if c.closes]
    codes = Counter(str(close["code"]) for c in clients for close in c.closes)
    return {
        "clients": len(clients),
        "through_haproxy": sum(1 for c in clients if not c.direct_to),
        "direct": sum(1 for c in clients if c.direct_to),
        "on_victim": len(on_victim),
        "on_victim_through_haproxy": sum(1 for c in on_victim if not c.direct_to),
        "close_codes": dict(sorted(codes.items())),
        "clean_closes": sum(1 for close in first_closes if close["code"] is not None),
        "close_reasons": sorted({str(close["reason"]) for c in clients for close in c.closes}),
        "victim_clients_reconnected_and_finished": sum(
            1 for c in on_victim if c.finished and len(c.sessions) > 1
            and c.sessions[-1] != victim),
        "reconnected_to": dict(Counter(c.sessions[-1] for c in on_victim if len(c.sessions) > 1)),
        "others_undisturbed": all(not c.closes and c.finished for c in others),
        "finished": sum(1 for c in clients if c.finished),
        "identical": all(not c.mismatches for c in clients) and all(c.finished for c in clients),
        "mismatches": [{"episode_id": c.spec.episode_id, "indices": c.mismatches[:5]}
                       for c in clients if c.mismatches][:5],
        "failed_connects": sum(c.failed_connects for c in clients),
    }  # fmt: skip


async def kill_test(cluster: Cluster, processes: Processes, tasks: list[Task],
                    profile: Profile, equivalence_reference: dict[str, Played]
                    ) -> dict[str, Any]:  # fmt: skip
    balancer, victim = cluster.balancer, cluster.replicas[-1]
    http_specs = specs_for(tasks, "kill-http", profile.kill_http, profile.padding)
    ws_count = profile.kill_ws_haproxy + profile.kill_ws_direct
    ws_specs = specs_for(tasks, "kill-ws", ws_count, profile.padding)
    progress(f"kill: reference of {len(http_specs) + len(ws_specs)} padded episodes")
    reference = await play_all(http_specs + ws_specs, [cluster.reference.url], Counter(),
                               sequential=False)  # fmt: skip
    trigger = Trigger(len(http_specs) + len(ws_specs), KILL_AFTER_STEPS)
    ws_clients = [WsClient(spec, reference[spec.episode_id],
                           victim.ws_url if i < profile.kill_ws_direct else balancer.ws_url,
                           balancer.ws_url, profile.pause_s, trigger,
                           victim.name if i < profile.kill_ws_direct else "")
                  for i, spec in enumerate(ws_specs)]  # fmt: skip
    retries: Counter[str] = Counter()
    clients = http_clients([balancer.url])
    before = haproxy_counters(await balancer.stats())
    progress(f"kill: {ws_count} WebSocket clients ({profile.kill_ws_direct} straight to "
             f"{victim.name}) and {len(http_specs)} HTTP episodes under way")  # fmt: skip
    try:
        http_runs = [asyncio.create_task(play_http(
            spec, lambda _: clients[0], retries, profile.pause_s,
            lambda eid=spec.episode_id: trigger.step(eid))) for spec in http_specs]  # fmt: skip
        ws_runs = [asyncio.create_task(c.run()) for c in ws_clients]
        await asyncio.wait_for(trigger.event.wait(), PHASE_TIMEOUT_S)
        sessions = {name: int(row["scur"]) for name, row in (await balancer.stats()).items()
                    if name != "BACKEND"}  # fmt: skip
        assert victim.proc is not None
        progress(f"kill: SIGTERM to {victim.name} (pid {victim.proc.pid})")
        killed_at = time.monotonic()
        os.kill(victim.proc.pid, signal.SIGTERM)
        watcher = asyncio.create_task(watch_victim(victim, balancer, killed_at))
        played = await asyncio.wait_for(asyncio.gather(*http_runs), PHASE_TIMEOUT_S)
        await asyncio.wait_for(asyncio.gather(*ws_runs), PHASE_TIMEOUT_S)
        timeline = await watcher
    finally:
        await close_all(clients)
    after = haproxy_counters(await balancer.stats())
    http_played = {s.episode_id: p for s, p in zip(http_specs, played, strict=True)}
    report: dict[str, Any] = {
        "replicas": len(cluster.replicas),
        "victim": victim.name,
        "sessions_before_kill": sessions,
        "ws": ws_report(ws_clients, victim.name),
        "http": {"episodes": len(http_specs),
                 "steps": sum(len(p.bodies) - 2 for p in http_played.values()),
                 "finished": sum(1 for p in http_played.values() if final_outcome(p)["done"]),
                 **compare(reference, http_played), "retries": dict(sorted(retries.items())),
                 "retries_total": sum(retries.values()),
                 **served_summary(http_played)},
        "haproxy": {k: after[k] - before[k] for k in after},
        "timeline_s": timeline,
    }  # fmt: skip
    report["restart"] = await restart(cluster, processes, victim, equivalence_reference)
    errors = server_errors(cluster.replicas)
    report["server_error_lines"] = len(errors)
    report["server_error_samples"] = errors[:5]
    return report


async def restart(cluster: Cluster, processes: Processes, victim: Replica,
                  reference: dict[str, Played]) -> dict[str, Any]:  # fmt: skip
    """Start the victim again on its port; once HAProxy has it back, play a few equivalence
    episodes through HAProxy and count the requests it answered."""
    assert victim.proc is not None
    processes.stop(victim.proc)  # reaped already; nothing else of its group may be left
    progress(f"kill: restarting {victim.name} on port {victim.port}")
    started = time.monotonic()
    start_replica(processes, victim)
    healthy = await wait_healthy(victim)
    await cluster.balancer.wait_status(victim.name, "UP")
    up = time.monotonic() - started
    specs = [
        cluster.equivalence_specs[i]
        for i in range(min(RESTART_EPISODES, len(cluster.equivalence_specs)))
    ]
    retries: Counter[str] = Counter()
    played = await play_all(specs, [cluster.balancer.url], retries)
    served = served_summary(played)["requests_by_replica"]
    return {"healthy_after_s": round(healthy, 2), "up_in_haproxy_after_s": round(up, 2),
            "requests": sum(len(p.bodies) for p in played.values()),
            "requests_served_by_victim": served.get(victim.name, 0),
            "requests_by_replica": served, "retries": dict(retries),
            "identical": compare(reference, played)["identical"]}  # fmt: skip


# -- 3. throughput scaling --------------------------------------------------------------------


def load_action(step: int, lines: int, index: int) -> dict[str, Any]:
    """sessions_bench's mixed cycle: view, harmless edit, run the tests, undo, view a range."""
    kind = step % 5
    if kind == 1:
        return {"action_type": "REPLACE_LINES", "start_line": lines + 1, "end_line": lines,
                "new_code_block": f"# s{index} {step}"}  # fmt: skip
    if kind == 2:
        return {"action_type": "RUN_TESTS"}
    if kind == 3:
        return {"action_type": "UNDO_EDIT"}
    if kind == 4:
        return {"action_type": "VIEW_CODE", "start_line": 1, "end_line": 3}
    return {"action_type": "VIEW_CODE"}


class Load:
    """Shared state of the scaling load: when every session is ready, when to stop, and
    every step's (finish time, latency)."""

    def __init__(self, sessions: int) -> None:
        self.sessions = sessions
        self.ready = 0
        self.all_ready = asyncio.Event()
        self.stop_at = float("inf")
        self.samples: list[tuple[float, float, str]] = []  # (finished at, seconds, action)
        self.errors: list[str] = []
        self.landed: Counter[str] = Counter()

    def one_ready(self) -> None:
        self.ready += 1
        if self.ready >= self.sessions:
            self.all_ready.set()


async def load_session(load: Load, url: str, index: int, task: Task) -> None:
    ready = False
    try:
        async with websockets.connect(url, max_size=None, open_timeout=60,
                                      ping_interval=None) as sock:  # fmt: skip
            load.landed[sock.response.headers.get(SERVED_BY, "?")] += 1
            reset = {"task_id": task.task_id, "max_steps": LATENCY_MAX_STEPS}
            lines = len((await ws_call(sock, "reset", reset))["observation"]["code_dict"])
            ready = True
            load.one_ready()
            step = 0
            while time.monotonic() < load.stop_at:
                action = load_action(step, lines, index)
                started = time.perf_counter()
                reply = await ws_call(sock, "step", action)
                load.samples.append((time.monotonic(), time.perf_counter() - started,
                                     action["action_type"]))  # fmt: skip
                step += 1
                if reply["done"]:
                    reply = await ws_call(sock, "reset", reset)
                    step = 0
    except Exception as exc:  # noqa: BLE001 - counted and reported
        load.errors.append(f"session {index}: {exc!r}")
        if not ready:
            load.one_ready()


def own_cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` alone (user + system, every thread; no children)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return sum(int(f) for f in fields[11:13]) / CLOCK_TICKS


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid``, its live descendants, and the children they reaped."""
    total, stack = 0.0, [pid]
    while stack:
        current = stack.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += sum(int(f) for f in fields[11:15]) / CLOCK_TICKS
        stack += children_of(current)
    return total


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def cpu_snapshot(groups: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds so far of each group (with descendants), of the replicas' main processes
    alone (``replica_mains``, the event loops), and of this client."""
    shot = {name: sum(cpu_seconds(pid) for pid in pids) for name, pids in groups.items()}
    shot["replica_mains"] = sum(own_cpu_seconds(pid) for pid in groups["replicas"])
    shot["client"] = time.process_time()
    return shot


async def scaling_point(cluster: Cluster, processes: Processes, tasks: list[Task], count: int,
                        profile: Profile) -> dict[str, Any]:  # fmt: skip
    active = cluster.replicas[:count]
    balancer = await start_haproxy(processes, active, f"scaling-{count}")
    load = Load(profile.scaling_sessions)
    try:
        progress(f"scaling: {profile.scaling_sessions} sessions, {count} replica(s)")
        url = balancer.ws_url
        sessions = [asyncio.create_task(load_session(load, url, i, tasks[i % len(tasks)]))
                    for i in range(profile.scaling_sessions)]  # fmt: skip
        await asyncio.wait_for(load.all_ready.wait(), PHASE_TIMEOUT_S)
        await asyncio.sleep(profile.warmup_s)
        groups = {"replicas": [r.proc.pid for r in active if r.proc],
                  "other_servers": [r.proc.pid for r in cluster.servers
                                    if r.proc and r not in active],
                  "haproxy": [balancer.proc.pid], "redis": [cluster.redis.pid]}  # fmt: skip
        window_start, busy_start = time.monotonic(), machine_ticks()
        cpu_start = cpu_snapshot(groups)
        mains_start = [own_cpu_seconds(pid) for pid in groups["replicas"]]
        load.stop_at = window_start + profile.duration_s
        await asyncio.sleep(profile.duration_s)
        cpu_end, busy_end = cpu_snapshot(groups), machine_ticks()
        mains_end = [own_cpu_seconds(pid) for pid in groups["replicas"]]
        window = time.monotonic() - window_start
        loadavg = os.getloadavg()[0]
        await asyncio.wait_for(asyncio.gather(*sessions), PHASE_TIMEOUT_S)
    finally:
        processes.stop(balancer.proc)
    in_window = [(1000 * seconds, action) for t, seconds, action in load.samples
                 if window_start <= t <= window_start + window]  # fmt: skip
    by_action: dict[str, list[float]] = defaultdict(list)
    for ms, action in in_window:
        by_action[action].append(ms)
    cores = {name: round((cpu_end[name] - cpu_start[name]) / window, 2) for name in cpu_end}
    cores["total"] = round(sum(v for k, v in cores.items() if k != "replica_mains"), 2)
    cores["sandboxes"] = round(cores["replicas"] - cores["replica_mains"], 2)
    mains = [round((end - start) / window, 2) for start, end in zip(mains_start, mains_end,
                                                                    strict=True)]  # fmt: skip
    return {
        "replicas": count,
        "steps": len(in_window),
        "steps_per_s": round(len(in_window) / window, 1),
        "latency_ms": {"p50": percentile([ms for ms, _ in in_window], 0.5),
                       "p99": percentile([ms for ms, _ in in_window], 0.99)},
        "latency_ms_by_action": {action: {"n": len(v), "p50": percentile(v, 0.5),
                                          "p99": percentile(v, 0.99)}
                                 for action, v in sorted(by_action.items())},
        "errors": len(load.errors),
        "error_samples": load.errors[:3],
        "sessions_by_replica": dict(sorted(load.landed.items())),
        "cpu_cores": cores,
        "replica_main_cores": mains,
        "machine_busy": round((busy_end[0] - busy_start[0]) / (busy_end[1] - busy_start[1]), 2),
        "loadavg_1m": round(loadavg, 2),
    }  # fmt: skip


async def scaling(cluster: Cluster, processes: Processes, tasks: list[Task],
                  profile: Profile) -> dict[str, Any]:  # fmt: skip
    points = []
    for count in profile.scaling_points:
        points.append(await scaling_point(cluster, processes, tasks, count, profile))
        await asyncio.sleep(1.0)  # the sessions' slots are freed as their sockets close
    base = points[0]["steps_per_s"] or 1.0
    for point in points:
        point["ratio_to_1"] = round(point["steps_per_s"] / base, 2)
    return {"sessions": profile.scaling_sessions, "warmup_s": profile.warmup_s,
            "duration_s": profile.duration_s, "cpus": os.cpu_count(), "points": points}  # fmt: skip


# -- 4. Redis round-trip cost -----------------------------------------------------------------


def latency_cycle(lines: int, cycle: int) -> list[dict[str, Any]]:
    """Five VIEW_CODE, a harmless edit, its undo, and two RUN_TESTS of changed code."""
    view = {"action_type": "VIEW_CODE"}
    return [
        view,
        {"action_type": "VIEW_CODE", "start_line": 1, "end_line": 3},
        {
            "action_type": "REPLACE_LINES",
            "start_line": lines + 1,
            "end_line": lines,
            "new_code_block": f"# cycle {cycle}",
        },  # fmt: skip
        {"action_type": "RUN_TESTS"},
        view,
        {"action_type": "VIEW_CODE", "start_line": 2, "end_line": 4},
        {"action_type": "UNDO_EDIT"},
        {"action_type": "RUN_TESTS"},
        view,
    ]


def redis_ping_ms(port: int) -> dict[str, float]:
    client = redis.Redis(host=LOOPBACK, port=port)
    try:
        samples = []
        for _ in range(REDIS_PINGS):
            started = time.perf_counter()
            client.ping()
            samples.append((time.perf_counter() - started) * 1000)
    finally:
        client.close()
    return {"p50": percentile(samples, 0.5), "p99": percentile(samples, 0.99)}


def redis_commands(probe: redis.Redis) -> Counter[str]:
    """Calls per Redis command so far, but the probe's own (INFO, CLIENT, HELLO)."""
    stats = probe.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()
                    if not name.startswith(("cmdstat_info", "cmdstat_client",
                                            "cmdstat_hello"))})  # fmt: skip


def latency_stats(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {action: {"n": len(v), "p50": percentile(v, 0.5), "p99": percentile(v, 0.99),
                     "mean": round(statistics.fmean(v), 2)}
            for action, v in sorted(samples.items())}  # fmt: skip


async def timed_step(client: httpx.AsyncClient, action: dict[str, Any], episode_id: str) -> float:
    """One sequential step; its latency in ms (``RuntimeError`` if it failed)."""
    payload = {"action": action, "episode_id": episode_id}
    started = time.perf_counter()
    response = await client.post("/step", json=payload)
    elapsed = (time.perf_counter() - started) * 1000
    if response.status_code != 200 or response.json()["observation"].get("last_action_error"):
        raise RuntimeError(f"latency step failed: {response.text[:300]}")
    return elapsed


async def redis_latency(cluster: Cluster, task: Task, cycles: int) -> dict[str, Any]:
    stores = {"memory": cluster.reference.url, "redis": cluster.replicas[0].url}
    total = (cycles + LATENCY_WARMUP_CYCLES) * len(latency_cycle(1, 0))
    if total >= LATENCY_MAX_STEPS:
        raise ValueError(f"{cycles} latency cycles need {total} steps, over {LATENCY_MAX_STEPS}")
    clients = {store: httpx.AsyncClient(base_url=url, timeout=STEP_TIMEOUT_S)
               for store, url in stores.items()}  # fmt: skip
    samples: dict[str, dict[str, list[float]]] = {s: defaultdict(list) for s in stores}
    commands: Counter[str] = Counter()
    probe = redis.Redis(host=LOOPBACK, port=cluster.redis_port)
    progress(f"redis latency: {cycles} cycles on memory vs Redis, interleaved")
    try:
        lines = {}
        for store, client in clients.items():
            reset = {"task_id": task.task_id, "episode_id": f"latency-{store}",
                     "max_steps": LATENCY_MAX_STEPS}  # fmt: skip
            response = await request(client, "POST", "/reset", Counter(), json=reset)
            lines[store] = len(response.json()["observation"]["code_dict"])
        for cycle in range(LATENCY_WARMUP_CYCLES + cycles):
            measured = cycle >= LATENCY_WARMUP_CYCLES
            for store in list(stores) if cycle % 2 == 0 else list(reversed(stores)):
                before = redis_commands(probe) if store == "redis" else Counter()
                for action in latency_cycle(lines[store], cycle):
                    elapsed = await timed_step(clients[store], action, f"latency-{store}")
                    if measured:
                        samples[store][action["action_type"]].append(elapsed)
                if store == "redis" and measured:
                    commands += redis_commands(probe) - before
    finally:
        probe.close()
        await asyncio.gather(*(client.aclose() for client in clients.values()))
    memory, stored = latency_stats(samples["memory"]), latency_stats(samples["redis"])
    steps = sum(len(v) for v in samples["redis"].values())
    return {
        "cycles": cycles,
        "samples_per_store": {action: v["n"] for action, v in memory.items()},
        "redis_ping_ms": redis_ping_ms(cluster.redis_port),
        "redis_commands_per_step": round(commands.total() / steps, 2) if steps else None,
        "redis_commands_per_step_by_command": {name: round(n / steps, 2)
                                               for name, n in sorted(commands.items())},
        "memory": memory,
        "redis": stored,
        "difference_ms": {action: {q: round(stored[action][q] - memory[action][q], 2)
                                   for q in ("p50", "p99", "mean")} for action in memory},
    }  # fmt: skip


# -- the cluster and the run ------------------------------------------------------------------


@dataclass
class Cluster:
    """Redis, the replicas, the reference server and the HAProxy in front of the replicas."""

    redis: subprocess.Popen
    redis_port: int
    replicas: list[Replica]
    reference: Replica
    balancer: Balancer
    equivalence_specs: list[Spec]

    @property
    def servers(self) -> list[Replica]:
        return [*self.replicas, self.reference]


async def start_cluster(processes: Processes, profile: Profile, server_env: dict[str, str],
                        specs: list[Spec]) -> Cluster:  # fmt: skip
    workdir = processes.workdir
    redis_port, reference_port, *ports = free_ports(profile.replicas + 2)
    progress(f"starting redis on port {redis_port}, {profile.replicas} replicas, a reference")
    redis_proc = processes.adopt(start_redis(redis_port, log=str(workdir / "redis.log")))
    base = {**os.environ, **server_env}
    base.pop("EPISODE_STORE", None)
    store = f"redis://{LOOPBACK}:{redis_port}/0"
    replicas = [Replica(f"r{i}", port, {**base, "EPISODE_STORE": store}, workdir / f"r{i}.log")
                for i, port in enumerate(ports, 1)]  # fmt: skip
    reference = Replica("reference", reference_port, {**base, "EPISODE_STORE": "memory"},
                        workdir / "reference.log")  # fmt: skip
    for replica in [*replicas, reference]:
        start_replica(processes, replica)
    for replica in [*replicas, reference]:
        await wait_healthy(replica)
    balancer = await start_haproxy(processes, replicas, "main")
    return Cluster(redis_proc, redis_port, replicas, reference, balancer, specs)


async def run(profile: Profile, processes: Processes) -> dict[str, Any]:
    started = time.monotonic()
    server_env, from_compose = compose_environment()
    tasks = curated_tasks(profile.tasks)
    specs = specs_for(tasks, "eq", len(KINDS) * len(tasks))
    cluster = await start_cluster(processes, profile, server_env, specs)
    report: dict[str, Any] = {
        "mode": profile.name,
        "config": {"replicas": profile.replicas, "server_env": server_env,
                   "compose": str(COMPOSE.relative_to(REPO)) if from_compose else None,
                   "haproxy_cfg": str(HAPROXY_CFG.relative_to(REPO)),
                   "tasks": [t.task_id for t in tasks]},
    }  # fmt: skip
    report["equivalence"], reference = await equivalence(cluster, specs)
    report["kill"] = await kill_test(cluster, processes, tasks, profile, reference)
    processes.stop(cluster.balancer.proc)
    report["redis_latency"] = await redis_latency(cluster, tasks[0], profile.latency_cycles)
    report["scaling"] = await scaling(cluster, processes, tasks, profile)
    report["wall_s"] = round(time.monotonic() - started, 1)
    return report


# -- the summary ------------------------------------------------------------------------------


def summary(report: dict[str, Any]) -> str:
    eq, kill = report["equivalence"], report["kill"]
    ws, http, lat = kill["ws"], kill["http"], report["redis_latency"]
    lines = [
        f"replicas benchmark ({report['mode']}, {report['config']['replicas']} replicas, "
        f"{report['wall_s']} s)",
        f"equivalence: {eq['episodes']} episodes x {eq['steps_per_episode']} steps; reference "
        f"solved {eq['reference']['solved']}, truncated {eq['reference']['truncated']}",
        f"  replicas directly, round robin: identical {str(eq['direct']['identical']).lower()} "
        f"({eq['direct']['bodies']} bodies)",
        f"  through HAProxy: identical {str(eq['haproxy']['identical']).lower()} "
        f"({eq['haproxy']['bodies']} bodies, {eq['haproxy']['requests_by_replica']}, "
        f"replica switches {eq['haproxy']['replica_switches']})",
        f"  concurrent steps of one episode over the replicas: serialised "
        f"{str(eq['concurrent_steps']['serialised']).lower()}, final step counts "
        f"{eq['concurrent_steps']['final_step_counts']}",
        f"kill: SIGTERM to {kill['victim']}: exit after {kill['timeline_s'].get('exit_after')} s "
        f"(status {kill['timeline_s'].get('exit_status')}), HAProxy marked it down after "
        f"{kill['timeline_s'].get('marked_down_after')} s",
        f"  WebSocket: {ws['on_victim']}/{ws['clients']} clients on the victim, close codes "
        f"{ws['close_codes']}, {ws['victim_clients_reconnected_and_finished']} reconnected and "
        f"finished, others undisturbed {str(ws['others_undisturbed']).lower()}, observations "
        f"identical {str(ws['identical']).lower()}",
        f"  HTTP: {http['finished']}/{http['episodes']} episodes finished, {http['steps']} "
        f"steps, identical {str(http['identical']).lower()}, client retries "
        f"{http['retries_total']} {http['retries']}, HAProxy {kill['haproxy']}",
        f"  restart: healthy after {kill['restart']['healthy_after_s']} s, up in HAProxy after "
        f"{kill['restart']['up_in_haproxy_after_s']} s, served "
        f"{kill['restart']['requests_served_by_victim']}/{kill['restart']['requests']} "
        f"requests, identical {str(kill['restart']['identical']).lower()}",
        f"  server ERROR lines: {kill['server_error_lines']}",
        f"scaling ({report['scaling']['sessions']} WebSocket sessions, "
        f"{report['scaling']['duration_s']} s):",
    ]
    for point in report["scaling"]["points"]:
        none = {"p50": None, "p99": None}
        tests = point["latency_ms_by_action"].get("RUN_TESTS", none)
        views = point["latency_ms_by_action"].get("VIEW_CODE", none)
        lines.append(
            f"  {point['replicas']} replica(s): {point['steps_per_s']} steps/s "
            f"(x{point['ratio_to_1']}), p50/p99 {point['latency_ms']['p50']}/"
            f"{point['latency_ms']['p99']} ms (RUN_TESTS {tests['p50']}/{tests['p99']}, "
            f"VIEW_CODE {views['p50']}/{views['p99']}), errors {point['errors']}"
        )
        cores = point["cpu_cores"]
        lines.append(
            f"    CPU cores: replica processes {cores['replica_mains']} (each "
            f"{point['replica_main_cores']}), their sandboxes {cores['sandboxes']}, HAProxy "
            f"{cores['haproxy']}, client {cores['client']}, total {cores['total']} of "
            f"{report['scaling']['cpus']}; machine busy {point['machine_busy']}"
        )
    lines.append(f"redis latency ({lat['cycles']} cycles; ping p50 "
                 f"{lat['redis_ping_ms']['p50']} ms, {lat['redis_commands_per_step']} Redis "
                 "commands per step):")  # fmt: skip
    for action, memory in lat["memory"].items():
        stored = lat["redis"][action]
        lines.append(f"  {action}: memory p50/p99 {memory['p50']}/{memory['p99']} ms, redis "
                     f"{stored['p50']}/{stored['p99']} ms, difference p50 "
                     f"{lat['difference_ms'][action]['p50']} ms (n={memory['n']})")  # fmt: skip
    return "\n".join(lines)


def interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a reduced run (about a minute)")
    add_results_option(parser)
    args = parser.parse_args()
    profile = QUICK if args.quick else FULL
    signal.signal(signal.SIGTERM, interrupted)  # so that the finally below stops everything
    with tempfile.TemporaryDirectory(prefix="tracefix-replicas-") as workdir:
        processes = Processes(Path(workdir))
        try:
            report = asyncio.run(run(profile, processes))
        except BaseException:
            for log in sorted(Path(workdir).glob("*.log")):
                print(f"--- {log.name} (tail)\n{tail(log)}", file=sys.stderr)
            raise
        finally:
            processes.stop_all()
    stamped = write_result("replicas", report, args.results)
    print(summary(stamped))


if __name__ == "__main__":
    main()
