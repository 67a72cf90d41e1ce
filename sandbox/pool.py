"""The zygote pool backend: warm, exec-started workers, each holding one pre-forked child.

Per evaluation the pool takes an idle worker, writes the request straight into that
worker's waiting child and reads the child's records and output straight from it (see
``zygote`` for why the worker itself never touches them), then tells the worker to end the
child; the worker reaps it and forks the next one while the result goes back to the caller.

* **Admission** is first-come, first-served (:class:`FairSlots`); a bounded queue turns
  overload into :class:`SandboxBusy` instead of collapse.
* **Faults are not the agent's failures.** A worker that dies, a child that dies before the
  harness started, or a child SIGKILLed from outside (not by its CPU limit, not by our wall
  clock; the child itself cannot send SIGKILL) is a sandbox fault: the evaluation is retried
  once on another worker, then :class:`SandboxFault` is raised. A child stopped by its own
  limits (time, CPU, memory, output) is the agent's result.
* **Supervision.** A supervisor thread watches every worker's pidfd, replaces any worker
  that dies for any reason, idle or busy, and :meth:`health_problem` reports a shortfall.
* **Cancellation.** ``run(..., cancel=event)``: setting the event drops a queued evaluation
  or kills the running child (within ``CANCEL_POLL_S``) and raises
  :class:`EvaluationCancelled`.
* **Directories.** One root per pool under ``root`` (``SANDBOX_ROOT``), owned through an
  ``flock`` on its lock file for the pool's life; roots whose lock nobody holds are swept
  in the background (a pid test would not do: from a container's PID namespace, every
  server outside it looks dead). No sweep or cleanup can be defeated by what agent code
  wrote (``cleanup.remove_tree``; the filesystem is read-only to it anyway).
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from tracefix_rl.sandbox import layers
from tracefix_rl.sandbox.api import (
    EvalRequest,
    EvalResult,
    EvaluationCancelled,
    Limits,
    SandboxBusy,
    SandboxFault,
    SandboxUnavailable,
)
from tracefix_rl.sandbox.cleanup import remove_tree
from tracefix_rl.sandbox.harness import DONE_LINE, STARTED_LINE

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
HELLO_TIMEOUT_S = 30.0  # a worker's start-up: interpreter, preloads, layer probe
READY_TIMEOUT_S = 10.0  # a worker's next child after the previous one ended
ENDED_TIMEOUT_S = 5.0  # SIGKILL and reap of a child, when its exit status is needed
CANCEL_POLL_S = 0.05  # how often a waiting or running evaluation looks at its cancel event
RESPAWN_BACKOFF_S = (0.1, 0.5, 2.0, 5.0)  # between failed attempts to start a worker
SUPERVISE_POLL_S = 1.0  # the supervisor also rechecks every worker this often
CLOSE_GRACE_S = 0.5  # how long close() lets workers end their children themselves
READ_CHUNK = 65536
MESSAGE_BYTES = 65536
CPU_LIMIT_SLACK_S = 0.5  # SIGKILL with this much CPU of the cpu_s + 1 hard limit used = CPU limit


MAX_DEFAULT_WORKERS = 8


def default_workers() -> int:
    """One worker per core, plus one: a worker spends part of every evaluation waiting on the
    server (request in, records out) and forking its next child, and the extra one keeps the
    cores busy meanwhile. Measured on 2 cores, 256 WebSocket sessions doing RUN_TESTS every
    other step: step P99 853-915 ms with 3 workers, 967-1070 ms with 2 (same run)."""
    return min(max(2, (os.cpu_count() or 1) + 1), MAX_DEFAULT_WORKERS)


class FairSlots:
    """A counting semaphore that serves waiters first-come, first-served.

    ``threading.Semaphore`` lets a releasing thread grab the slot straight back, which
    starved some sessions for 10+ s under load; here a freed slot goes to the oldest waiter.
    """

    def __init__(self, count: int) -> None:
        self._free = count
        self._lock = threading.Lock()
        self._waiters: collections.deque[threading.Lock] = collections.deque()

    def acquire(
        self,
        timeout: float,
        max_waiting: int | None = None,
        cancel: threading.Event | None = None,
    ) -> bool:
        """Take a slot, waiting up to ``timeout``; give up at once when ``max_waiting``
        callers are already waiting. Raises :class:`EvaluationCancelled` if ``cancel`` is
        set while waiting."""
        with self._lock:
            if self._free > 0 and not self._waiters:
                self._free -= 1
                return True
            if max_waiting is not None and len(self._waiters) >= max_waiting:
                return False
            waiter = threading.Lock()
            waiter.acquire()
            self._waiters.append(waiter)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            step = remaining if cancel is None else min(remaining, CANCEL_POLL_S)
            if step > 0 and waiter.acquire(timeout=step):
                return True
            cancelled = cancel is not None and cancel.is_set()
            if cancelled or remaining <= 0:
                with self._lock:
                    try:
                        self._waiters.remove(waiter)
                    except ValueError:  # a slot was handed over just as the wait ended
                        if not cancelled:
                            return True
                        self._release_locked()
                if cancelled:
                    raise EvaluationCancelled("the evaluation was cancelled while queued")
                return False

    def release(self) -> None:
        with self._lock:
            self._release_locked()

    def _release_locked(self) -> None:
        if self._waiters:
            self._waiters.popleft().release()
        else:
            self._free += 1

    @property
    def waiting(self) -> int:
        return len(self._waiters)


class WorkerFault(RuntimeError):
    """This evaluation was lost to the sandbox (not to the agent's code)."""


class ChildFault(WorkerFault):
    """Only the child was lost (killed from outside, or gone before its request): its
    worker is sound and forks the next child as usual."""


class _SpawnFailed(RuntimeError):
    """A replacement worker did not start."""


@dataclass
class _Child:
    """The server's handles on a worker's waiting child."""

    pid: int
    request_w: int
    record_r: int
    out_fd: int

    def close(self) -> None:
        for fd in (self.request_w, self.record_r, self.out_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.request_w = self.record_r = self.out_fd = -1


@dataclass
class _Run:
    """What the server read from one child."""

    records: bytes
    how: str  # done | eof | timeout | overflow
    started: bool
    output: bytes
    output_size: int
    duration_ms: float


class _Worker:
    """One zygote process: its control socket and its current waiting child."""

    def __init__(self, number: int, root: str, options: dict[str, Any]) -> None:
        self.number = number
        self.root = root
        os.makedirs(root, mode=0o711, exist_ok=True)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, *WORKER_FLAGS, ZYGOTE_SCRIPT, root, json.dumps(options),
                 str(theirs.fileno())],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env=dict(WORKER_ENV),
                cwd="/",
                close_fds=True,
                pass_fds=(theirs.fileno(),),
            )  # fmt: skip
        finally:
            theirs.close()
        self.control = ours
        self.pidfd = _pidfd(self.proc.pid)
        self.layers: dict[str, Any] = {}
        self.child: _Child | None = None
        self.ending = False  # an "end" was sent and its "ended" not yet read
        self.busy = False
        self.retired = False

    # -- control channel ------------------------------------------------------------------

    def _send(self, message: dict[str, Any]) -> None:
        try:
            self.control.send(json.dumps(message).encode())
        except OSError as exc:
            raise WorkerFault(f"worker {self.number} is gone ({exc})") from None

    def _receive(self, deadline: float) -> tuple[dict[str, Any], list[int]]:
        """The next control message and the descriptors that came with it."""
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([self.control], [], [], remaining)[0]:
            raise WorkerFault(f"worker {self.number} did not answer in time")
        try:
            data, fds, _, _ = socket.recv_fds(self.control, MESSAGE_BYTES, 3)
        except OSError as exc:
            raise WorkerFault(f"worker {self.number} is gone ({exc})") from None
        if not data:
            for fd in fds:
                os.close(fd)
            raise WorkerFault(f"worker {self.number} exited (code {self.proc.poll()})")
        return json.loads(data), fds

    def handshake(self) -> _Worker:
        """Wait for the zygote's hello (its probed isolation layers); returns ``self``."""
        message, fds = self._receive(time.monotonic() + HELLO_TIMEOUT_S)
        for fd in fds:
            os.close(fd)
        self.layers = message["layers"]
        return self

    def ready_child(self, deadline: float) -> _Child:
        """This worker's waiting child (reading past the previous child's ``ended``)."""
        while self.child is None:
            message, fds = self._receive(deadline)
            if "ready" in message and len(fds) == 3:
                self.child = _Child(message["ready"], *fds)
                self.ending = False
            else:
                for fd in fds:
                    os.close(fd)
        return self.child

    def end_child(self) -> None:
        """Have the worker SIGKILL and reap the current child (its answer is read later)."""
        child, self.child = self.child, None
        if child is not None:
            child.close()
        self.ending = True
        self._send({"end": child.pid if child else 0})

    def ended_status(self, deadline: float) -> tuple[int, float]:
        """(wait status, CPU seconds) of the child just ended."""
        while True:
            message, fds = self._receive(deadline)
            for fd in fds:
                os.close(fd)
            if "ended" in message:
                self.ending = False
                return int(message["status"]), float(message["cpu_s"])

    # -- one evaluation ---------------------------------------------------------------------

    def run(self, payload: bytes, limits: Limits, cancel: threading.Event | None) -> _Run:
        """Write ``payload`` to the waiting child and read what it produced."""
        child = self.ready_child(time.monotonic() + READY_TIMEOUT_S)
        start = time.monotonic()
        deadline = start + limits.wall_s
        try:
            _write_all(child.request_w, payload, deadline)
        except OSError as exc:
            message = f"the sandbox child of worker {self.number} is gone ({exc})"
            raise ChildFault(message) from None
        finally:
            os.close(child.request_w)
            child.request_w = -1
        data, how = self._read_records(child.record_r, deadline, limits.result_bytes, cancel)
        duration_ms = (time.monotonic() - start) * 1000.0
        size = os.fstat(child.out_fd).st_size
        output = os.pread(child.out_fd, min(size, limits.output_bytes), 0)
        started = data.startswith(STARTED_LINE)
        if started:
            data = data[len(STARTED_LINE) :]
        return _Run(data, how, started, output, size, duration_ms)

    def _read_records(
        self, fd: int, deadline: float, cap: int, cancel: threading.Event | None
    ) -> tuple[bytes, str]:
        """Read the result channel until the harness's last line, EOF, the wall-clock
        deadline or ``cap`` bytes; watch the worker and ``cancel`` meanwhile."""
        data = bytearray()
        watched = [fd, self.control]
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return bytes(data), "timeout"
            wait = remaining if cancel is None else min(remaining, CANCEL_POLL_S)
            ready = select.select(watched, [], [], wait)[0]
            if cancel is not None and cancel.is_set():
                raise EvaluationCancelled("the evaluation was cancelled while running")
            if self.control in ready:
                raise WorkerFault(f"worker {self.number} exited during an evaluation")
            if fd not in ready:
                continue
            chunk = os.read(fd, READ_CHUNK)
            if not chunk:
                return bytes(data), "eof"
            data += chunk
            if len(data) > cap:
                return bytes(data[:cap]), "overflow"
            if data.endswith(DONE_LINE):
                return bytes(data[: -len(DONE_LINE)]), "done"

    # -- life and death ---------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the worker and its current child; release every descriptor but the pidfd
        (the supervisor may be waiting on it: it closes it itself, see ``close_pidfd``)."""
        if self.child is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.child.pid, signal.SIGKILL)
            self.child.close()
            self.child = None
        if self.alive:
            self.proc.kill()
        self.proc.wait()
        self.control.close()

    def close_pidfd(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # kernel < 5.3: the supervisor polls instead
        return None


def _write_all(fd: int, data: bytes, deadline: float) -> None:
    """Write ``data`` to a pipe without ever blocking past ``deadline``."""
    os.set_blocking(fd, False)
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
            continue
        except BlockingIOError:
            pass
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([], [fd], [], remaining)[1]:
            raise OSError("the child did not read its request in time")


ROOT_LOCK_SUFFIX = ".lock"
# A root with no lock file is a leftover of an older version or of a start that crashed before
# it took its lock; it is swept by the pid in its name, and only once it is this old.
UNLOCKED_ROOT_AGE_S = 600.0


def _owner_gone(lock_path: str) -> bool:
    """True when no process holds the lock of a pool root any more. ``flock`` locks belong to
    the kernel's open file, so this holds across PID namespaces (a server in a container
    sees other servers' pids as dead) and a lock is freed when its owner dies, however."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)  # also drops the lock, if it was taken
    return True


def _unlocked_root_stale(path: str, pid: int) -> bool:
    """A root without a lock file: stale if old and no process of its pid is visible."""
    try:
        if time.time() - os.lstat(path).st_mtime < UNLOCKED_ROOT_AGE_S:
            return False
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):
        return False
    return False


def _sweep_stale_roots(base: str, own_root: str) -> None:
    """Remove pool roots (``<pid>-…``, each with its ``<pid>-….lock``) whose owner is gone.
    Runs in the background; nothing it meets can stop this server's start."""
    try:
        names = os.listdir(base)
    except OSError as exc:
        log.warning("sandbox: cannot sweep %s: %s", base, exc)
        return
    present = set(names)
    for name in names:
        path = os.path.join(base, name)
        pid = name.split("-", 1)[0]
        if path == own_root or name.endswith(ROOT_LOCK_SUFFIX) or not pid.isdigit():
            continue
        lock = name + ROOT_LOCK_SUFFIX
        if lock in present:
            stale = _owner_gone(os.path.join(base, lock))
        else:
            stale = _unlocked_root_stale(path, int(pid))
        if not stale:
            continue
        if not remove_tree(path):
            log.warning("sandbox: could not fully remove stale root %s", name)
        elif lock in present:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(base, lock))


def _make_root(base: str | None) -> tuple[str, int | None]:
    """This pool's own root under ``base`` and the descriptor holding its lock (or a private
    temporary root, without a lock, if ``base`` cannot be used); stale roots there are swept
    in the background. The lock file is made and locked before the root exists, so a sweep
    never takes a root that is being made for one that was left behind."""
    base = base or os.path.join(tempfile.gettempdir(), "tracefix-sandbox")
    lock_fd: int | None = None
    try:
        os.makedirs(base, mode=0o711, exist_ok=True)
        lock_fd, lock_path = tempfile.mkstemp(
            prefix=f"{os.getpid()}-", suffix=ROOT_LOCK_SUFFIX, dir=base
        )
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        root = lock_path[: -len(ROOT_LOCK_SUFFIX)]
        os.mkdir(root, 0o700)
    except OSError as exc:
        if lock_fd is not None:
            os.close(lock_fd)
            lock_fd = None
        fallback = tempfile.mkdtemp(prefix=f"tracefix-sandbox-{os.getpid()}-")
        log.warning("sandbox: cannot use %s (%s); using %s", base, exc, fallback)
        root = fallback
    else:
        threading.Thread(
            target=_sweep_stale_roots, args=(base, root), name="sandbox-sweep", daemon=True
        ).start()
    os.chmod(root, 0o711)  # children that dropped root must reach their workdir
    return root, lock_fd


def _remove_root(root: str, lock_fd: int | None) -> None:
    """Remove a pool's root, then its lock file, then release the lock."""
    remove_tree(root)
    if lock_fd is not None:
        with contextlib.suppress(OSError):
            os.unlink(root + ROOT_LOCK_SUFFIX)
        with contextlib.suppress(OSError):
            os.close(lock_fd)


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
        self.size = workers or default_workers()
        self.queue_timeout_s = queue_timeout_s
        self.max_queue = max_queue
        self.root, self._root_lock = _make_root(root)
        self._options = {"no_landlock": not landlock, "no_seccomp": not seccomp,
                         "no_uid_drop": not uid_drop}  # fmt: skip
        layers.set_dumpable(False)  # same-uid children cannot read /proc/<server>/*
        self._lock = threading.Lock()
        self._idle_ready = threading.Condition(self._lock)
        self._slots = FairSlots(self.size)
        self._workers: list[_Worker] = []
        self._idle: collections.deque[_Worker] = collections.deque()
        self._launching: _Worker | None = None  # a replacement the supervisor is starting
        self._graveyard: list[_Worker] = []  # retired workers whose pidfds are still open
        self._counter = 0
        self._closed = False
        self.in_flight = 0
        self.evaluations = 0
        self.respawns = 0
        self.faults = 0
        self.cancelled = 0
        started = [self._launch() for _ in range(self.size)]  # they boot in parallel
        try:
            for worker in started:
                worker.handshake()
        except WorkerFault:
            for worker in started:
                worker.kill()
                worker.close_pidfd()
            _remove_root(self.root, self._root_lock)
            raise
        self._workers.extend(started)
        self._idle.extend(started)
        self.layers = dict(started[0].layers)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._supervisor = threading.Thread(
            target=self._supervise, name="sandbox-supervisor", daemon=True
        )
        self._supervisor.start()
        self._check_isolation(allow_degraded)
        log.info("sandbox: %d workers, layers %s", self.size, self.enforced())

    # -- isolation policy -------------------------------------------------------------------

    def enforced(self) -> list[str]:
        names = ["process_group_kill", "rlimits", "non_dumpable"]
        names += [n for n in ("seccomp", "read_only_fs", "uid_drop") if self.layers.get(n)]
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
                "start processes, signal other processes and write files"
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
                "sandbox degraded: Landlock is not enforced (%s); agent code can read the "
                "files this user can read",
                why,
            )

    # -- workers ----------------------------------------------------------------------------

    def _launch(self) -> _Worker:
        with self._lock:
            return self._launch_locked()

    def _launch_locked(self) -> _Worker:
        self._counter += 1
        return _Worker(self._counter, os.path.join(self.root, f"w{self._counter}"), self._options)

    def _wake_supervisor(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    def _retire(self, worker: _Worker, reason: str, only_if_idle: bool = False) -> None:
        """Take ``worker`` out of service for good (the supervisor replaces it). With
        ``only_if_idle``, leave it alone if an evaluation holds it (that evaluation sees the
        death itself and retires it)."""
        with self._lock:
            if worker.retired or (only_if_idle and worker.busy):
                return
            worker.retired = True
            if worker in self._workers:
                self._workers.remove(worker)
            if worker in self._idle:
                self._idle.remove(worker)
            closed = self._closed
        if not closed:
            log.warning("sandbox worker %d retired: %s", worker.number, reason)
        worker.kill()
        if not closed:  # else close() removes the whole root, once
            remove_tree(worker.root)
        if closed and not self._supervisor.is_alive():
            worker.close_pidfd()
            return
        with self._lock:
            self._graveyard.append(worker)
        self._wake_supervisor()

    def _supervise(self) -> None:
        """Replace workers that died; runs until the pool closes and never dies itself."""
        failures = 0
        while True:
            try:
                if self._supervise_once():
                    return
                failures = 0
            except _SpawnFailed as exc:
                delay = RESPAWN_BACKOFF_S[min(failures, len(RESPAWN_BACKOFF_S) - 1)]
                failures += 1
                log.error("sandbox: could not start a worker (%s); retrying in %.1fs", exc, delay)
                time.sleep(delay)
            except Exception:  # noqa: BLE001 - log it and keep supervising
                log.exception("sandbox supervisor error; continuing")
                time.sleep(SUPERVISE_POLL_S)

    def _supervise_once(self) -> bool:
        """Wait for a death (or a wake-up), retire the dead, start one replacement if one is
        missing; True once the pool is closed."""
        with self._lock:
            if self._closed:
                return True
            graveyard, self._graveyard = self._graveyard, []
            watched = {w.pidfd: w for w in self._workers if not w.busy and w.pidfd is not None}
            missing = self.size - len(self._workers)
        for worker in graveyard:  # only this thread waits on pidfds, so only it closes them
            worker.close_pidfd()
        if os.getpid() == 1:
            self._reap_orphans()
        fds = [self._wake_r, *watched]
        ready = select.select(fds, [], [], 0 if missing else SUPERVISE_POLL_S)[0]
        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 4096)
        for fd in ready:
            if fd in watched:
                self._retire(watched[fd], "its process exited while idle", only_if_idle=True)
        with self._lock:
            idle_dead = [w for w in self._workers if not w.busy and not w.alive]
        for worker in idle_dead:
            self._retire(worker, "its process exited while idle", only_if_idle=True)
        with self._lock:
            if self._closed:
                return True
            missing = self.size - len(self._workers)
            if missing <= 0:
                return False
            self._launching = self._launch_locked()
        try:
            worker = self._launching.handshake()
        except (WorkerFault, OSError) as exc:
            with self._lock:
                launching, self._launching = self._launching, None
            if launching is not None:
                launching.kill()
                launching.close_pidfd()
                remove_tree(launching.root)
            raise _SpawnFailed(str(exc)) from None
        with self._lock:
            self._launching = None
            closed = self._closed
            if not closed:
                self.respawns += 1
                self._workers.append(worker)
                self._idle.append(worker)
                self._idle_ready.notify()
        if closed:
            worker.kill()
            worker.close_pidfd()
            remove_tree(self.root)
        return closed

    def _reap_orphans(self) -> None:
        """As PID 1 (a container without an init), orphans are re-parented to this server:
        reap those that exited (the children of a worker that died), never a worker."""
        with self._lock:
            ours = {w.proc.pid for w in self._workers}
            if self._launching is not None:
                ours.add(self._launching.proc.pid)
        while True:
            try:
                found = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if found is None or found.si_pid in ours:
                return  # nothing exited, or a worker did (the supervisor handles that)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(found.si_pid, os.WNOHANG)

    def _take_idle(self, deadline: float, cancel: threading.Event | None) -> _Worker:
        """An idle worker; waits (holding a slot, so one is owed to us) for a replacement."""
        with self._lock:
            while not self._idle:
                if self._closed:
                    raise SandboxFault("the sandbox is shutting down")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SandboxFault("no sandbox worker became available; they keep failing")
                if cancel is not None and cancel.is_set():
                    raise EvaluationCancelled("the evaluation was cancelled while queued")
                self._idle_ready.wait(min(remaining, CANCEL_POLL_S))
            worker = self._idle.popleft()
            worker.busy = True
            self.in_flight += 1
            return worker

    def _give_back(self, worker: _Worker) -> None:
        with self._lock:
            self.in_flight -= 1
            worker.busy = False
            usable = not worker.retired and not self._closed
            if usable:
                self._idle.append(worker)
                self._idle_ready.notify()
        if usable and not worker.alive:  # else the supervisor watches it again within a poll
            self._retire(worker, "its process exited during an evaluation")

    # -- SandboxBackend -----------------------------------------------------------------------

    def run(self, request: EvalRequest, cancel: threading.Event | None = None) -> EvalResult:
        if self._closed:
            raise SandboxFault("the sandbox is shutting down")
        try:
            return self._run(request, cancel)
        except EvaluationCancelled:
            with self._lock:
                self.cancelled += 1
            raise

    def _run(self, request: EvalRequest, cancel: threading.Event | None) -> EvalResult:
        queued = self._slots.waiting
        if not self._slots.acquire(self.queue_timeout_s, max_waiting=self.max_queue,
                                   cancel=cancel):  # fmt: skip
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
        message = {"code": request.code, "tests": list(request.tests),
                   "labels": list(request.labels), "limits": asdict(limits)}  # fmt: skip
        if any(request.as_list):
            message["as_list"] = list(request.as_list)
        if request.trace is not None:
            message["trace"] = request.trace
        payload = json.dumps(message).encode()
        try:
            deadline = time.monotonic() + self.queue_timeout_s + limits.wall_s
            fault = ""
            for _attempt in (1, 2):
                worker = self._take_idle(deadline, cancel)
                try:
                    return self._evaluate(worker, payload, limits, cancel)
                except EvaluationCancelled:
                    raise
                except WorkerFault as exc:
                    fault = str(exc)
                    with self._lock:
                        self.faults += 1
                        closed = self._closed
                    if not isinstance(exc, ChildFault) or not self._end_lost_child(worker):
                        self._retire(worker, fault)
                    if closed:
                        raise SandboxFault("the sandbox is shutting down") from None
                    log.warning("sandbox fault (%s); retrying", fault)
                except BaseException:  # e.g. KeyboardInterrupt: the worker's state is unknown
                    self._retire(worker, "interrupted during an evaluation")
                    raise
                finally:
                    self._give_back(worker)
            raise SandboxFault(f"sandbox fault: {fault}; retried once, failed again")
        finally:
            self._slots.release()

    def _end_lost_child(self, worker: _Worker) -> bool:
        """After a :class:`ChildFault`, have the worker reap the lost child and fork the next
        one; whether the worker is still fit to serve."""
        try:
            if worker.child is not None:
                worker.end_child()
        except WorkerFault:
            return False
        return worker.alive

    def _evaluate(
        self, worker: _Worker, payload: bytes, limits: Limits, cancel: threading.Event | None
    ) -> EvalResult:
        try:
            run = worker.run(payload, limits, cancel)
        except EvaluationCancelled:
            worker.end_child()
            raise
        worker.end_child()
        exit_code: int | None = 0
        signum: int | None = None
        if run.how == "eof":
            if not run.started:
                raise ChildFault("the sandbox child died before the tests started")
            status, cpu_s = worker.ended_status(time.monotonic() + ENDED_TIMEOUT_S)
            exit_code, signum = _classify(status, cpu_s, limits)
        with self._lock:
            self.evaluations += 1
        return _result(run, limits, exit_code, signum)

    def describe(self) -> dict[str, Any]:
        with self._lock:
            alive = sum(w.alive for w in self._workers)
        return {
            "backend": self.name,
            "seccomp": bool(self.layers.get("seccomp")),
            "read_only_fs": bool(self.layers.get("read_only_fs")),
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
            "faults": self.faults,
            "cancelled": self.cancelled,
            "limits": asdict(self.limits),
        }

    def health_problem(self) -> str | None:
        if self._closed:
            return "the sandbox is shut down"
        with self._lock:
            alive = sum(w.alive for w in self._workers)
        if alive < self.size:
            return f"only {alive} of {self.size} sandbox workers are alive (being replaced)"
        return None

    def close(self) -> None:
        """Stop every worker and child, then remove this pool's root (idempotent, fast)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            workers = list(self._workers)
            launching = self._launching
            self._idle_ready.notify_all()
        self._wake_supervisor()
        if launching is not None:
            with contextlib.suppress(OSError):
                launching.proc.kill()
        for worker in workers:  # EOF: each worker SIGKILLs its child and exits
            with contextlib.suppress(OSError):
                worker.control.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + CLOSE_GRACE_S
        for worker in workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        for worker in workers:
            with self._lock:
                busy = worker.busy
            if busy:  # its evaluating thread sees the fault and retires it
                if worker.child is not None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(worker.child.pid, signal.SIGKILL)
                if worker.alive:
                    worker.proc.kill()
            else:
                self._retire(worker, "the pool closed")
        self._supervisor.join(timeout=SUPERVISE_POLL_S + 1)
        deadline = time.monotonic() + CLOSE_GRACE_S
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)  # evaluations see their worker die and retire it
        with self._lock:
            graveyard, self._graveyard = self._graveyard, []
        for worker in graveyard:
            worker.close_pidfd()
        _remove_root(self.root, self._root_lock)


def _classify(status: int, cpu_s: float, limits: Limits) -> tuple[int | None, int | None]:
    """(exit code, signal) of a child that ended before finishing its tests. A SIGKILL
    that neither our wall clock nor its CPU limit sent came from outside: a sandbox fault."""
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return code, None
    signum = -code
    if signum == signal.SIGKILL:
        if cpu_s >= limits.cpu_s + 1 - CPU_LIMIT_SLACK_S:
            return None, signal.SIGXCPU  # the hard CPU limit: the same overrun as SIGXCPU
        raise ChildFault("the sandbox child was killed from outside (SIGKILL)")
    return None, signum


def _result(run: _Run, limits: Limits, exit_code: int | None, signum: int | None) -> EvalResult:
    records, malformed = parse_records(run.records.decode("utf-8", errors="replace"))
    return EvalResult(
        records=records,
        malformed_lines=malformed,
        output=run.output.decode("utf-8", errors="replace"),
        output_truncated=run.output_size > limits.output_bytes,
        exit_code=exit_code if run.how == "eof" else None,
        signal=signum,
        timed_out=run.how == "timeout",
        result_overflow=run.how == "overflow",
        duration_ms=run.duration_ms,
    )


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
