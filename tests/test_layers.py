"""The isolation layers themselves: syscall table, BPF program, probe and degrade policy."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tracefix_rl.sandbox import SandboxUnavailable, ZygotePool, layers

UNISTD = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")


@pytest.mark.skipif(not UNISTD.exists(), reason="kernel headers not installed")
def test_syscall_numbers_match_the_kernel_header():
    defined = dict(re.findall(r"#define __NR_(\w+) (\d+)", UNISTD.read_text()))
    for name, number in layers.SYSCALLS_X86_64.items():
        assert int(defined[name]) == number, name
    for name, number in layers.SYSCALLS_X86_64_NEWER.items():  # headers older than 6.17
        assert int(defined.get(name, number)) == number, name


def test_every_denied_syscall_is_known():
    table = {**layers.SYSCALLS_X86_64, **layers.SYSCALLS_X86_64_NEWER}
    denied = (
        layers.DENIED_SYSCALLS
        + layers.CHILD_DENIED_SYSCALLS
        + layers.SELF_SIGNAL_SYSCALLS
        + layers.READ_ONLY_FS_SYSCALLS
    )
    assert set(denied) <= set(table)
    for needed in ("execve", "socket", "ptrace", "io_uring_setup", "unshare", "bpf"):
        assert needed in layers.DENIED_SYSCALLS  # the worker filter: worker and children
    for needed in ("fork", "vfork", "setsid", "setrlimit", "setuid", "setgroups"):
        assert needed in layers.CHILD_DENIED_SYSCALLS  # the child filter
    for needed in ("unlink", "mkdir", "rename", "chmod", "truncate", "symlink", "link"):
        assert needed in layers.READ_ONLY_FS_SYSCALLS


@pytest.mark.parametrize("program", [layers.worker_filter(), layers.child_filter(1234)],
                         ids=["worker", "child"])  # fmt: skip
def test_bpf_programs_check_the_architecture_first(program):
    assert len(program) % 8 == 0
    first = program[:8]
    assert first[:2] == (0x20).to_bytes(2, "little") and first[4:] == (4).to_bytes(4, "little")
    second_k = int.from_bytes(program[12:16], "little")
    assert second_k == layers.AUDIT_ARCH_X86_64


def test_pool_reports_enforced_layers():
    pool = ZygotePool(workers=1)
    try:
        facts = pool.describe()
        assert facts["seccomp"] is True and facts["rlimits"] is True
        assert facts["non_dumpable"] is True
        assert facts["landlock_abi"] == layers.landlock_abi()
        import os

        assert facts["uid_drop"] is (os.geteuid() == 0)
    finally:
        pool.close()


def test_refuses_to_start_without_seccomp_unless_allowed():
    with pytest.raises(SandboxUnavailable, match="SANDBOX_ALLOW_DEGRADED=1"):
        ZygotePool(workers=1, seccomp=False)
    pool = ZygotePool(workers=1, seccomp=False, allow_degraded=True)
    try:
        assert pool.describe()["seccomp"] is False and "seccomp" in pool.describe()["degraded"]
    finally:
        pool.close()


def test_landlock_can_be_forced_off():
    pool = ZygotePool(workers=1, landlock=False)
    try:
        facts = pool.describe()
        assert facts["landlock_abi"] == 0 and facts["degraded"] == ["landlock"]
    finally:
        pool.close()


def test_prepared_filter_equals_a_fresh_assembly():
    for allow in (False, True):
        assert layers.child_filter(4321, allow) == layers._assemble_child_filter(4321, allow)
    assert layers.child_filter(1) != layers.child_filter(2)
    assert len(layers.child_filter(1)) < len(layers.worker_filter()) / 2  # cheap per child
