"""A warm sandbox worker ("zygote"): forks one isolated child per evaluation.

Started by :class:`sandbox.pool.ZygotePool` with ``exec`` (never a fork of the server) and a
minimal environment, so it never holds the server's sockets, threads or secrets. It is
single-threaded and non-dumpable, preloads the harness, the layers and common standard
library modules, then serves requests framed as a 4-byte big-endian length plus JSON on
stdin/stdout, one at a time. Per request it creates a fresh working directory, forks a child
that applies every layer (see :func:`_setup_child`) and runs the harness, supervises it
against the wall-clock deadline, SIGKILLs its process group, and returns the raw records and
the captured output. It never judges anything.

At start-up it probes the layers in a throw-away child and reports which ones are enforced
in a hello message; a layer that fails the probe is not applied (the pool decides whether to
run degraded).
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
import harness  # noqa: E402
import layers  # noqa: E402

sys.path.remove(_HERE)  # agent code cannot import the sandbox's own modules

import gc  # noqa: E402
import json  # noqa: E402
import select  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import stat  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

# Modules agent code commonly imports, loaded once here so that children find them in
# sys.modules even where the dropped uid cannot read the interpreter's directory. Kept short:
# every preloaded module enlarges the zygote and makes each fork slower.
PRELOAD = [
    "bisect",
    "collections",
    "collections.abc",
    "copy",
    "dataclasses",
    "datetime",
    "encodings.ascii",
    "encodings.idna",
    "encodings.latin_1",
    "enum",
    "functools",
    "gc",
    "heapq",
    "itertools",
    "math",
    "mmap",
    "operator",
    "re",
    "string",
    "threading",
    "typing",
    "zlib",
]
for _name in PRELOAD:
    __import__(_name)

HEADER = harness.FRAME_HEADER
READ_CHUNK = 65536
CHILD_SETUP_FAILED = 70


def read_message(fd: int) -> dict | None:
    """One framed JSON message from ``fd``; None at EOF."""
    header = _read_exact(fd, HEADER.size)
    if header is None:
        return None
    body = _read_exact(fd, HEADER.unpack(header)[0])
    return None if body is None else json.loads(body)


def write_message(fd: int, message: dict) -> None:
    body = json.dumps(message, separators=(",", ":")).encode()
    data = HEADER.pack(len(body)) + body
    while data:
        data = data[os.write(fd, data) :]


def _read_exact(fd: int, size: int) -> bytes | None:
    chunks, remaining = [], size
    while remaining:
        chunk = os.read(fd, min(remaining, READ_CHUNK))
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


class Config:
    """Which layers to apply in children (decided by the probe)."""

    def __init__(self, root: str, options: dict) -> None:
        self.root = root
        self.uid: int | None = None
        if os.geteuid() == 0 and not options.get("no_uid_drop"):
            self.uid = int(options.get("uid", layers.UNPRIVILEGED_UID))
        abi = 0 if options.get("no_landlock") else layers.landlock_abi()
        self.landlock_abi = abi
        self.seccomp = layers.seccomp_supported() and not options.get("no_seccomp")
        self.read_only = layers.open_read_only(layers.read_only_paths()) if abi else []
        if self.seccomp:
            layers.seccomp_program(0)  # assemble once here, not in every child


def _setup_child(config: Config, workdir: str, out_fd: int, keep_fd: int, limits: dict) -> dict:
    """Apply every configured layer in a freshly forked child; return {layer: error}."""
    errors: dict[str, str] = {}
    os.setsid()
    devnull = os.open("/dev/null", os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    os.chdir(workdir)
    workdir_fd = os.open(workdir, layers.O_PATH | os.O_CLOEXEC)  # before the uid drop
    if config.uid is not None:
        try:
            layers.drop_root(config.uid)
        except OSError as exc:
            errors["uid_drop"] = str(exc)
    layers.set_no_new_privs()
    layers.apply_rlimits(limits)
    if config.landlock_abi:
        try:
            layers.apply_landlock(config.landlock_abi, workdir_fd, config.read_only)
        except OSError as exc:
            errors["landlock"] = str(exc)
    os.closerange(3, keep_fd)
    os.closerange(keep_fd + 1, 1 << 16)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if config.seccomp:
        try:
            layers.apply_seccomp()
        except OSError as exc:
            errors["seccomp"] = str(exc)
    return errors


def _make_workdir(config: Config) -> str:
    workdir = tempfile.mkdtemp(prefix="run-", dir=config.root)
    if config.uid is not None:
        os.chown(workdir, config.uid, config.uid)
    return workdir


def _remove_tree(path: str) -> None:
    """Delete ``path`` even if the child stripped permissions from what it created."""

    def unlock(function, target, _exc_info) -> None:
        try:
            os.chmod(os.path.dirname(target), stat.S_IRWXU)
            if os.path.isdir(target) and not os.path.islink(target):
                os.chmod(target, stat.S_IRWXU)
            function(target)
        except OSError:
            pass

    shutil.rmtree(path, onerror=unlock)


def _kill_group(pid: int) -> None:
    for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            kill()
        except (ProcessLookupError, PermissionError):
            pass


def _read_records(fd: int, deadline: float, cap: int) -> tuple[bytes, str]:
    """Read the result channel; returns (data, how it ended).

    ``how`` is ``"done"`` (the harness's last line), ``"eof"`` (the child exited or closed
    the channel), ``"timeout"`` (wall-clock deadline) or ``"overflow"`` (more than ``cap``).
    """
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return data, "timeout"
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            return data, "timeout"
        chunk = os.read(fd, READ_CHUNK)
        if not chunk:
            return data, "eof"
        data += chunk
        if len(data) > cap:
            return data[:cap], "overflow"
        if data.endswith(harness.DONE_LINE):
            return data[: -len(harness.DONE_LINE)], "done"


class Evaluation:
    """One evaluation: :meth:`run` collects the child's output; :meth:`cleanup` reaps it and
    removes its working directory (done after the response has been sent)."""

    def __init__(self, config: Config, request: dict) -> None:
        self.config = config
        self.request = request
        self.pid = 0
        self.workdir = ""

    def run(self) -> dict:
        return evaluate(self.config, self.request, self)

    def cleanup(self) -> None:
        if self.pid:
            _kill_group(self.pid)
            os.waitpid(self.pid, 0)
        if self.workdir:
            _remove_tree(self.workdir)


def evaluate(config: Config, request: dict, pending: Evaluation | None = None) -> dict:
    """Run one request in a fresh, fully layered child and collect what it produced.

    With ``pending``, reaping the child and removing its working directory are left to
    ``pending.cleanup()``; the child's process group is SIGKILLed before this returns.
    """
    limits = request["limits"]
    workdir = _make_workdir(config)
    out_fd = os.memfd_create("sandbox-output", os.MFD_CLOEXEC)
    rec_r, rec_w = os.pipe()
    start = time.monotonic()
    compiled = harness.precompile_tests(request["tests"])
    pid = os.fork()
    if pid == 0:
        try:
            os.close(rec_r)
            if _setup_child(config, workdir, out_fd, rec_w, limits):
                os._exit(CHILD_SETUP_FAILED)  # fail closed: a configured layer did not apply
            harness.run_tests(request, rec_w, compiled)
        finally:
            os._exit(CHILD_SETUP_FAILED)
    os.close(rec_w)
    status = None
    try:
        raw, ended = _read_records(
            rec_r, start + float(limits["wall_s"]), int(limits["result_bytes"])
        )
        _kill_group(pid)
        if pending is not None and ended == "done":
            pending.pid = pid  # finished normally: reap it after answering
        else:
            _, status = os.waitpid(pid, 0)
        duration_ms = (time.monotonic() - start) * 1000.0
        size = os.fstat(out_fd).st_size
        cap = int(limits["output_bytes"])
        output = os.pread(out_fd, min(size, cap), 0)
    finally:
        os.close(rec_r)
        os.close(out_fd)
        if pending is None:
            _remove_tree(workdir)
        else:
            pending.workdir = workdir
    code = os.waitstatus_to_exitcode(status) if status is not None else 0
    return {
        "records": raw.decode("utf-8", errors="replace"),
        "output": output.decode("utf-8", errors="replace"),
        "output_truncated": size > cap,
        "exit_code": code if code >= 0 else None,
        "signal": -code if code < 0 else None,
        "timed_out": ended == "timeout",
        "result_overflow": ended == "overflow",
        "duration_ms": duration_ms,
    }


def probe(config: Config) -> dict:
    """Apply the layers in a throw-away child and check each one really holds."""
    limits = {"cpu_s": 2, "memory_mb": 1024, "output_bytes": 65536, "open_files": 64}
    workdir = _make_workdir(config)
    out_fd = os.memfd_create("sandbox-probe", os.MFD_CLOEXEC)
    rec_r, rec_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(rec_r)
            report: dict = {"errors": _setup_child(config, workdir, out_fd, rec_w, limits)}
            report["uid"] = os.getuid()
            report["rlimits"] = layers.resource.getrlimit(layers.resource.RLIMIT_CPU)[1] == 3
            report["seccomp"] = _denied(lambda: socket.socket().close())
            report["landlock"] = _denied(lambda: open("/proc/self/status").close())
            os.write(rec_w, json.dumps(report).encode())
        finally:
            os._exit(0)
    os.close(rec_w)
    raw, _ = _read_records(rec_r, time.monotonic() + 10, 1 << 16)
    _kill_group(pid)
    os.waitpid(pid, 0)
    for fd in (rec_r, out_fd):
        os.close(fd)
    _remove_tree(workdir)
    report = json.loads(raw or b'{"errors": {"probe": "no report"}}')
    errors = report.get("errors", {})
    seccomp = config.seccomp and report.get("seccomp") is True and "seccomp" not in errors
    landlock = bool(config.landlock_abi) and report.get("landlock") is True
    uid_drop = config.uid is not None and report.get("uid") == config.uid
    config.seccomp, config.landlock_abi = seccomp, config.landlock_abi if landlock else 0
    if not uid_drop:
        config.uid = None
    return {
        "seccomp": seccomp,
        "landlock_abi": config.landlock_abi,
        "uid_drop": uid_drop,
        "uid": report.get("uid"),
        "rlimits": report.get("rlimits") is True,
        "non_dumpable": True,
        "process_group_kill": True,
        "errors": errors,
    }


def _denied(action) -> bool:
    try:
        action()
    except PermissionError:
        return True
    except OSError:
        return False
    return False


def main() -> None:
    """``zygote.py ROOT OPTIONS_JSON``: probe, say hello, then serve requests until EOF."""
    root, options = sys.argv[1], json.loads(sys.argv[2])
    layers.set_dumpable(False)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server handles Ctrl-C and stops us
    config = Config(root, options)
    write_message(1, {"hello": os.getpid(), "layers": probe(config)})
    gc.freeze()  # children's collections skip the zygote's objects: fewer copy-on-write faults
    while (request := read_message(0)) is not None:
        evaluation = Evaluation(config, request)
        try:
            response = evaluation.run()
        except Exception as exc:  # noqa: BLE001 - report, keep serving
            response = {"error": f"{type(exc).__name__}: {exc}"}
        write_message(1, response)
        evaluation.cleanup()


if __name__ == "__main__":
    main()
