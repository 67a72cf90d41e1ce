"""WebSocket soak: thousands of episodes against one server, honest and hostile, looking for
anything that accumulates.

    uv run python bench/soak_bench.py [--episodes 6000] [--concurrency 32] [--quick]

``--concurrency`` typed clients (``client.TraceFixEnv``) play episodes back to back; each
client opens a new session every ``EPISODES_PER_SESSION`` episodes, so sessions churn too.
An episode resets (a distinct seed), views the code, replaces it, runs the visible tests and
submits. One episode in ``HOSTILE_EVERY`` replaces the code with a hostile program instead
(an infinite loop, a memory bomb, an output flood, ``os._exit``, deep recursion, writes to
the filesystem, a fork, text UTF-8 cannot encode): the paths where a sandbox leaks are the
ones where a child is killed or a limit is hit.

Every ``SAMPLE_EVERY`` episodes it records the server's RSS (and its workers'), its open
descriptors, and the processes and directories under its sandbox root. At the end it checks:
0 errors, 0 orphan processes (anything but the workers and the one child each keeps waiting),
0 leftover directories (anything but each worker's empty working directory), and that the
server's RSS is flat: the growth from the end of warm-up (the first ``WARM_UP_SHARE`` of the
run) to the end, and the least-squares slope per 1,000 episodes over that span. After the
server stops: no process of it and no sandbox directory is left.

Writes ``bench/results/soak.json`` (or into ``--results DIR``); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO, add_results_option, free_port, stop_process_group, write_result

from tracefix_rl import models  # noqa: F401  (before openenv: keeps gradio out)

# isort: split

import httpx

from tracefix_rl.client import TraceFixEnv
from tracefix_rl.models import TraceFixAction
from tracefix_rl.procs import children_of
from tracefix_rl.sandbox.pool import ROOT_LOCK_SUFFIX
from tracefix_rl.server import SERVER_MODULE

EPISODES = 6000
QUICK_EPISODES = 300
CONCURRENCY = 32
EPISODES_PER_SESSION = 10
HOSTILE_EVERY = 10
SAMPLE_EVERY = 250
WARM_UP_SHARE = 0.1
# "Flat": at most this much RSS growth after warm-up, and at most this slope. The server's
# RSS rises over the first few thousand episodes and levels off (in one 20,000-episode run:
# 0.3 MiB per 1,000 episodes overall, 0.2 at the end), while tracemalloc saw its Python
# objects grow by 28 KB per 2,000 episodes: the rest is allocator state, not a leak of
# objects (glibc's malloc_trim every 2 s and PYTHONMALLOC=malloc did not remove it).
FLAT_GROWTH_MIB = 16.0
FLAT_SLOPE_MIB_PER_1000 = 2.0
SERVER_ENV = {  # short limits so that killed children are common, not slow
    "SANDBOX_WALL_TIMEOUT_S": "1",
    "SANDBOX_TEST_TIMEOUT_S": "0.25",
    "SANDBOX_CPU_S": "1",
    "LOG_LEVEL": "WARNING",
}
HOSTILE = [
    "while True:\n    pass\n",
    "x = bytearray(8 * 1024 ** 3)\n",
    "while True:\n    print('y' * 10000)\n",
    "import os\nos._exit(0)\n",
    "import sys\nsys.setrecursionlimit(10 ** 6)\ndef r(n):\n    return r(n + 1)\nr(0)\n",
    "import os\nfor i in range(1000):\n    os.mkdir('d%d' % i)\n",
    "import os\nos.fork()\n",
    "raise ValueError('bad \\udcff')\n",
]


def status_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1])
    return 0


def rss_mib(pid: int) -> float:
    return status_field(pid, "VmRSS") / 1024


def is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def orphans(server: int, root: Path) -> list[int]:
    """Processes of this server that should not exist: a worker's second child, anything
    below a child, and any process working in the sandbox root that escaped its parents."""
    expected = {server}
    found: list[int] = []
    for worker in children_of(server):
        expected.add(worker)
        waiting = [c for c in children_of(worker) if not is_zombie(c)]
        expected.update(waiting[:1])
        found += waiting[1:]
        for child in waiting:
            found += [g for g in children_of(child) if not is_zombie(g)]
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in expected:
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if cwd.startswith(str(root)) and not is_zombie(int(entry)):
            found.append(int(entry))
    return sorted(set(found))


def leftover_entries(root: Path) -> list[str]:
    """Anything under the sandbox root but the pool root(s) and their lock files, the
    workers' directories and their empty working directories."""
    found = []
    for pool_root in root.iterdir():
        if pool_root.name.endswith(ROOT_LOCK_SUFFIX) and pool_root.is_file():
            continue
        for worker in pool_root.iterdir():
            for entry in worker.iterdir():
                if entry.name != "cwd" or any(entry.iterdir()):
                    found.append(str(entry.relative_to(root)))
    return found


def sample(server: int, root: Path, episodes: int) -> dict[str, Any]:
    workers = children_of(server)
    return {
        "episodes": episodes,
        "server_rss_mib": round(rss_mib(server), 1),
        "workers_rss_mib": round(sum(rss_mib(w) for w in workers), 1),
        "server_fds": len(os.listdir(f"/proc/{server}/fd")),
        "server_threads": status_field(server, "Threads"),
        "orphans": len(orphans(server, root)),
        "leftover_entries": len(leftover_entries(root)),
    }


def plan(episode: int, lines: int, hostile: bool) -> list[TraceFixAction]:
    honest = f"# episode {episode}\n"  # a harmless edit: a comment on top
    code = HOSTILE[(episode // HOSTILE_EVERY) % len(HOSTILE)] if hostile else honest
    end = lines if hostile else 0
    return [
        TraceFixAction(action_type="VIEW_CODE"),
        TraceFixAction(
            action_type="REPLACE_LINES", start_line=1, end_line=end, new_code_block=code
        ),  # fmt: skip
        TraceFixAction(action_type="RUN_TESTS"),
        TraceFixAction(action_type="SUBMIT"),
    ]


async def play(url: str, episodes: int, concurrency: int, server: int, root: Path) -> dict:
    counter = iter(range(episodes))
    errors: list[str] = []
    samples: list[dict[str, Any]] = []
    done = 0
    solved = 0
    started = time.monotonic()

    async def client() -> None:
        nonlocal done, solved
        env: TraceFixEnv | None = None
        played = 0
        for episode in counter:
            try:
                if env is None or played == EPISODES_PER_SESSION:
                    if env is not None:
                        await env.close()
                    env = TraceFixEnv(base_url=url)
                    await env.connect()
                    played = 0
                result = await env.reset(seed=episode)
                lines = len(result.observation.code_dict)
                for action in plan(episode, lines, episode % HOSTILE_EVERY == 0):
                    result = await env.step(action)
                if not result.done or result.observation.score is None:
                    errors.append(f"episode {episode}: not graded: {result.observation}")
                solved += bool(result.observation.solved)
                played += 1
            except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
                errors.append(f"episode {episode}: {type(exc).__name__}: {exc}")
                env = None
            done += 1
            if done % SAMPLE_EVERY == 0:
                samples.append(sample(server, root, done))
                rate = done / (time.monotonic() - started)
                print(f"[soak] {done}/{episodes} episodes, {rate:.0f}/s, {len(errors)} errors, "
                      f"server RSS {samples[-1]['server_rss_mib']} MiB, "
                      f"{samples[-1]['server_threads']} threads",
                      file=sys.stderr, flush=True)  # fmt: skip
        if env is not None:
            await env.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return {"errors": errors, "samples": samples, "solved": solved,
            "wall_s": round(time.monotonic() - started, 1)}  # fmt: skip


def slope_per_1000(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (episodes, MiB) points, in MiB per 1,000 episodes."""
    if len(points) < 2:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var


def soak(episodes: int = EPISODES, concurrency: int = CONCURRENCY) -> dict[str, Any]:
    """Run the soak against a fresh server; the result row (see the module docstring)."""
    root = Path(tempfile.mkdtemp(prefix="tracefix-soak-"))
    os.chmod(root, 0o755)
    port = free_port()
    env = {**os.environ, **SERVER_ENV, "SANDBOX_ROOT": str(root),
           "MAX_CONCURRENT_ENVS": str(concurrency + 8)}  # fmt: skip
    env.pop("ENABLE_WEB_INTERFACE", None)
    handle, log_path = tempfile.mkstemp(prefix="tracefix-soak-", suffix=".log")
    log_file = os.fdopen(handle, "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", SERVER_MODULE, "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
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
                raise RuntimeError("the server did not start")
            time.sleep(0.1)
        before = sample(server.pid, root, 0)
        outcome = asyncio.run(play(url, episodes, concurrency, server.pid, root))
        time.sleep(1.0)  # let the last children be reaped
        after = sample(server.pid, root, episodes)
        health = httpx.get(f"{url}/health", timeout=10).json()
    finally:
        stop_process_group(server)
        log_file.close()
    log = Path(log_path).read_text(errors="replace")
    Path(log_path).unlink(missing_ok=True)
    left_behind = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    survivors = orphans(server.pid, root)
    shutil.rmtree(root, ignore_errors=True)
    warm = [s for s in outcome["samples"] if s["episodes"] >= WARM_UP_SHARE * episodes]
    points = [(s["episodes"], s["server_rss_mib"]) for s in warm]
    growth = round(after["server_rss_mib"] - warm[0]["server_rss_mib"], 1) if warm else 0.0
    slope = round(slope_per_1000(points), 2)
    return {
        "episodes": episodes,
        "concurrency": concurrency,
        "episodes_per_session": EPISODES_PER_SESSION,
        "hostile_share": round(1 / HOSTILE_EVERY, 2),
        "wall_s": outcome["wall_s"],
        "episodes_per_s": round(episodes / outcome["wall_s"], 1),
        "errors": len(outcome["errors"]),
        "error_samples": outcome["errors"][:5],
        "solved": outcome["solved"],
        "before": before,
        "after": after,
        "samples": outcome["samples"],
        "rss_growth_after_warm_up_mib": growth,
        "rss_slope_mib_per_1000_episodes": slope,
        "rss_flat": growth <= FLAT_GROWTH_MIB and slope <= FLAT_SLOPE_MIB_PER_1000,
        "flat_growth_mib": FLAT_GROWTH_MIB,
        "flat_slope_mib_per_1000": FLAT_SLOPE_MIB_PER_1000,
        "orphans": after["orphans"],
        "leftover_entries": after["leftover_entries"],
        "sandbox_faults": health["sandbox"]["faults"],
        "sandbox_respawns": health["sandbox"]["respawns"],
        "left_behind_after_stop": left_behind[:10],
        "processes_after_stop": len(survivors),
        "server_error_lines": sum(" ERROR " in line for line in log.splitlines()),
        "server_tracebacks": log.count("Traceback"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=int, default=EPISODES)
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_EPISODES} episodes")
    add_results_option(parser)
    args = parser.parse_args()
    episodes = QUICK_EPISODES if args.quick else args.episodes
    report = soak(episodes, args.concurrency)
    write_result("soak", report, args.results)
    shown = {k: v for k, v in report.items() if k != "samples"}
    for key, value in shown.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
