"""Isolation layers applied inside each sandboxed child (standard library + ctypes only).

* rlimits: CPU, address space, file size (also caps captured output), open files, no core;
* ``no_new_privs`` and non-dumpable processes (``prctl``);
* a seccomp-BPF deny list (x86_64) in two stages. The *worker filter*, installed once in
  each sandbox worker and inherited by every child it forks, denies exec, sockets, ptrace and
  cross-process memory access, io_uring, namespaces and mounts, kernel attack surface and
  the writes below; the small *child filter*, installed by each child at the end of its
  setup, adds what the worker itself still needs: process creation, signals to other
  processes (and SIGKILL to itself, so that a SIGKILL always comes from outside), sessions,
  identity changes and raising limits. Both kill any syscall of a foreign architecture
  (32-bit ``int 0x80``, x32). Measured: one filter of 139 instructions cost 0.35 ms per child
  to install; the child filter costs a tenth of that;
* a read-only filesystem, by seccomp: every call that creates, writes, deletes, renames or
  re-permissions a file, and every ``open`` for writing, fails with ``EROFS``. Agent code then
  cannot fill the disk or build trees that defeat cleanup, whatever the host offers (the
  file-size rlimit only bounds each file; nothing bounds their number without a mount);
* Landlock (when the kernel offers it): read-only system and stdlib paths and workdir, no
  TCP bind/connect (ABI >= 4), scoped signals and abstract unix sockets (ABI >= 6);
* dropping root to an unprivileged uid; the parent-death signal, so a child never outlives
  its worker.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import resource
import signal
import struct
import sys
import sysconfig
from typing import Any

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
CLONE_THREAD = 0x00010000

# x86_64 syscall numbers (from asm/unistd_64.h; tests/test_layers.py re-checks them).
SYSCALLS_X86_64 = {
    "fork": 57, "vfork": 58, "clone": 56, "clone3": 435, "execve": 59, "execveat": 322,
    "socket": 41, "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311,
    "kcmp": 312, "pidfd_open": 434, "pidfd_send_signal": 424, "pidfd_getfd": 438,
    "kill": 62, "tkill": 200, "tgkill": 234, "rt_sigqueueinfo": 129,
    "rt_tgsigqueueinfo": 297, "setsid": 112, "setpgid": 109, "unshare": 272, "setns": 308,
    "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "fsopen": 430,
    "fsconfig": 431, "fsmount": 432, "fspick": 433, "open_tree": 428, "move_mount": 429,
    "mount_setattr": 442, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323,
    "keyctl": 250, "add_key": 248, "request_key": 249, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427, "personality": 135, "mknod": 133,
    "mknodat": 259, "name_to_handle_at": 303, "open_by_handle_at": 304, "quotactl": 179,
    "syslog": 103, "reboot": 169, "init_module": 175, "finit_module": 313,
    "delete_module": 176, "kexec_load": 246, "kexec_file_load": 320, "acct": 163,
    "swapon": 167, "swapoff": 168, "setrlimit": 160, "prlimit64": 302, "setuid": 105,
    "setgid": 106, "setreuid": 113, "setregid": 114, "setresuid": 117, "setresgid": 119,
    "setgroups": 116, "capset": 126, "landlock_create_ruleset": 444,
    "landlock_add_rule": 445, "landlock_restrict_self": 446, "seccomp": 317,
    "open": 2, "openat": 257, "openat2": 437, "creat": 85, "mkdir": 83, "mkdirat": 258,
    "rmdir": 84, "link": 86, "linkat": 265, "unlink": 87, "unlinkat": 263, "symlink": 88,
    "symlinkat": 266, "rename": 82, "renameat": 264, "renameat2": 316, "chmod": 90,
    "fchmod": 91, "fchmodat": 268, "chown": 92, "fchown": 93, "lchown": 94, "fchownat": 260,
    "truncate": 76, "utime": 132, "utimes": 235, "futimesat": 261, "utimensat": 280,
    "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190, "removexattr": 197,
    "lremovexattr": 198, "fremovexattr": 199,
}  # fmt: skip
# Calls newer than the kernel headers of older build hosts (x86_64 syscall_64.tbl of Linux
# 6.6 for fchmodat2, 6.13 for the *xattrat calls and open_tree_attr, 6.17 for file_setattr).
SYSCALLS_X86_64_NEWER = {
    "fchmodat2": 452, "setxattrat": 463, "removexattrat": 466, "open_tree_attr": 467,
    "file_setattr": 469,
}  # fmt: skip
# Denied outright with EPERM (the agent sees an ordinary PermissionError).
# Denied with EPERM by the worker filter (neither a worker nor a child needs them).
DENIED_SYSCALLS = (
    "execve", "execveat", "socket", "ptrace", "process_vm_readv", "process_vm_writev",
    "kcmp", "pidfd_open", "pidfd_send_signal", "pidfd_getfd", "unshare", "setns", "mount",
    "umount2", "pivot_root", "chroot", "fsopen", "fsconfig", "fsmount", "fspick", "open_tree",
    "move_mount", "mount_setattr", "bpf", "perf_event_open", "userfaultfd", "keyctl",
    "add_key", "request_key", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "personality", "mknod", "mknodat", "name_to_handle_at", "open_by_handle_at", "quotactl",
    "syslog", "reboot", "init_module", "finit_module", "delete_module", "kexec_load",
    "kexec_file_load", "acct", "swapon", "swapoff", "capset", "open_tree_attr",
)  # fmt: skip
# Denied with EPERM by the child filter: the worker forks and kills its children, and a
# child needs them while it sets itself up (new session, uid drop, its limits).
CHILD_DENIED_SYSCALLS = (
    "fork", "vfork", "tkill", "rt_sigqueueinfo", "setsid", "setpgid", "setuid", "setgid",
    "setreuid", "setregid", "setresuid", "setresgid", "setgroups", "setrlimit",
    "landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self",
)  # fmt: skip
# Denied with EROFS: the filesystem is read-only for agent code.
READ_ONLY_FS_SYSCALLS = (
    "creat", "mkdir", "mkdirat", "rmdir", "link", "linkat", "unlink", "unlinkat", "symlink",
    "symlinkat", "rename", "renameat", "renameat2", "chmod", "fchmod", "fchmodat",
    "fchmodat2", "chown", "fchown", "lchown", "fchownat", "truncate", "utime", "utimes",
    "futimesat", "utimensat", "setxattr", "lsetxattr", "fsetxattr", "removexattr",
    "lremovexattr", "fremovexattr", "setxattrat", "removexattrat", "file_setattr",
)  # fmt: skip
# open/openat fail with EROFS when their flags ask to write, create or truncate (O_TMPFILE
# and O_APPEND need a write mode too); openat2 carries its flags in memory that seccomp
# cannot read, so it is refused with ENOSYS (Python and glibc's open() never use it).
OPEN_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC
# Allowed only when the first argument is the calling process itself (and the signal is not
# SIGKILL: a child killed by SIGKILL was then killed from outside, or by its CPU limit).
SELF_SIGNAL_SYSCALLS = ("kill", "tgkill", "rt_tgsigqueueinfo")

# Landlock (include/uapi/linux/landlock.h)
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_RIGHTS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1
O_PATH = getattr(os, "O_PATH", 0o10000000)

UNPRIVILEGED_UID = 65534  # nobody


# -- prctl ------------------------------------------------------------------------------------


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def set_dumpable(enabled: bool) -> None:
    """Mark this process (non-)dumpable: a non-dumpable process's /proc files are root-only."""
    _check(_libc.prctl(PR_SET_DUMPABLE, int(enabled), 0, 0, 0), "prctl(PR_SET_DUMPABLE)")


def set_parent_death_signal(signum: int) -> None:
    """Have the kernel send ``signum`` to this process when its parent exits (cleared by a
    uid change, so set it again after :func:`drop_root`)."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


def set_no_new_privs() -> None:
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


# -- rlimits ------------------------------------------------------------------------------------


def apply_rlimits(limits: dict[str, Any]) -> None:
    """Lower CPU, address space, file size, open files and core limits (soft = hard)."""
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


PER_REQUEST_RLIMITS = frozenset(
    (resource.RLIMIT_CPU, resource.RLIMIT_AS, resource.RLIMIT_FSIZE, resource.RLIMIT_NOFILE,
     resource.RLIMIT_CORE)
)  # fmt: skip


def lock_other_rlimits() -> None:
    """Set every hard limit that :func:`apply_rlimits` does not set to its soft limit, so
    that a process without ``CAP_SYS_RESOURCE`` can never raise any of them (the kernel
    refuses raising a hard limit; lowering its own limits harms nobody)."""
    for name in dir(resource):
        if not name.startswith("RLIMIT_"):
            continue
        res = getattr(resource, name)
        if res in PER_REQUEST_RLIMITS:
            continue
        try:
            soft, _hard = resource.getrlimit(res)
            resource.setrlimit(res, (soft, soft))
        except (ValueError, OSError):
            pass


# -- uid drop -----------------------------------------------------------------------------------


def drop_root(uid: int = UNPRIVILEGED_UID) -> None:
    """Switch from root to ``uid`` (and the same gid, no supplementary groups)."""
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


# -- seccomp ------------------------------------------------------------------------------------

_LD_ABS_W = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K
_NR, _ARCH = 0, 4


def _arg(index: int, high: bool = False) -> int:
    """Offset of syscall argument ``index`` (low or high 32 bits) in ``seccomp_data``."""
    return 16 + 8 * index + (4 if high else 0)


class _Program:
    """A tiny BPF assembler with forward labels."""

    def __init__(self) -> None:
        self.ops: list[tuple[int, Any, Any, int]] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self.labels[name] = len(self.ops)

    def load(self, offset: int) -> None:
        self.ops.append((_LD_ABS_W, 0, 0, offset))

    def jump(self, code: int, k: int, true: str | int = 0, false: str | int = 0) -> None:
        self.ops.append((code, true, false, k))

    def ret(self, value: int) -> None:
        self.ops.append((_RET_K, 0, 0, value))

    def assemble(self) -> bytes:
        out = bytearray()
        for position, (code, true, false, k) in enumerate(self.ops):
            offsets = []
            for target in (true, false):
                if isinstance(target, str):
                    target = self.labels[target] - position - 1
                if not 0 <= target <= 255:
                    raise ValueError("BPF jump out of range")
                offsets.append(target)
            out += struct.pack("=HBBI", code, offsets[0], offsets[1], k & 0xFFFFFFFF)
        return bytes(out)


def worker_filter() -> bytes:
    """The filter every sandbox worker installs on itself once (see the module docstring);
    its children inherit it."""
    return _worker_ops().assemble()


def child_filter(own_pid: int, allow_rlimits: bool = False) -> bytes:
    """The filter each child adds at the end of its setup (see the module docstring).

    ``allow_rlimits`` lets the child set its own rlimits (``setrlimit``, ``prlimit64`` on
    itself): only for processes without ``CAP_SYS_RESOURCE`` whose other hard limits are
    locked (:func:`lock_other_rlimits`), so the kernel refuses every raise. It lets the
    filter go in before the request's limits are known, off the request's critical path.
    """
    program, pid_offset = _child_template(allow_rlimits)
    return program[:pid_offset] + struct.pack("=I", own_pid) + program[pid_offset + 4 :]


_templates: dict[bool, tuple[bytes, int]] = {}
_INSTRUCTION_BYTES, _K_OFFSET = 8, 4  # struct sock_filter: code, jt, jf, then the 32-bit k


def _child_template(allow_rlimits: bool) -> tuple[bytes, int]:
    """The child filter assembled once per process; the pid goes in at ``pid_offset``."""
    if allow_rlimits not in _templates:
        program = _child_ops(0, allow_rlimits)
        pid_offset = program.labels["pid_check"] * _INSTRUCTION_BYTES + _K_OFFSET
        _templates[allow_rlimits] = (program.assemble(), pid_offset)
    return _templates[allow_rlimits]


def _assemble_child_filter(own_pid: int, allow_rlimits: bool = False) -> bytes:
    return _child_ops(own_pid, allow_rlimits).assemble()


_NUMBERS = {**SYSCALLS_X86_64, **SYSCALLS_X86_64_NEWER}


def _arch_check(p: _Program) -> None:
    """Kill a syscall of any other architecture (32-bit int 0x80, x32); load the number."""
    p.load(_ARCH)
    p.jump(_JEQ_K, AUDIT_ARCH_X86_64, 0, "kill")
    p.load(_NR)
    p.jump(_JGE_K, X32_SYSCALL_BIT, "kill", 0)


def _returns(p: _Program) -> None:
    p.label("allow")
    p.ret(SECCOMP_RET_ALLOW)
    p.label("eperm")
    p.ret(SECCOMP_RET_ERRNO | errno.EPERM)
    p.label("erofs")
    p.ret(SECCOMP_RET_ERRNO | errno.EROFS)
    p.label("enosys")
    p.ret(SECCOMP_RET_ERRNO | errno.ENOSYS)
    p.label("kill")
    p.ret(SECCOMP_RET_KILL_PROCESS)


def _worker_ops() -> _Program:
    p = _Program()
    _arch_check(p)
    p.jump(_JEQ_K, _NUMBERS["openat2"], "enosys", 0)
    p.jump(_JEQ_K, _NUMBERS["open"], "open_flags", 0)
    p.jump(_JEQ_K, _NUMBERS["openat"], "openat_flags", 0)
    for name in DENIED_SYSCALLS:
        p.jump(_JEQ_K, _NUMBERS[name], "eperm", 0)
    for name in READ_ONLY_FS_SYSCALLS:
        p.jump(_JEQ_K, _NUMBERS[name], "erofs", 0)
    p.ret(SECCOMP_RET_ALLOW)
    p.label("open_flags")  # open(path, flags, mode)
    p.load(_arg(1))
    p.jump(_JSET_K, OPEN_WRITE_FLAGS, "erofs", "allow")
    p.label("openat_flags")  # openat(dirfd, path, flags, mode)
    p.load(_arg(2))
    p.jump(_JSET_K, OPEN_WRITE_FLAGS, "erofs", "allow")
    _returns(p)
    return p


def _child_ops(own_pid: int, allow_rlimits: bool = False) -> _Program:
    p = _Program()
    _arch_check(p)
    p.jump(_JEQ_K, _NUMBERS["clone"], "clone", 0)
    p.jump(_JEQ_K, _NUMBERS["clone3"], "enosys", 0)
    p.jump(_JEQ_K, _NUMBERS["prlimit64"], "prlimit", 0)
    p.jump(_JEQ_K, _NUMBERS["kill"], "kill_signal", 0)
    for name in SELF_SIGNAL_SYSCALLS[1:]:
        p.jump(_JEQ_K, _NUMBERS[name], "tgkill_signal", 0)
    for name in CHILD_DENIED_SYSCALLS:
        if allow_rlimits and name == "setrlimit":
            continue
        p.jump(_JEQ_K, _NUMBERS[name], "eperm", 0)
    p.ret(SECCOMP_RET_ALLOW)
    p.label("kill_signal")  # kill(pid, sig)
    p.load(_arg(1))
    p.jump(_JEQ_K, signal.SIGKILL, "eperm", "self_only")
    p.label("tgkill_signal")  # tgkill(tgid, tid, sig), rt_tgsigqueueinfo(tgid, tid, sig, info)
    p.load(_arg(2))
    p.jump(_JEQ_K, signal.SIGKILL, "eperm", "self_only")
    p.label("clone")  # threads (CLONE_THREAD) only
    p.load(_arg(0))
    p.jump(_JSET_K, CLONE_THREAD, "allow", "eperm")
    p.label("prlimit")  # prlimit64(pid, resource, new_limit, old_limit)
    if allow_rlimits:  # on itself (pid 0) anything the kernel allows; others: read only
        p.load(_arg(0))
        p.jump(_JEQ_K, 0, 0, "prlimit_read")
        p.load(_arg(0, high=True))
        p.jump(_JEQ_K, 0, "allow", "prlimit_read")
    p.label("prlimit_read")  # reading limits only: new_limit must be NULL
    p.load(_arg(2))
    p.jump(_JEQ_K, 0, 0, "eperm")
    p.load(_arg(2, high=True))
    p.jump(_JEQ_K, 0, "allow", "eperm")
    p.label("self_only")  # signals to this process only
    p.load(_arg(0))
    p.label("pid_check")  # the only instruction that depends on own_pid
    p.jump(_JEQ_K, own_pid, 0, "eperm")
    p.load(_arg(0, high=True))
    p.jump(_JEQ_K, 0, "allow", "eperm")
    _returns(p)
    return p


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def seccomp_supported() -> bool:
    """The raw filter is written for x86_64 Linux."""
    return sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64")


class SeccompLoader:
    """Installs a filter with one syscall: the ctypes objects are made in the worker, before
    it forks, so a child only writes its pid into the buffer and calls (building them in each
    child cost more than the kernel's work)."""

    def __init__(self, program: bytes, pid_offset: int | None = None) -> None:
        if not seccomp_supported():
            raise OSError(errno.ENOSYS, f"seccomp filter not available on {platform.machine()}")
        self._buffer = ctypes.create_string_buffer(program, len(program))
        self._pid_offset = pid_offset
        self._fprog = _SockFprog(len(program) // 8, ctypes.cast(self._buffer, ctypes.c_void_p))
        self._syscall = _libc.syscall
        self._number = SYSCALLS_X86_64["seccomp"]
        self._pointer = ctypes.byref(self._fprog)

    def install(self, own_pid: int | None = None) -> None:
        """Install the filter on this process (requires ``no_new_privs``)."""
        if self._pid_offset is not None and own_pid is not None:
            struct.pack_into("=I", self._buffer, self._pid_offset, own_pid)
        _check(self._syscall(self._number, SECCOMP_SET_MODE_FILTER, 0, self._pointer),
               "seccomp(SET_MODE_FILTER)")  # fmt: skip


def worker_seccomp() -> SeccompLoader:
    return SeccompLoader(worker_filter())


def child_seccomp(allow_rlimits: bool) -> SeccompLoader:
    """A loader of the child filter; :meth:`SeccompLoader.install` takes the child's pid."""
    program, pid_offset = _child_template(allow_rlimits)
    return SeccompLoader(program, pid_offset)


# -- Landlock -----------------------------------------------------------------------------------


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, or 0 when Landlock is unavailable."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return 0
    result = _libc.syscall(
        SYSCALLS_X86_64["landlock_create_ruleset"], None, 0, LANDLOCK_CREATE_RULESET_VERSION
    )
    return max(int(result), 0)


def _fs_rights(abi: int) -> int:
    return FS_RIGHTS_BY_ABI[max(k for k in FS_RIGHTS_BY_ABI if k <= abi)]


def read_only_paths() -> list[str]:
    """System libraries and the interpreter's standard library (never the app directory)."""
    paths = ["/usr", "/lib", "/lib64", "/bin", "/etc/ld.so.cache", "/etc/localtime",
             "/dev/urandom"]  # fmt: skip
    # the base interpreter's library, not a virtualenv's (that would expose site-packages)
    base = {
        "installed_base": sys.base_prefix,
        "base": sys.base_prefix,
        "installed_platbase": sys.base_exec_prefix,
        "platbase": sys.base_exec_prefix,
    }
    for key in ("stdlib", "platstdlib"):
        stdlib = sysconfig.get_path(key, vars=base)
        paths += [stdlib, os.path.join(stdlib, "lib-dynload")]
    resolved = sorted({os.path.realpath(p) for p in paths if os.path.exists(p)})
    # a rule on a directory covers everything beneath it: keep only the outermost paths
    return [p for p in resolved if not any(p.startswith(q + os.sep) for q in resolved)]


def open_read_only(paths: list[str]) -> list[tuple[int, bool]]:
    """Open ``paths`` as O_PATH descriptors (before any uid drop) for :func:`apply_landlock`."""
    return [(os.open(path, O_PATH | os.O_CLOEXEC), os.path.isdir(path)) for path in paths]


def apply_landlock(abi: int, workdir_fd: int, read_only: list[tuple[int, bool]]) -> None:
    """Restrict this process to reading ``read_only`` and its workdir (and /dev/null).

    ``read_only`` holds (O_PATH fd, is_dir) pairs from :func:`open_read_only`; the workdir
    is given as an fd too, opened before any uid drop. Nothing is writable but /dev/null:
    the same read-only filesystem the seccomp filter enforces, so either layer alone holds.
    """
    handled_fs = _fs_rights(abi)
    handled_net = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
    attr = struct.pack("=QQQ", handled_fs, handled_net, scoped)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = _check(
        _libc.syscall(SYSCALLS_X86_64["landlock_create_ruleset"], attr[:size], size, 0),
        "landlock_create_ruleset",
    )
    own: list[int] = []
    try:
        file_rights = FS_EXECUTE | FS_READ_FILE | FS_WRITE_FILE | (1 << 14)
        read = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
        rules = [(fd, read if is_dir else read & file_rights) for fd, is_dir in read_only]
        rules.append((workdir_fd, read))
        own.append(os.open("/dev/null", O_PATH | os.O_CLOEXEC))
        rules.append((own[-1], FS_READ_FILE | FS_WRITE_FILE))
        for fd, rights in rules:
            rule = struct.pack("=Qi", rights & handled_fs, fd)
            _check(
                _libc.syscall(
                    SYSCALLS_X86_64["landlock_add_rule"], ruleset, LANDLOCK_RULE_PATH_BENEATH,
                    rule, 0,
                ),
                "landlock_add_rule",
            )  # fmt: skip
        _check(
            _libc.syscall(SYSCALLS_X86_64["landlock_restrict_self"], ruleset, 0),
            "landlock_restrict_self",
        )
    finally:
        for fd in own:
            os.close(fd)
        os.close(ruleset)
