"""A warm sandbox worker ("zygote"): forks one isolated child per evaluation, *before* the
evaluation exists.

Started by :class:`sandbox.pool.ZygotePool` with ``exec`` (never a fork of the server) and a
minimal environment, so it never holds the server's sockets, threads or secrets. It is
single-threaded and non-dumpable, preloads the harness, the layers and common standard
library modules, probes the layers once, then loops:

1. fork a child, which applies the layers that need no request (new session, descriptors,
   working directory, uid drop, parent-death signal, Landlock) and blocks reading its
   request from a pipe. Its working directory is the worker's one empty directory, which
   no child can write to (the filesystem is read-only to agent code), so no evaluation can
   leave anything there for another and there is nothing to clean up per evaluation;
2. hand the server, over the control socket, the child's pid and three descriptors: the
   request pipe's write end, the result pipe's read end and the output memfd. The server
   writes the request straight to the child and reads its results straight from it;
3. wait for the server's ``end`` (or the socket's EOF): SIGKILL the child's process group,
   reap it, report its wait status and CPU time.

So **no request, test, code or result ever passes through this process**: each child is a
copy of a worker that holds nothing from any evaluation, and forking is off the request's
critical path. The wall clock is the server's (it sends ``end`` at the deadline); a child
outlives neither its worker (parent-death signal) nor the server (control socket EOF).
Control messages are one JSON object per SOCK_SEQPACKET datagram.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
import harness  # noqa: E402
import layers  # noqa: E402

sys.path.remove(_HERE)  # agent code cannot import the sandbox's own modules

import errno  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import select  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
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
    "hashlib",
    "heapq",
    "itertools",
    "math",
    "mmap",
    "operator",
    "random",
    "re",
    "string",
    "threading",
    "typing",
    "zlib",
]
for _name in PRELOAD:
    __import__(_name)

READ_CHUNK = 65536
MESSAGE_BYTES = 65536  # control messages are tiny; this bounds the receive buffer
CHILD_SETUP_FAILED = 70  # the child's exit code when a configured layer did not apply
PROBE_TIMEOUT_S = 10.0


def send(sock: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    """One control message (with descriptors attached, if any)."""
    data = json.dumps(message, separators=(",", ":")).encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def receive(sock: socket.socket) -> dict | None:
    """The next control message; None at EOF."""
    data = sock.recv(MESSAGE_BYTES)
    return json.loads(data) if data else None


WORKDIR_MODE = 0o555  # readable and searchable by the dropped uid, writable by nobody


class Config:
    """Which layers to apply in children (decided by the probe), and their directory."""

    def __init__(self, root: str, options: dict) -> None:
        self.root = root
        self.workdir = os.path.join(root, "cwd")
        os.makedirs(self.workdir, exist_ok=True)
        os.chmod(self.workdir, WORKDIR_MODE)
        self.workdir_fd = os.open(self.workdir, layers.O_PATH | os.O_CLOEXEC)
        self.uid: int | None = None
        if os.geteuid() == 0 and not options.get("no_uid_drop"):
            self.uid = int(options.get("uid", layers.UNPRIVILEGED_UID))
        abi = 0 if options.get("no_landlock") else layers.landlock_abi()
        self.landlock_abi = abi
        self.seccomp = layers.seccomp_supported() and not options.get("no_seccomp")
        self.read_only = layers.open_read_only(layers.read_only_paths()) if abi else []
        self.seccomp_error = ""
        if self.seccomp:
            self.child_filter = layers.child_seccomp(self.early_seccomp)
            self._install_worker_filter()

    def _install_worker_filter(self) -> None:
        """The worker filter goes on this worker itself (its children inherit it), with its
        other rlimits locked, which children inherit too."""
        try:
            layers.lock_other_rlimits()
            layers.set_no_new_privs()
            layers.worker_seccomp().install()
        except OSError as exc:
            self.seccomp, self.seccomp_error = False, str(exc)

    @property
    def early_seccomp(self) -> bool:
        """Install the filter before the request arrives: possible when the child has no
        CAP_SYS_RESOURCE (it dropped root, or never had it), so the kernel itself refuses to
        raise a hard limit and the filter may let the child lower its own limits. Measured:
        installing the filter was about a fifth of a RUN_TESTS evaluation's time in the child.
        """
        return self.uid is not None or os.geteuid() != 0


# -- in the child ---------------------------------------------------------------------------


def _setup_child(config: Config, out_fd: int, keep: tuple[int, ...]) -> dict:
    """Apply the layers that need no request; return {layer: error} for any that failed."""
    errors: dict[str, str] = {}
    os.setsid()
    devnull = os.open("/dev/null", os.O_RDONLY)  # stdin; writing opens are refused now
    os.dup2(devnull, 0)
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    os.chdir(config.workdir)
    if config.uid is not None:
        try:
            layers.drop_root(config.uid)
        except OSError as exc:
            errors["uid_drop"] = str(exc)
    # Set after the uid drop (which would clear it); a worker that died before this is
    # caught by the parent check in _child_main.
    layers.set_parent_death_signal(signal.SIGKILL)
    layers.set_no_new_privs()
    if config.landlock_abi:
        try:
            layers.apply_landlock(config.landlock_abi, config.workdir_fd, config.read_only)
        except OSError as exc:
            errors["landlock"] = str(exc)
    lowest = 3
    for fd in sorted(keep):
        os.closerange(lowest, fd)
        lowest = fd + 1
    os.closerange(lowest, 1 << 16)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if config.seccomp and config.early_seccomp:
        _install_seccomp(config, errors)
    return errors


def _finish_setup(config: Config, limits: dict) -> dict:
    """Apply the layers that depend on the request's limits; return {layer: error}."""
    errors: dict[str, str] = {}
    layers.apply_rlimits(limits)
    if config.seccomp and not config.early_seccomp:
        _install_seccomp(config, errors)  # it denies setrlimit, so after the limits
    return errors


def _install_seccomp(config: Config, errors: dict[str, str]) -> None:
    try:
        config.child_filter.install(os.getpid())
    except OSError as exc:
        errors["seccomp"] = str(exc)


def _read_request(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, READ_CHUNK):
        chunks.append(chunk)
    return b"".join(chunks)


def _child_main(config: Config, out_fd: int, request_fd: int, record_fd: int, worker: int):
    """The child: layers, then its own request, then the harness. Never returns."""
    try:
        if _setup_child(config, out_fd, (request_fd, record_fd)):
            os._exit(CHILD_SETUP_FAILED)  # fail closed: a configured layer did not apply
        if os.getppid() != worker:
            os._exit(CHILD_SETUP_FAILED)  # the worker died before the death signal was set
        harness.warm_up()
        raw = _read_request(request_fd)
        os.close(request_fd)
        if not raw:
            os._exit(0)  # the server let this child go unused
        request = json.loads(raw)
        del raw
        if _finish_setup(config, request["limits"]):
            os._exit(CHILD_SETUP_FAILED)
        harness.run_tests(request, record_fd)
    finally:
        os._exit(CHILD_SETUP_FAILED)


# -- in the worker ----------------------------------------------------------------------------


class Child:
    """A forked, half-layered child waiting for its request."""

    def __init__(self, config: Config) -> None:
        self.out_fd = os.memfd_create("sandbox-output", os.MFD_CLOEXEC)
        request_r, self.request_w = os.pipe()
        self.record_r, record_w = os.pipe()
        worker = os.getpid()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(self.request_w)
            os.close(self.record_r)
            _child_main(config, self.out_fd, request_r, record_w, worker)
        os.close(request_r)
        os.close(record_w)

    def handles(self) -> list[int]:
        """The descriptors the server needs: request writer, record reader, output memfd."""
        return [self.request_w, self.record_r, self.out_fd]

    def release_handles(self) -> None:
        """Close this process's copies once the server holds them (the child sees the
        request pipe's EOF only when the server closes the last writer)."""
        for fd in self.handles():
            os.close(fd)

    def end(self) -> tuple[int, float]:
        """SIGKILL the child's process group, reap it; (wait status, CPU seconds it used)."""
        _kill_group(self.pid)
        _, status, usage = os.wait4(self.pid, 0)
        return status, usage.ru_utime + usage.ru_stime


def _kill_group(pid: int) -> None:
    for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            kill()
        except (ProcessLookupError, PermissionError):
            pass


def serve(config: Config, control: socket.socket) -> None:
    """Fork children and hand them to the server until the control socket closes."""
    while True:
        child = Child(config)
        try:
            send(control, {"ready": child.pid}, child.handles())
        except OSError:
            child.release_handles()
            child.end()
            return
        child.release_handles()
        message = _next_message(control)
        status, cpu_s = child.end()
        if message is None:
            return
        try:
            send(control, {"ended": child.pid, "status": status, "cpu_s": round(cpu_s, 4)})
        except OSError:
            return


def _next_message(control: socket.socket) -> dict | None:
    while True:
        try:
            return receive(control)
        except InterruptedError:
            continue
        except OSError:
            return None


# -- the layer probe --------------------------------------------------------------------------


def probe(config: Config) -> dict:
    """Apply the layers in a throw-away child and check each one really holds."""
    limits = {"cpu_s": 2, "memory_mb": 1024, "output_bytes": 65536, "open_files": 64}
    out_fd = os.memfd_create("sandbox-probe", os.MFD_CLOEXEC)
    rec_r, rec_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(rec_r)
            errors = _setup_child(config, out_fd, (rec_w,))
            errors.update(_finish_setup(config, limits))
            report: dict = {"errors": errors, "uid": os.getuid()}
            report["rlimits"] = layers.resource.getrlimit(layers.resource.RLIMIT_CPU)[1] == 3
            report["seccomp"] = _fails(lambda: socket.socket().close(), errno.EPERM)
            report["child_filter"] = _fails(_fork_and_reap, errno.EPERM)
            report["read_only_fs"] = _fails(
                lambda: open("probe", "w").close(), errno.EROFS, errno.EACCES
            )
            report["landlock"] = _fails(lambda: open("/proc/self/status").close(), errno.EACCES)
            os.write(rec_w, json.dumps(report).encode())
        finally:
            os._exit(0)
    os.close(rec_w)
    raw = _read_all(rec_r, time.monotonic() + PROBE_TIMEOUT_S)
    _kill_group(pid)
    os.waitpid(pid, 0)
    for fd in (rec_r, out_fd):
        os.close(fd)
    report = json.loads(raw or b'{"errors": {"probe": "no report"}}')
    errors = report.get("errors", {})
    if config.seccomp_error:
        errors["seccomp"] = config.seccomp_error
    seccomp = (
        config.seccomp
        and report.get("seccomp") is True
        and report.get("child_filter") is True
        and "seccomp" not in errors
    )
    landlock = bool(config.landlock_abi) and report.get("landlock") is True
    uid_drop = config.uid is not None and report.get("uid") == config.uid
    config.seccomp, config.landlock_abi = seccomp, config.landlock_abi if landlock else 0
    if not uid_drop:
        config.uid = None
    return {
        "seccomp": seccomp,
        "read_only_fs": report.get("read_only_fs") is True and (seccomp or landlock),
        "landlock_abi": config.landlock_abi,
        "uid_drop": uid_drop,
        "uid": report.get("uid"),
        "rlimits": report.get("rlimits") is True,
        "non_dumpable": True,
        "process_group_kill": True,
        "errors": errors,
    }


def _read_all(fd: int, deadline: float) -> bytes:
    data = b""
    while (remaining := deadline - time.monotonic()) > 0:
        if not select.select([fd], [], [], remaining)[0]:
            break
        chunk = os.read(fd, READ_CHUNK)
        if not chunk:
            break
        data += chunk
    return data


def _fork_and_reap() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


def _fails(action, *expected_errnos: int) -> bool:
    """Whether ``action`` fails with one of ``expected_errnos`` (the layer under test holds)."""
    try:
        action()
    except OSError as exc:
        return exc.errno in expected_errnos
    return False


def main() -> None:
    """``zygote.py ROOT OPTIONS_JSON CONTROL_FD``: probe, say hello, then serve until EOF."""
    root, options, control_fd = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    layers.set_dumpable(False)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server handles Ctrl-C and stops us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # ...and SIGTERM: it ends us in order
    control = socket.socket(fileno=control_fd)
    config = Config(root, options)
    send(control, {"hello": os.getpid(), "layers": probe(config)})
    gc.freeze()  # children's collections skip the zygote's objects: fewer copy-on-write faults
    serve(config, control)


if __name__ == "__main__":
    main()
