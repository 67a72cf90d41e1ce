"""Run every benchmark, then write the plots and ``BENCHMARKS.md``.

    uv run python bench/run_all.py [--quick]

Runs, each in a fresh process so one cannot warm or slow the next: the sandbox benchmark,
the sessions benchmark (WebSocket N = 64, 256, 512; stateful HTTP N = 64, 256; 256
WebSocket sessions of 10 steps, half RUN_TESTS), cold start (5 runs), corpus generation,
the 6,000-episode soak, the TRACE benchmark (TRACE vs RUN_TESTS latency on every curated
task, and the fault-locator study) and the import benchmark (the QuixBugs and HumanEvalPack
importers on the test fixtures, every kept task played through a server) and the replicas
benchmark (Redis, 3 replicas and HAProxy on loopback: equivalence, a replica killed mid-run,
throughput with 1-3 replicas, what Redis costs a step); then ``bench/report.py``.
About 8 minutes on 2 cores.
The JSON and plots go to ``bench/results/``, the table to ``BENCHMARKS.md``: the committed
results.

``--quick`` is a smoke run (few samples, 32 sessions, no generation) whose JSON, plots and
``BENCHMARKS.md`` go to a new scratch folder (printed; ``--results DIR`` picks it), never
over the committed results. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, RESULTS
from report import BENCHMARKS_MD

SCRATCH_PREFIX = "tracefix-bench-quick-"

FULL = [
    ["sandbox_bench.py"],
    [
        "sessions_bench.py",
        "--sessions",
        "64",
        "256",
        "512",
        "--http",
        "64",
        "256",
        "--tests-half",
        "256",
    ],
    ["coldstart_bench.py", "--runs", "5"],
    ["generate_bench.py"],
    ["soak_bench.py", "--episodes", "6000"],
    ["trace_bench.py"],
    ["import_bench.py"],
    ["replicas.py"],
]
QUICK = [
    ["sandbox_bench.py", "--quick"],
    ["sessions_bench.py", "--sessions", "32", "--http", "32", "--tests-half", "32"],
    ["coldstart_bench.py", "--runs", "2"],
    ["soak_bench.py", "--quick"],
    ["trace_bench.py", "--quick"],
    ["import_bench.py"],
    ["replicas.py", "--quick"],
]


def destination(quick: bool, results: Path | None) -> tuple[Path, Path]:
    """The results folder and the table: ``results`` holding both, if given; else a new
    scratch folder holding both for a quick run; else the committed ones."""
    if results is None and quick:
        results = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX))
    if results is None:
        return RESULTS, BENCHMARKS_MD
    return results, results / BENCHMARKS_MD.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run with small sizes, written to a scratch folder")  # fmt: skip
    parser.add_argument("--results", type=Path, help="write the JSON, plots and table here")
    args = parser.parse_args()
    results, table = destination(args.quick, args.results)
    print(f"[bench] results go to {results}, the table to {table}", file=sys.stderr, flush=True)
    started = time.monotonic()
    steps = [*(QUICK if args.quick else FULL), ["report.py", "--target", str(table)]]
    for command in steps:
        step = time.monotonic()
        print(f"[bench] {' '.join(command)}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, str(REPO / "bench" / command[0]), *command[1:],
                        "--results", str(results)], cwd=REPO, check=True)  # fmt: skip
        took, total = time.monotonic() - step, time.monotonic() - started
        print(f"[bench] {command[0]} done in {took:.0f} s ({total:.0f} s so far)",
              file=sys.stderr, flush=True)  # fmt: skip
    print(f"[bench] done: results in {results}, the table in {table}", file=sys.stderr,
          flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
