"""Run every benchmark, then write the plots and ``BENCHMARKS.md``.

    uv run python bench/run_all.py [--quick]

Runs, each in a fresh process so one cannot warm or slow the next: the sandbox benchmark,
the sessions benchmark (WebSocket N = 64, 256, 512; stateful HTTP N = 64, 256; 256
WebSocket sessions of 10 steps, half RUN_TESTS), cold start (5 runs), corpus generation and
the 6,000-episode soak; then ``bench/report.py``. About 9 minutes on 2 cores.
``--quick`` is a smoke run (few samples, 32 sessions, no generation) that still writes
results: rerun without it before committing numbers. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from common import REPO

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
]
QUICK = [
    ["sandbox_bench.py", "--quick"],
    ["sessions_bench.py", "--sessions", "32", "--http", "32", "--tests-half", "32"],
    ["coldstart_bench.py", "--runs", "2"],
    ["soak_bench.py", "--quick"],
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run with small sizes")
    args = parser.parse_args()
    started = time.monotonic()
    for command in [*(QUICK if args.quick else FULL), ["report.py"]]:
        step = time.monotonic()
        print(f"[bench] {' '.join(command)}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, str(REPO / "bench" / command[0]), *command[1:]],
                       cwd=REPO, check=True)  # fmt: skip
        took, total = time.monotonic() - step, time.monotonic() - started
        print(f"[bench] {command[0]} done in {took:.0f} s ({total:.0f} s so far)",
              file=sys.stderr, flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
