"""Run untrusted Python code and its tests in isolated processes; return observations.

The sandbox never decides pass or fail: for every test it reports the canonical value of
the test's last expression, or the name of the exception raised (see ``harness``); the
judge (``judge.py``, in the server) compares them with expected values that never enter the
sandbox. The backend is a pool of warm, exec-started zygotes (``pool``) that fork one child
per evaluation with every layer of ``layers`` applied.

Configuration: :func:`sandbox_from_settings` builds a pool from the server's settings
(``SANDBOX_*``, read and validated by ``tracefix_rl.settings``); this package reads no
environment variable itself. :func:`get_sandbox` is the process-wide pool.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from tracefix_rl.sandbox.api import (
    EvalRequest,
    EvalResult,
    EvaluationCancelled,
    Limits,
    SandboxBackend,
    SandboxBusy,
    SandboxFailure,
    SandboxFault,
    SandboxUnavailable,
)
from tracefix_rl.sandbox.harness import TestTimeout, canonical
from tracefix_rl.sandbox.pool import FairSlots, ZygotePool

if TYPE_CHECKING:
    from tracefix_rl.settings import Settings

__all__ = [
    "EvalRequest", "EvalResult", "EvaluationCancelled", "FairSlots", "Limits", "SandboxBackend",
    "SandboxBusy", "SandboxFailure", "SandboxFault", "SandboxUnavailable", "TestTimeout",
    "ZygotePool", "canonical", "close_sandbox", "get_sandbox", "sandbox_from_settings",
]  # fmt: skip

_default: SandboxBackend | None = None
_default_lock = threading.Lock()


def sandbox_from_settings(settings: Settings) -> ZygotePool:
    """A new pool configured by ``settings`` (its ``SANDBOX_*`` fields)."""
    root = settings.sandbox_root
    return ZygotePool(
        limits=Limits.from_settings(settings),
        workers=settings.sandbox_workers,
        queue_timeout_s=settings.sandbox_queue_timeout_s,
        max_queue=settings.sandbox_max_queue,
        root=str(root) if root is not None else None,
        allow_degraded=settings.sandbox_allow_degraded,
        landlock=not settings.sandbox_disable_landlock,
        seccomp=not settings.sandbox_disable_seccomp,
    )


def get_sandbox(settings: Settings | None = None) -> SandboxBackend:
    """The process-wide sandbox, started on the first call: configured by ``settings`` (a
    server passes its own, at start-up), else by ``settings.environment_settings()``.
    Later calls return it whatever they pass. Raises :class:`SandboxUnavailable` when the
    sandbox cannot isolate as required (the next call tries again)."""
    global _default
    with _default_lock:
        if _default is None:
            if settings is None:
                # Imported only here: the sandbox package does not need pydantic otherwise.
                from tracefix_rl.settings import environment_settings

                settings = environment_settings()
            _default = sandbox_from_settings(settings)
        return _default


def close_sandbox() -> None:
    """Close the process-wide sandbox if it was started: running evaluations end (their
    callers get :class:`SandboxFault`), every worker and child process is killed, and this
    server's sandbox root is removed. Idempotent; a later ``get_sandbox()`` starts anew."""
    global _default
    with _default_lock:
        backend, _default = _default, None
    if backend is not None:
        backend.close()
