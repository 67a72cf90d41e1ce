"""Run untrusted Python code and its tests in isolated OS processes.

The sandbox returns *observations*, never verdicts: for every test it reports the
canonical value of the test's last expression, or the name of the exception it raised.
The judge (``environment.py``) holds the expected values and decides pass/fail; the
expected values never enter the process that runs the agent's code.

This file has two roles and therefore imports only the standard library:

* in the server, :class:`ProcessSandbox` starts one child process per evaluation;
* in the child (``python sandbox.py --child FD``), :func:`_child_main` applies resource
  limits, runs the code and the tests, and streams one JSON record per test to ``FD``.

Isolation of this first backend: a new session and process group (SIGKILLed as a whole on
timeout or at the end), every inherited fd closed except the result pipe, rlimits (CPU,
address space, file size which also caps captured output, open files, no core), a fresh
temporary working directory removed afterwards, and a minimal environment with no secrets.
Further layers (seccomp, Landlock, uid drop, warm workers) slot in behind the
:class:`SandboxBackend` interface.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

# ---------------------------------------------------------------------------
# Canonical encoding (runs in the child; the judge compares these structures)
# ---------------------------------------------------------------------------

CANON_MAX_DEPTH = 50
CANON_MAX_NODES = 100_000
_FLOAT_SPECIALS = {"nan", "inf", "-inf"}


class _Unserializable(Exception):
    """Raised while encoding a value that is not exact builtin data."""


def canonical(value: Any) -> Any:
    """Encode ``value`` as type-tagged JSON data, accepting exact builtin types only.

    ``None``, ``bool``, ``int``, ``str`` and finite ``float`` map to JSON scalars
    (JSON keeps ``1``, ``1.0`` and ``true`` apart); lists map to lists; other
    containers and special floats become ``{"t": tag, "v": ...}``. Sets and dict items
    are sorted by their encoded form, so equal values encode identically. Subclasses of
    builtins and every other object encode as ``{"t": "unserializable", "v": type name}``,
    which never equals an expected value.
    """
    budget = [CANON_MAX_NODES]
    try:
        return _canon(value, 0, budget)
    except _Unserializable as exc:
        return {"t": "unserializable", "v": str(exc)}
    except RecursionError:
        return {"t": "unserializable", "v": "too deep"}


def _canon(x: Any, depth: int, budget: list[int]) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise _Unserializable("too large")
    if depth > CANON_MAX_DEPTH:
        raise _Unserializable("too deep")
    t = type(x)
    if x is None or t is bool or t is int or t is str:
        return x
    if t is float:
        if x != x:
            return {"t": "float", "v": "nan"}
        if x in (float("inf"), float("-inf")):
            return {"t": "float", "v": "inf" if x > 0 else "-inf"}
        return x
    if t is list:
        return [_canon(item, depth + 1, budget) for item in x]
    if t is tuple:
        return {"t": "tuple", "v": [_canon(item, depth + 1, budget) for item in x]}
    if t is set or t is frozenset:
        items = [_canon(item, depth + 1, budget) for item in x]
        items.sort(key=_sort_key)
        return {"t": t.__name__, "v": items}
    if t is dict:
        pairs = [[_canon(k, depth + 1, budget), _canon(v, depth + 1, budget)] for k, v in x.items()]
        pairs.sort(key=lambda kv: _sort_key(kv[0]))
        return {"t": "dict", "v": pairs}
    if t is bytes:
        return {"t": "bytes", "v": x.hex()}
    raise _Unserializable(t.__name__)


def _sort_key(encoded: Any) -> str:
    return json.dumps(encoded, sort_keys=True, separators=(",", ":"))


# ---------------------------------------------------------------------------
# The child harness (runs in the sandboxed process; trusts nothing after exec)
# ---------------------------------------------------------------------------

SOLUTION_FILENAME = "<solution>"
TEST_FILENAME = "<test>"
MESSAGE_CHARS = 300


class TestTimeout(BaseException):
    """Raised in the child when one test exceeds its time budget."""


def _apply_limits(limits: dict[str, Any]) -> None:
    import resource

    cpu = int(limits["cpu_s"])
    memory = int(limits["memory_mb"]) * 1024 * 1024
    for res, value in (
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_AS, (memory, memory)),
        (resource.RLIMIT_FSIZE, (int(limits["output_bytes"]),) * 2),
        (resource.RLIMIT_NOFILE, (int(limits["open_files"]),) * 2),
        (resource.RLIMIT_CORE, (0, 0)),
    ):
        resource.setrlimit(res, value)


def _compile_test(source: str) -> tuple[Any, Any]:
    """Split a snippet into (statements, final expression or None) code objects."""
    import ast

    tree = ast.parse(source, TEST_FILENAME, "exec")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    body = compile(tree, TEST_FILENAME, "exec")
    expr = compile(last, TEST_FILENAME, "eval") if last is not None else None
    return body, expr


def _solution_line(tb: Any) -> int | None:
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == SOLUTION_FILENAME:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _child_main(fd: int) -> None:
    """Entry point of the sandboxed child: evaluate the request read from stdin."""
    import builtins

    write = os.write
    dumps = json.dumps
    request = json.loads(sys.stdin.buffer.read())
    limits = request["limits"]
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    _apply_limits(limits)

    def emit(record: dict[str, Any]) -> None:
        data = (dumps(record, separators=(",", ":")) + "\n").encode()
        while data:
            data = data[write(fd, data) :]

    def on_alarm(signum: int, frame: Any) -> None:
        raise TestTimeout(f"test exceeded {limits['per_test_s']}s")

    signal.signal(signal.SIGALRM, on_alarm)
    per_test = float(limits["per_test_s"])
    labels = request.get("labels") or []
    try:
        code = compile(request["code"], SOLUTION_FILENAME, "exec")
        code_error = None
    except (SyntaxError, ValueError) as exc:
        code, code_error = None, exc
    for index, source in enumerate(request["tests"]):
        if labels:
            try:
                print(f"--- {labels[index]} ---", flush=True)
            except BaseException:  # noqa: BLE001 - output limit reached; keep testing
                pass
        record: dict[str, Any] = {"i": index}
        try:
            signal.setitimer(signal.ITIMER_REAL, per_test)
            try:
                if code_error is not None:
                    raise code_error
                body, expr = _compile_test(source)
                namespace: dict[str, Any] = {"__name__": "solution", "__builtins__": builtins}
                exec(code, namespace)
                exec(body, namespace)
                value = eval(expr, namespace) if expr is not None else None
                record["v"] = canonical(value)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except BaseException as exc:  # noqa: BLE001 - every failure is an observation
            record.pop("v", None)
            record["e"] = type(exc).__name__
            try:
                record["m"] = str(exc)[:MESSAGE_CHARS]
            except BaseException:  # noqa: BLE001
                record["m"] = ""
            if isinstance(exc, SyntaxError) and exc.filename == SOLUTION_FILENAME:
                record["ln"] = exc.lineno
            else:
                line = _solution_line(exc.__traceback__)
                if line is not None:
                    record["ln"] = line
        emit(record)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001
            pass
    os._exit(0)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--child":
    _child_main(int(sys.argv[2]))  # never returns: the server-side code below is not loaded

# ---------------------------------------------------------------------------
# Server side. These imports come after the child entry point on purpose: the child
# never pays for them (they cost ~50 ms of interpreter start-up per evaluation).
# ---------------------------------------------------------------------------

import collections  # noqa: E402
import select  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from typing import Protocol  # noqa: E402

# ---------------------------------------------------------------------------
# Requests and results (server side)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Resource limits for one evaluation."""

    wall_s: float = 5.0
    per_test_s: float = 1.0
    cpu_s: int = 5
    memory_mb: int = 1024
    output_bytes: int = 64 * 1024
    open_files: int = 64
    result_bytes: int = 1024 * 1024

    @classmethod
    def from_env(cls) -> Limits:
        """Read limits from ``SANDBOX_*`` environment variables (defaults above)."""
        base = cls()
        return cls(
            wall_s=float(os.environ.get("SANDBOX_WALL_TIMEOUT_S", base.wall_s)),
            per_test_s=float(os.environ.get("SANDBOX_TEST_TIMEOUT_S", base.per_test_s)),
            cpu_s=int(os.environ.get("SANDBOX_CPU_S", base.cpu_s)),
            memory_mb=int(os.environ.get("SANDBOX_MEMORY_MB", base.memory_mb)),
            output_bytes=int(os.environ.get("SANDBOX_OUTPUT_BYTES", base.output_bytes)),
        )


@dataclass(frozen=True)
class EvalRequest:
    """Code to load and test snippets to evaluate against it.

    Every test runs in a fresh module namespace: the code is executed, then the snippet;
    the observation is the value of the snippet's last expression statement.
    ``labels`` (optional, one per test) are printed to stdout before each test so the
    captured output can be attributed. ``limits`` defaults to the backend's limits.
    """

    code: str
    tests: tuple[str, ...]
    limits: Limits | None = None
    labels: tuple[str, ...] = ()


@dataclass
class EvalResult:
    """What one evaluation produced. Nothing here is a verdict."""

    records: list[dict[str, Any]]
    malformed_lines: int
    output: str
    output_truncated: bool
    exit_code: int | None
    signal: int | None
    timed_out: bool
    result_overflow: bool
    duration_ms: float


class SandboxBusy(RuntimeError):
    """No evaluation slot became free within the queue timeout."""


class SandboxBackend(Protocol):
    """Interface every sandbox backend implements."""

    name: str

    def run(self, request: EvalRequest) -> EvalResult:
        """Evaluate ``request`` in isolation and return the raw observations."""
        ...

    def describe(self) -> dict[str, Any]:
        """Facts for ``/health``: backend name, enforced layers, limits, capacity."""
        ...

    def close(self) -> None:
        """Release every resource (processes, working directories)."""
        ...


# ---------------------------------------------------------------------------
# The process-per-evaluation backend
# ---------------------------------------------------------------------------

CHILD_ENV = {
    "PATH": "/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "PYTHONHASHSEED": "0",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONIOENCODING": "utf-8",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MALLOC_ARENA_MAX": "2",
}
# -s -S: no user or site packages; -P: no script directory on sys.path; -B: no .pyc.
# -E/-I are not used because they would drop PYTHONHASHSEED; the env is fully ours anyway.
CHILD_FLAGS = ("-s", "-S", "-P", "-B")
SANDBOX_ROOT_ENV = "SANDBOX_ROOT"
_READ_CHUNK = 65536


class FairSlots:
    """A counting semaphore that serves waiters first-come, first-served.

    ``threading.Semaphore`` lets a releasing thread grab the slot straight back, which
    starved some sessions for 10+ s under load; here a freed slot is handed to the oldest
    waiter.
    """

    def __init__(self, count: int) -> None:
        self._free = count
        self._lock = threading.Lock()
        self._waiters: collections.deque[threading.Lock] = collections.deque()

    def acquire(self, timeout: float) -> bool:
        with self._lock:
            if self._free > 0 and not self._waiters:
                self._free -= 1
                return True
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


def _default_parallelism() -> int:
    return max(2, os.cpu_count() or 2)


class ProcessSandbox:
    """One fresh child process per evaluation, with rlimits and a process-group kill."""

    name = "process"

    def __init__(
        self,
        limits: Limits | None = None,
        max_parallel: int | None = None,
        queue_timeout_s: float = 30.0,
        root: str | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self.max_parallel = max_parallel or _default_parallelism()
        self.queue_timeout_s = queue_timeout_s
        self._slots = FairSlots(self.max_parallel)
        base = (
            root
            or os.environ.get(SANDBOX_ROOT_ENV)
            or os.path.join(tempfile.gettempdir(), "tracefix-sandbox")
        )
        os.makedirs(base, mode=0o711, exist_ok=True)
        _sweep_stale_roots(base)
        self.root = tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=base)
        self._in_flight = 0
        self._lock = threading.Lock()
        self.evaluations = 0

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "layers": ["process_group_kill", "rlimits", "fd_close", "fresh_workdir", "clean_env"],
            "limits": asdict(self.limits),
            "max_parallel": self.max_parallel,
            "in_flight": self._in_flight,
            "queued": self._slots.waiting,
            "evaluations": self.evaluations,
        }

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def run(self, request: EvalRequest) -> EvalResult:
        if not self._slots.acquire(timeout=self.queue_timeout_s):
            raise SandboxBusy(
                f"sandbox busy: {self.max_parallel} evaluations running and none finished "
                f"within {self.queue_timeout_s:.0f}s; retry later"
            )
        with self._lock:
            self._in_flight += 1
        try:
            return self._run_child(request)
        finally:
            with self._lock:
                self._in_flight -= 1
                self.evaluations += 1
            self._slots.release()

    def _run_child(self, request: EvalRequest) -> EvalResult:
        limits = request.limits or self.limits
        workdir = tempfile.mkdtemp(prefix="run-", dir=self.root)
        out_fd = os.memfd_create("tracefix-output", os.MFD_CLOEXEC)
        rec_r, rec_w = os.pipe()
        start = time.monotonic()
        proc: subprocess.Popen[bytes] | None = None
        try:
            payload = json.dumps(
                {
                    "code": request.code,
                    "tests": list(request.tests),
                    "labels": list(request.labels),
                    "limits": asdict(limits),
                }
            ).encode()
            proc = subprocess.Popen(
                [sys.executable, *CHILD_FLAGS, os.path.abspath(__file__), "--child", str(rec_w)],
                stdin=subprocess.PIPE,
                stdout=out_fd,
                stderr=out_fd,
                cwd=workdir,
                env=dict(CHILD_ENV),
                pass_fds=(rec_w,),
                close_fds=True,
                start_new_session=True,
            )
            os.close(rec_w)
            rec_w = -1
            _feed_stdin(proc, payload)
            raw, timed_out, overflow = _read_records(
                rec_r, start + limits.wall_s, limits.result_bytes
            )
            _kill_group(proc)
            returncode = proc.wait()
            duration_ms = (time.monotonic() - start) * 1000.0
            output, truncated = _read_output(out_fd, limits.output_bytes)
            records, malformed = _parse_records(raw)
            return EvalResult(
                records=records,
                malformed_lines=malformed,
                output=output,
                output_truncated=truncated,
                exit_code=returncode if returncode >= 0 else None,
                signal=-returncode if returncode < 0 else None,
                timed_out=timed_out,
                result_overflow=overflow,
                duration_ms=duration_ms,
            )
        finally:
            if proc is not None and proc.returncode is None:
                _kill_group(proc)
                proc.wait()
            for fd in (rec_r, rec_w, out_fd):
                if fd >= 0:
                    os.close(fd)
            shutil.rmtree(workdir, ignore_errors=True)


def _sweep_stale_roots(base: str) -> None:
    """Remove working roots (named ``<pid>-…``) left behind by processes that are gone."""
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


def _feed_stdin(proc: subprocess.Popen[bytes], payload: bytes) -> None:
    assert proc.stdin is not None
    try:
        proc.stdin.write(payload)
    except (BrokenPipeError, OSError):
        pass
    finally:
        try:
            proc.stdin.close()
        except OSError:
            pass


def _read_records(fd: int, deadline: float, cap: int) -> tuple[bytes, bool, bool]:
    """Read the result channel until EOF, the deadline, or ``cap`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return b"".join(chunks), True, False
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            return b"".join(chunks), True, False
        chunk = os.read(fd, _READ_CHUNK)
        if not chunk:
            return b"".join(chunks), False, False
        chunks.append(chunk)
        size += len(chunk)
        if size > cap:
            return b"".join(chunks)[:cap], False, True


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child's whole process group (the child leads it), then the child."""
    for kill in (lambda: os.killpg(proc.pid, signal.SIGKILL), proc.kill):
        try:
            kill()
        except (ProcessLookupError, PermissionError):
            pass


def _read_output(fd: int, cap: int) -> tuple[str, bool]:
    size = os.fstat(fd).st_size
    data = os.pread(fd, min(size, cap), 0)
    return data.decode("utf-8", errors="replace"), size > cap


def _parse_records(raw: bytes) -> tuple[list[dict[str, Any]], int]:
    records: list[dict[str, Any]] = []
    malformed = 0
    for line in raw.split(b"\n"):
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


_default_sandbox: SandboxBackend | None = None
_default_lock = threading.Lock()


def get_sandbox() -> SandboxBackend:
    """The process-wide sandbox, created on first use from ``SANDBOX_*`` variables."""
    global _default_sandbox
    with _default_lock:
        if _default_sandbox is None:
            parallel = os.environ.get("SANDBOX_MAX_PARALLEL")
            _default_sandbox = ProcessSandbox(
                limits=Limits.from_env(),
                max_parallel=int(parallel) if parallel else None,
                queue_timeout_s=float(os.environ.get("SANDBOX_QUEUE_TIMEOUT_S", "30")),
            )
        return _default_sandbox
