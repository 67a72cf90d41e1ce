"""Helpers for programs that start a server in a subprocess: a free port, stopping it.

Used by the tests (``tests/conftest.py``), the benchmarks (``bench/common.py``) and any
client that runs a local server; it imports nothing of the server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

LOOPBACK = "127.0.0.1"
STOP_GRACE_S = 15.0


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on ``host`` that was free a moment ago (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """``count`` distinct TCP ports on ``host`` that were free a moment ago (calling
    :func:`free_port` once per port can return one port twice: the OS reuses a released one)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def stop_process_group(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """End a process started with ``start_new_session=True`` and everything in its group:
    SIGTERM, then SIGKILL if it has not exited within ``grace_s``; returns once it has been
    reaped. Does nothing if it has already exited."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:  # it exited between poll() and killpg()
        proc.wait()


def children_of(pid: int) -> list[int]:
    """The live children of ``pid``, whichever of its threads started them (each thread has
    its own ``/proc/<pid>/task/<tid>/children``; the sandbox's supervisor thread starts
    replacement workers). A thread that ends while it is read is skipped; [] once ``pid``
    is gone."""
    found: list[int] = []
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for thread in threads:
        try:
            with open(f"/proc/{pid}/task/{thread}/children") as handle:
                found += [int(child) for child in handle.read().split()]
        except OSError:  # the thread ended meanwhile
            continue
    return found


REDIS_SERVER = "redis-server"
READY_TIMEOUT_S = 20.0


def wait_for_port(port: int, proc: subprocess.Popen, host: str = LOOPBACK,
                  timeout_s: float = READY_TIMEOUT_S) -> None:  # fmt: skip
    """Return once ``host:port`` accepts a TCP connection; ``RuntimeError`` if ``proc``
    exits first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listened on {host}:{port} within {timeout_s:.0f}s")


def start_redis(port: int, log: str = os.devnull) -> subprocess.Popen:
    """A throwaway ``redis-server`` (Debian's package) on ``127.0.0.1:port``: no persistence,
    its own session (stop it with :func:`stop_process_group`). Returns once it listens."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(port), "--bind", LOOPBACK, "--save", "",
             "--appendonly", "no", "--protected-mode", "yes"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    wait_for_port(port, proc)
    return proc
