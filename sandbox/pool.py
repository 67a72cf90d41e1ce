"""The zygote pool backend: warm, exec-started workers that fork one child per evaluation.

Admission is first-come, first-served (:class:`FairSlots`); a bounded queue turns overload
into :class:`SandboxBusy` instead of collapse. A worker that dies is replaced in the
background. Working directories live under one per-pool root, swept when a pool starts.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from typing import Any

from sandbox import layers
from sandbox.api import EvalRequest, EvalResult, Limits, SandboxBusy, SandboxUnavailable
from sandbox.harness import FRAME_HEADER as HEADER

log = logging.getLogger("tracefix_rl.sandbox")

ZYGOTE_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zygote.py")
WORKER_ENV = {
    "PATH": "/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "PYTHONHASHSEED": "0",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONIOENCODING": "utf-8",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MALLOC_ARENA_MAX": "2",
}
# -s -S: no user or site packages; -P: no script directory on sys.path; -B: no .pyc files.
# -E/-I are not used because they would drop PYTHONHASHSEED; the environment is ours anyway.
WORKER_FLAGS = ("-s", "-S", "-P", "-B")
HELLO_TIMEOUT_S = 30.0
RESPONSE_GRACE_S = 10.0
SANDBOX_ROOT_ENV = "SANDBOX_ROOT"


class FairSlots:
    """A counting semaphore that serves waiters first-come, first-served.

    ``threading.Semaphore`` lets a releasing thread grab the slot straight back, which
    starved some sessions for 10+ s under load; here a freed slot goes to the oldest waiter.
    """

    def __init__(self, count: int) -> None:
        self._free = count
        self._lock = threading.Lock()
        self._waiters: collections.deque[threading.Lock] = collections.deque()

    def acquire(self, timeout: float, max_waiting: int | None = None) -> bool:
        """Take a slot, waiting up to ``timeout``; give up at once when ``max_waiting``
        callers are already waiting."""
        with self._lock:
            if self._free > 0 and not self._waiters:
                self._free -= 1
                return True
            if max_waiting is not None and len(self._waiters) >= max_waiting:
                return False
            waiter = threading.Lock()
            waiter.acquire()
            self._waiters.append(waiter)
        if waiter.acquire(timeout=timeout):
            return True
        with self._lock:
            try:
                self._waiters.remove(waiter)
            except ValueError:
                return True  # a slot was handed over just as the wait timed out
            return False

    def release(self) -> None:
        with self._lock:
            if self._waiters:
                self._waiters.popleft().release()
            else:
                self._free += 1

    @property
    def waiting(self) -> int:
        return len(self._waiters)


class WorkerDied(RuntimeError):
    """The zygote process ended or stopped answering."""


class _Worker:
    """One zygote process and its framed stdin/stdout channel."""

    def __init__(self, root: str, options: dict[str, Any]) -> None:
        os.makedirs(root, mode=0o711, exist_ok=True)
        for stale in os.listdir(root):
            shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
        self.proc = subprocess.Popen(
            [sys.executable, *WORKER_FLAGS, ZYGOTE_SCRIPT, root, json.dumps(options)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=dict(WORKER_ENV),
            cwd="/",
            close_fds=True,
        )
        self.layers: dict[str, Any] = {}

    def handshake(self) -> _Worker:
        """Wait for the zygote's hello (its probed isolation layers); returns ``self``."""
        try:
            hello = self._receive(time.monotonic() + HELLO_TIMEOUT_S)
        except WorkerDied:
            self.kill()
            raise
        self.layers = hello["layers"]
        return self

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def call(self, message: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        body = json.dumps(message).encode()
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(HEADER.pack(len(body)) + body)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise WorkerDied(f"worker not accepting requests: {exc}") from None
        return self._receive(time.monotonic() + timeout_s)

    def _receive(self, deadline: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        header = self._read(fd, HEADER.size, deadline)
        return json.loads(self._read(fd, HEADER.unpack(header)[0], deadline))

    def _read(self, fd: int, size: int, deadline: float) -> bytes:
        chunks, remaining = [], size
        while remaining:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([fd], [], [], wait)[0]:
                self.kill()
                raise WorkerDied("worker did not answer in time")
            chunk = os.read(fd, remaining)
            if not chunk:
                raise WorkerDied(f"worker exited (code {self.proc.wait()})")
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def kill(self) -> None:
        if self.alive:
            self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # EOF: the zygote exits after its current request
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self.kill()
        for stream in (self.proc.stdout,):
            if stream is not None:
                stream.close()


def _sweep_stale_roots(base: str) -> None:
    """Remove pool roots (named ``<pid>-…``) left behind by processes that are gone."""
    for name in os.listdir(base):
        pid = name.split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
        except PermissionError:
            pass


class ZygotePool:
    """Sandbox backend: ``workers`` warm zygotes, each running one evaluation at a time."""

    name = "zygote"

    def __init__(
        self,
        limits: Limits | None = None,
        workers: int | None = None,
        queue_timeout_s: float = 30.0,
        max_queue: int = 1024,
        root: str | None = None,
        allow_degraded: bool = False,
        landlock: bool = True,
        seccomp: bool = True,
        uid_drop: bool = True,
    ) -> None:
        self.limits = limits or Limits()
        self.size = workers or min(max(2, os.cpu_count() or 2), 8)
        self.queue_timeout_s = queue_timeout_s
        self.max_queue = max_queue
        base = (
            root
            or os.environ.get(SANDBOX_ROOT_ENV)
            or os.path.join(tempfile.gettempdir(), "tracefix-sandbox")
        )
        os.makedirs(base, mode=0o711, exist_ok=True)
        _sweep_stale_roots(base)
        self.root = tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=base)
        os.chmod(self.root, 0o711)  # children that dropped root must reach their workdir
        self._options = {"no_landlock": not landlock, "no_seccomp": not seccomp,
                         "no_uid_drop": not uid_drop}  # fmt: skip
        layers.set_dumpable(False)  # same-uid children cannot read /proc/<server>/*
        self._lock = threading.Lock()
        self._slots = FairSlots(self.size)
        self._idle: collections.deque[_Worker] = collections.deque()
        self._counter = 0
        self.in_flight = 0
        self.evaluations = 0
        self.respawns = 0
        started = [self._launch() for _ in range(self.size)]  # they boot in parallel
        try:
            self._idle.extend(worker.handshake() for worker in started)
        except WorkerDied:
            for worker in started:
                worker.kill()
            raise
        self.layers = dict(self._idle[0].layers)
        self._check_isolation(allow_degraded)
        log.info("sandbox: %d workers, layers %s", self.size, self.enforced())

    # -- isolation policy -------------------------------------------------------------------

    def enforced(self) -> list[str]:
        names = ["process_group_kill", "rlimits", "non_dumpable"]
        names += [n for n in ("seccomp", "uid_drop") if self.layers.get(n)]
        if self.layers.get("landlock_abi"):
            names.append(f"landlock_abi_{self.layers['landlock_abi']}")
        return names

    def degraded(self) -> list[str]:
        missing = [n for n in ("seccomp",) if not self.layers.get(n)]
        if not self.layers.get("landlock_abi"):
            missing.append("landlock")
        return missing

    def _check_isolation(self, allow_degraded: bool) -> None:
        errors = self.layers.get("errors") or {}
        if not self.layers.get("seccomp"):
            why = errors.get("seccomp") or "disabled or unsupported on this platform"
            message = (
                f"the seccomp filter is not enforced ({why}): agent code could open sockets, "
                "start processes and signal other processes"
            )
            if not allow_degraded:
                self.close()
                raise SandboxUnavailable(
                    message + "; refusing to start. Set SANDBOX_ALLOW_DEGRADED=1 to run anyway."
                )
            log.warning("sandbox DEGRADED: %s (SANDBOX_ALLOW_DEGRADED=1)", message)
        if not self.layers.get("landlock_abi"):
            why = errors.get("landlock") or "not offered by this kernel, or disabled"
            log.warning(
                "sandbox degraded: Landlock is not enforced (%s); agent code can read and "
                "write files this user can, and plant files in shared temp directories",
                why,
            )

    # -- workers ----------------------------------------------------------------------------

    def _launch(self) -> _Worker:
        with self._lock:
            self._counter += 1
            number = self._counter
        return _Worker(os.path.join(self.root, f"w{number}"), self._options)

    def _spawn(self) -> _Worker:
        return self._launch().handshake()

    def _replace_in_background(self, dead: _Worker) -> None:
        def respawn() -> None:
            dead.kill()
            try:
                worker = self._spawn()
            except Exception:  # noqa: BLE001 - retried by the next failure
                log.exception("sandbox: could not respawn a worker")
                worker = None
            with self._lock:
                self.respawns += 1
                if worker is not None:
                    self._idle.append(worker)
            if worker is not None:
                self._slots.release()

        threading.Thread(target=respawn, name="sandbox-respawn", daemon=True).start()

    # -- SandboxBackend -----------------------------------------------------------------------

    def run(self, request: EvalRequest, cancel: threading.Event | None = None) -> EvalResult:
        queued = self._slots.waiting
        if not self._slots.acquire(self.queue_timeout_s, max_waiting=self.max_queue):
            if queued >= self.max_queue:
                raise SandboxBusy(
                    f"sandbox busy: the queue is full ({self.max_queue} evaluations waiting "
                    f"for {self.size} workers); retry later"
                )
            raise SandboxBusy(
                f"sandbox busy: all {self.size} workers stayed busy for "
                f"{self.queue_timeout_s:.0f}s; retry later"
            )
        limits = request.limits or self.limits
        message = {
            "code": request.code,
            "tests": list(request.tests),
            "labels": list(request.labels),
            "limits": asdict(limits),
        }
        with self._lock:
            worker = self._idle.popleft()
            self.in_flight += 1
        healthy = False  # until a response is read: an interrupted call leaves the channel
        try:  # holding a stale answer, so such a worker is replaced, never reused
            for attempt in (1, 2):
                try:
                    response = worker.call(message, limits.wall_s + RESPONSE_GRACE_S)
                    healthy = True
                    break
                except WorkerDied as exc:
                    log.warning("sandbox worker died: %s", exc)
                    if attempt == 2 or "not accepting" not in str(exc):
                        return _no_result(f"sandbox worker died: {exc}")
                    worker.kill()  # it was already dead before this request: use a new one
                    worker = self._spawn()
                    with self._lock:
                        self.respawns += 1
            if "error" in response:
                return _no_result(f"sandbox error: {response['error']}")
            return _result(response)
        finally:
            with self._lock:
                self.in_flight -= 1
                self.evaluations += 1
                if healthy:
                    self._idle.append(worker)
            if healthy:
                self._slots.release()
            else:
                self._replace_in_background(worker)

    def describe(self) -> dict[str, Any]:
        with self._lock:
            alive = sum(w.alive for w in self._idle) + self.in_flight
        return {
            "backend": self.name,
            "seccomp": bool(self.layers.get("seccomp")),
            "landlock_abi": int(self.layers.get("landlock_abi") or 0),
            "uid_drop": bool(self.layers.get("uid_drop")),
            "rlimits": bool(self.layers.get("rlimits")),
            "non_dumpable": True,
            "layers": self.enforced(),
            "degraded": self.degraded(),
            "workers": self.size,
            "workers_alive": alive,
            "in_flight": self.in_flight,
            "queued": self._slots.waiting,
            "evaluations": self.evaluations,
            "respawns": self.respawns,
            "limits": asdict(self.limits),
        }

    def health_problem(self) -> str | None:
        alive = self.describe()["workers_alive"]
        if alive < self.size:
            return f"{alive} of {self.size} sandbox workers are alive"
        return None

    def close(self) -> None:
        with self._lock:
            workers, self._idle = list(self._idle), collections.deque()
        for worker in workers:
            worker.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _result(response: dict[str, Any]) -> EvalResult:
    records, malformed = parse_records(response["records"])
    return EvalResult(
        records=records,
        malformed_lines=malformed,
        output=response["output"],
        output_truncated=response["output_truncated"],
        exit_code=response["exit_code"],
        signal=response["signal"],
        timed_out=response["timed_out"],
        result_overflow=response["result_overflow"],
        duration_ms=response["duration_ms"],
    )


def _no_result(reason: str) -> EvalResult:
    return EvalResult(
        records=[], malformed_lines=0, output=reason, output_truncated=False, exit_code=None,
        signal=None, timed_out=False, result_overflow=False, duration_ms=0.0,
    )  # fmt: skip


def parse_records(raw: str) -> tuple[list[dict[str, Any]], int]:
    """Split the result channel into JSON-object records; count lines that are not."""
    records: list[dict[str, Any]] = []
    malformed = 0
    for line in raw.split("\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            malformed += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            malformed += 1
    return records, malformed
