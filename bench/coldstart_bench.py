"""Cold start: process start to the first ``POST /reset`` answered 200.

    uv run python bench/coldstart_bench.py [--runs 5]

Starts ``python -m tracefix_rl.server.app`` (the venv's interpreter, as the Docker image
does) ``--runs``
times, polls ``POST /reset {}`` every 10 ms from the moment the process is spawned, and
reports the median and worst time to the first 200 beside a bare ``python -c pass`` start in
the same run. Writes ``bench/results/coldstart.json`` (or into ``--results DIR``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from common import REPO, RESULTS, add_results_option, free_port, stop_process_group, write_result

from tracefix_rl.server import SERVER_MODULE

POLL_S = 0.01
DEADLINE_S = 60.0


def first_reset_s(extra_env: dict[str, str] | None = None) -> float:
    """Seconds from spawning the server to its first 200 on ``POST /reset``."""
    port = free_port()
    env = {**os.environ, "LOG_LEVEL": "WARNING", **(extra_env or {})}
    started = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", SERVER_MODULE, "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            while time.perf_counter() - started < DEADLINE_S:
                try:
                    if http.post("/reset", json={}).status_code == 200:
                        return time.perf_counter() - started
                except httpx.TransportError:
                    pass
                if server.poll() is not None:
                    raise RuntimeError(f"server exited with {server.returncode}")
                time.sleep(POLL_S)
        raise RuntimeError(f"no /reset 200 within {DEADLINE_S:.0f}s")
    finally:
        stop_process_group(server)


def bare_python_s() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - started


def summarize(samples: list[float]) -> dict[str, float]:
    return {
        "runs": len(samples),
        "median_s": round(statistics.median(samples), 3),
        "min_s": round(min(samples), 3),
        "max_s": round(max(samples), 3),
    }


def run(runs: int, results: Path = RESULTS) -> dict:
    """Measure and return the cold-start report (also written to the results folder)."""
    bare = [bare_python_s() for _ in range(runs)]
    server = []
    for index in range(runs):
        server.append(first_reset_s())
        print(f"cold start {index + 1}/{runs}: {server[-1]:.2f} s", file=sys.stderr, flush=True)
    report = {
        "command": "python -m tracefix_rl.server.app",
        "first_reset_200": summarize(server),
        "bare_python_start": summarize(bare),
        "target_s": 2.0,
    }
    report["ratio_to_bare_python"] = round(
        report["first_reset_200"]["median_s"] / report["bare_python_start"]["median_s"], 1
    )
    return write_result("coldstart", report, results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    add_results_option(parser)
    args = parser.parse_args()
    print(json.dumps(run(args.runs, args.results), indent=2))


if __name__ == "__main__":
    main()
