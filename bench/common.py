"""Shared helpers of the benchmarks: paths, machine facts, process control, result files."""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the process group started with ``start_new_session``; SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace_s)


def machine() -> dict[str, Any]:
    """The facts a reader needs to compare numbers: CPUs, memory, kernel, Python."""
    meminfo = Path("/proc/meminfo").read_text().split()
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def write_result(name: str, report: dict[str, Any]) -> dict[str, Any]:
    """Stamp ``report`` with the date and machine and write ``bench/results/<name>.json``."""
    stamped = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        **report,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(stamped, indent=2) + "\n")
    return stamped
