"""Shared helpers of the benchmarks: paths, machine facts, process control, result files.

Every benchmark writes its JSON to ``bench/results/`` (the committed results), or to the
folder its ``--results`` option names (``run_all.py --quick`` passes a scratch folder).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tracefix_rl.procs import free_port, stop_process_group  # noqa: E402,F401  (re-exported)


def add_results_option(parser: argparse.ArgumentParser) -> None:
    """The ``--results DIR`` option every benchmark takes (default ``bench/results``)."""
    parser.add_argument(
        "--results",
        type=Path,
        default=RESULTS,
        help="folder to write the result JSON to (default: bench/results)",
    )


def machine() -> dict[str, Any]:
    """The facts a reader needs to compare numbers: CPUs, memory, kernel, Python."""
    meminfo = Path("/proc/meminfo").read_text().split()
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def write_result(name: str, report: dict[str, Any], results: Path = RESULTS) -> dict[str, Any]:
    """Stamp ``report`` with the date and machine and write ``<results>/<name>.json``."""
    stamped = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        **report,
    }
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(stamped, indent=2) + "\n")
    return stamped
