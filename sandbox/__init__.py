"""Run untrusted Python code and its tests in isolated processes; return observations.

The sandbox never decides pass or fail: for every test it reports the canonical value of
the test's last expression, or the name of the exception raised (see ``harness``); the
judge (``judge.py``, in the server) compares them with expected values that never enter the
sandbox. The backend is a pool of warm, exec-started zygotes (``pool``) that fork one child
per evaluation with every layer of ``layers`` applied.

Configuration (environment variables): ``SANDBOX_WORKERS`` (pool size, default the CPU
count + 1, at least 2 and at most 8), ``SANDBOX_QUEUE_TIMEOUT_S`` (30),
``SANDBOX_MAX_QUEUE`` (1024), ``SANDBOX_ALLOW_DEGRADED`` (run without seccomp),
``SANDBOX_DISABLE_LANDLOCK``, ``SANDBOX_ROOT`` and the limits of :meth:`Limits.from_env`.
"""

from __future__ import annotations

import os
import threading

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

__all__ = [
    "EvalRequest", "EvalResult", "EvaluationCancelled", "FairSlots", "Limits", "SandboxBackend",
    "SandboxBusy", "SandboxFailure", "SandboxFault", "SandboxUnavailable", "TestTimeout",
    "ZygotePool", "canonical", "close_sandbox", "get_sandbox", "prewarm",
]  # fmt: skip

_TRUE = ("1", "true", "yes")
_default: SandboxBackend | None = None
_default_lock = threading.Lock()


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def sandbox_from_env() -> ZygotePool:
    """A new pool configured from the ``SANDBOX_*`` environment variables."""
    workers = os.environ.get("SANDBOX_WORKERS")
    return ZygotePool(
        limits=Limits.from_env(),
        workers=int(workers) if workers else None,
        queue_timeout_s=float(os.environ.get("SANDBOX_QUEUE_TIMEOUT_S", "30")),
        max_queue=int(os.environ.get("SANDBOX_MAX_QUEUE", "1024")),
        allow_degraded=_flag("SANDBOX_ALLOW_DEGRADED"),
        landlock=not _flag("SANDBOX_DISABLE_LANDLOCK"),
        seccomp=not _flag("SANDBOX_DISABLE_SECCOMP"),
    )


def get_sandbox() -> SandboxBackend:
    """The process-wide sandbox, started on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = sandbox_from_env()
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


def prewarm() -> threading.Thread:
    """Start the process-wide sandbox in a background thread, so its workers boot while the
    caller goes on importing; ``get_sandbox()`` then waits for it. A failure is left for the
    next ``get_sandbox()`` call to raise."""

    def start() -> None:
        try:
            get_sandbox()
        except Exception:  # noqa: BLE001 - get_sandbox() raises it again where it matters
            pass

    thread = threading.Thread(target=start, name="sandbox-prewarm", daemon=True)
    thread.start()
    return thread
