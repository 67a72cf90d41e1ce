"""Types shared by every sandbox backend: limits, requests, results, errors, the interface."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from tracefix_rl.settings import Settings


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
    def from_settings(cls, settings: Settings) -> Limits:
        """The limits ``settings`` ask for (``SANDBOX_WALL_TIMEOUT_S``, ``_TEST_TIMEOUT_S``,
        ``_CPU_S``, ``_MEMORY_MB``, ``_OUTPUT_BYTES``); the rest keep the defaults above."""
        return cls(
            wall_s=settings.sandbox_wall_timeout_s,
            per_test_s=settings.sandbox_test_timeout_s,
            cpu_s=settings.sandbox_cpu_s,
            memory_mb=settings.sandbox_memory_mb,
            output_bytes=settings.sandbox_output_bytes,
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
    as_list: tuple[bool, ...] = ()
    """Per test: observe an iterator value as the list of what it yields (tasks with
    ``observe = "list"`` and QuixBugs-style cases; see ``sandbox.harness._materialize``)."""
    trace: dict[str, Any] | None = None
    """TRACE: ``{"lines": [...], "watch": [...]}`` re-runs ``tests[0]`` under tracing and adds
    one ``{"trace": {...}}`` record (see ``sandbox.harness._trace_run``)."""


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


class SandboxFailure(RuntimeError):
    """The evaluation did not happen, for a reason that is not the agent's code."""


class SandboxBusy(SandboxFailure):
    """No evaluation slot became free in time, or the queue is full."""


class SandboxFault(SandboxFailure):
    """The sandbox broke during the evaluation (a worker died, the pool closed), twice."""


class EvaluationCancelled(SandboxFailure):
    """The caller cancelled the evaluation (its client went away)."""


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot provide the isolation it is required to (and may not degrade)."""


class SandboxBackend(Protocol):
    """Interface every sandbox backend implements."""

    name: str

    def run(self, request: EvalRequest, cancel: threading.Event | None = None) -> EvalResult:
        """Evaluate ``request`` in isolation and return the raw observations.

        Raises a :class:`SandboxFailure` when no evaluation happened: busy, a fault of the
        sandbox itself (already retried), or ``cancel`` set while queued or running.
        """
        ...

    def describe(self) -> dict[str, Any]:
        """Facts for ``/health``: backend name, enforced layers, limits, capacity."""
        ...

    def health_problem(self) -> str | None:
        """Why the backend cannot serve at full strength right now (None when it can)."""
        ...

    def close(self) -> None:
        """Release every resource (processes, working directories)."""
        ...
