"""Sandbox benchmark: RUN_TESTS latency and evaluations/s, beside a bare ``os.fork`` floor
and a TraceFix-style ``multiprocessing.Process``-per-run baseline, all in one run.

    uv run python bench/sandbox_bench.py [--quick]

Writes ``bench/results/sandbox.json`` (or into ``--results DIR``) and prints a table.
Everything is measured in one run on this machine, so ratios (sandboxed latency / fork
floor, / baseline) are meaningful even when the machine is noisy; absolute numbers are not
comparable across machines.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import REPO, RESULTS, add_results_option, write_result

from tracefix_rl import models  # noqa: F401  (before openenv: keeps gradio out)

# isort: split

from tracefix_rl.environment import TraceFixEnvironment
from tracefix_rl.models import TraceFixAction
from tracefix_rl.sandbox import EvalRequest, ZygotePool, get_sandbox
from tracefix_rl.tasks import get_registry

TIER_TASKS = {
    "easy": "sum_of_evens_wrong_modulus",
    "medium": "merge_sort_wrong_tail_index",
    "hard": "lru_cache_get_does_not_promote",
}
EVAL_FLOOR = """
import json, os, sys, time
sys.path.insert(0, sys.argv[2])
import harness
request = json.loads(sys.argv[3])
samples = []
for _ in range(int(sys.argv[1])):
    start = time.perf_counter()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        harness.run_tests(request, write_end)
    os.close(write_end)
    while os.read(read_end, 65536):
        pass
    os.close(read_end)
    os.waitpid(pid, 0)
    samples.append((time.perf_counter() - start) * 1000)
print(",".join(f"{s:.4f}" for s in samples))
"""
MULTIPROCESSING_SMALL = """
import json, multiprocessing, sys, time
def child(code, tests, results):
    namespace = {}
    outcomes = []
    try:
        exec(compile(code, "<solution>", "exec"), namespace)
        for source in tests:
            try:
                exec(compile(source, "<test>", "exec"), namespace)
                outcomes.append((True, ""))
            except Exception as exc:
                outcomes.append((False, repr(exc)))
    except Exception as exc:
        outcomes.append((False, repr(exc)))
    results.put(outcomes)
if __name__ == "__main__":
    request = json.loads(sys.argv[2])
    context = multiprocessing.get_context("fork")
    samples = []
    for _ in range(int(sys.argv[1])):
        start = time.perf_counter()
        results = context.Queue()
        process = context.Process(target=child, args=(request["code"], request["tests"], results))
        process.start()
        outcomes = results.get(timeout=5)
        process.join(5)
        results.close()
        samples.append((time.perf_counter() - start) * 1000)
        assert len(outcomes) == len(request["tests"])
    print(",".join(f"{s:.4f}" for s in samples))
"""
FORK_FLOOR = """
import os, sys, time
samples = []
for _ in range(int(sys.argv[1])):
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    samples.append((time.perf_counter() - start) * 1000)
print(",".join(f"{s:.4f}" for s in samples))
"""


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(samples: list[float]) -> dict[str, float]:
    return {
        "n": len(samples),
        "p50_ms": round(statistics.median(samples), 3),
        "p99_ms": round(percentile(samples, 0.99), 3),
        "mean_ms": round(statistics.fmean(samples), 3),
    }


def fork_floor(n: int) -> dict[str, float]:
    """fork + exit + wait in a small fresh interpreter (the size of a sandbox worker)."""
    out = subprocess.run(
        [sys.executable, "-s", "-S", "-c", FORK_FLOOR, str(n)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return summarize([float(x) for x in out.stdout.strip().split(",")])


def eval_floor(task_id: str, n: int) -> dict[str, float]:
    """fork + the same evaluation with no isolation layers + pipe + wait, in a small
    interpreter that preloaded only the harness: the cost of process-per-run itself."""
    task = get_registry().tasks[task_id]
    request = {"code": task.solution, "tests": [t.code for t in task.visible_tests],
               "labels": [t.name for t in task.visible_tests],
               "limits": {"per_test_s": 1.0}}  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-s", "-S", "-c", EVAL_FLOOR, str(n), str(REPO / "sandbox"),
         json.dumps(request)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return summarize([float(x) for x in out.stdout.strip().split(",")])


def run_tests_latency(task_id: str, n: int) -> dict[str, float]:
    """Time RUN_TESTS steps through the environment (sandbox + judge), busting the cache."""
    env = TraceFixEnvironment()
    obs = env.reset(task_id=task_id, max_steps=1000)
    last_line = len(obs.code_dict)
    samples = []
    for i in range(n):
        if env.state.step_count > 990:
            obs = env.reset(task_id=task_id, max_steps=1000)
            last_line = len(obs.code_dict)
        env.step(TraceFixAction(action_type="REPLACE_LINES", start_line=last_line + 1,
                                end_line=last_line, new_code_block=f"# run {i}"))  # fmt: skip
        last_line += 1
        start = time.perf_counter()
        env.step(TraceFixAction(action_type="RUN_TESTS"))
        samples.append((time.perf_counter() - start) * 1000)
    return summarize(samples)


def _tracefix_child(code: str, tests: list[str], results: multiprocessing.Queue) -> None:
    """TraceFix-RL's child: exec the code, then each test into the same namespace."""
    namespace: dict = {}
    outcomes = []
    try:
        exec(compile(code, "<solution>", "exec"), namespace)
        for source in tests:
            try:
                exec(compile(source, "<test>", "exec"), namespace)
                outcomes.append((True, ""))
            except Exception as exc:  # noqa: BLE001 - a failing test is a result
                outcomes.append((False, repr(exc)))
    except Exception as exc:  # noqa: BLE001
        outcomes.append((False, repr(exc)))
    results.put(outcomes)


def multiprocessing_small(task_id: str, n: int) -> dict[str, float]:
    """A plain ``multiprocessing`` fork ``Process`` per run with no isolation, from a small
    interpreter that loaded only ``multiprocessing`` (the TraceFix-style child below, without
    the cost of forking a server-sized parent): the stricter baseline."""
    task = get_registry().tasks[task_id]
    request = {"code": task.solution, "tests": [t.code for t in task.visible_tests]}
    out = subprocess.run(
        [sys.executable, "-s", "-S", "-c", MULTIPROCESSING_SMALL, str(n), json.dumps(request)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return summarize([float(x) for x in out.stdout.strip().split(",")])


def tracefix_baseline(task_id: str, n: int) -> dict[str, float]:
    """TraceFix-style process-per-run: a ``multiprocessing`` fork Process of this (server-
    sized) process per evaluation, results through a Queue, ``join`` with a 5 s timeout."""
    task = get_registry().tasks[task_id]
    tests = [t.code for t in task.visible_tests]
    context = multiprocessing.get_context("fork")
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        results = context.Queue()
        process = context.Process(target=_tracefix_child, args=(task.solution, tests, results))
        process.start()
        outcomes = results.get(timeout=5)
        process.join(5)
        results.close()
        samples.append((time.perf_counter() - start) * 1000)
        assert len(outcomes) == len(tests)
    return summarize(samples)


def throughput(sandbox, concurrency: int, seconds: float) -> dict[str, float]:
    """Evaluations/s of the easy task's visible tests with ``concurrency`` client threads."""
    task = get_registry().tasks[TIER_TASKS["easy"]]
    request = EvalRequest(code=task.solution, tests=tuple(t.code for t in task.visible_tests))
    count = [0] * concurrency
    stop = time.monotonic() + seconds

    def client(slot: int) -> None:
        while time.monotonic() < stop:
            result = sandbox.run(request)
            assert len(result.records) == len(request.tests)
            count[slot] += 1

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    return {"concurrency": concurrency, "evaluations": sum(count),
            "per_second": round(sum(count) / elapsed, 1)}  # fmt: skip


def worker_sweep(counts: tuple[int, ...], seconds: float) -> list[dict[str, float]]:
    """Evaluations/s against pools of each size, with 8 client threads."""
    rows = []
    for workers in counts:
        pool = ZygotePool(workers=workers)
        try:
            rows.append({"workers": workers, **throughput(pool, 8, seconds)})
        finally:
            pool.close()
    return rows


def rss_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return round(int(status.split("VmRSS:")[1].split()[0]) / 1024, 1)


def run(quick: bool = False, results: Path = RESULTS) -> dict:
    """Measure everything; write and return the report."""
    n, seconds = (50, 1.0) if quick else (300, 3.0)
    sandbox = get_sandbox()
    print(f"sandbox layers: {sandbox.describe()['layers']}", file=sys.stderr)
    bare = fork_floor(n)
    floors = {tier: eval_floor(task, n) for tier, task in TIER_TASKS.items()}
    latency = {tier: run_tests_latency(task, n) for tier, task in TIER_TASKS.items()}
    parent_rss = rss_mib()
    baseline = {tier: tracefix_baseline(task, n) for tier, task in TIER_TASKS.items()}
    small = {tier: multiprocessing_small(task, n) for tier, task in TIER_TASKS.items()}
    rates = [throughput(sandbox, c, seconds) for c in (1, 2, 4, 8)]
    workers = worker_sweep((1, 2, 3, 4), seconds)
    report = write_result("sandbox", {
        "sandbox": sandbox.describe(),
        "bare_fork": bare,
        "fork_floor": floors,
        "run_tests": latency,
        "tracefix_baseline": {"parent_rss_mib": parent_rss, **baseline},
        "multiprocessing_small": small,
        "ratio_p50_to_multiprocessing_small": {
            tier: round(stats["p50_ms"] / small[tier]["p50_ms"], 2)
            for tier, stats in latency.items()
        },
        "ratio_p50_to_fork_floor": {
            tier: round(stats["p50_ms"] / floors[tier]["p50_ms"], 2)
            for tier, stats in latency.items()
        },
        "ratio_p50_to_tracefix_baseline": {
            tier: round(stats["p50_ms"] / baseline[tier]["p50_ms"], 2)
            for tier, stats in latency.items()
        },
        "throughput": rates,
        "throughput_by_workers": workers,
    }, results)  # fmt: skip
    print(f"bare fork+exit+wait: p50 {bare['p50_ms']} ms, p99 {bare['p99_ms']} ms")
    for tier, stats in latency.items():
        to_floor = report["ratio_p50_to_fork_floor"][tier]
        to_baseline = report["ratio_p50_to_tracefix_baseline"][tier]
        print(f"{tier:6} ({TIER_TASKS[tier]}): RUN_TESTS p50 {stats['p50_ms']} ms, "
              f"p99 {stats['p99_ms']} ms; fork floor p50 {floors[tier]['p50_ms']} ms "
              f"({to_floor}x); TraceFix-style p50 {baseline[tier]['p50_ms']} ms "
              f"({to_baseline}x); plain multiprocessing (small process) p50 "
              f"{small[tier]['p50_ms']} ms "
              f"({report['ratio_p50_to_multiprocessing_small'][tier]}x)")  # fmt: skip
    for rate in rates:
        print(f"concurrency {rate['concurrency']}: {rate['per_second']} evaluations/s")
    for row in workers:
        print(f"{row['workers']} workers: {row['per_second']} evaluations/s")
    sandbox.close()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (smoke run)")
    add_results_option(parser)
    args = parser.parse_args()
    run(args.quick, args.results)


if __name__ == "__main__":
    main()
