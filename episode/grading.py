"""Grading: a syntax check, then the sandbox, then the judge, outside the sandbox.

The sandbox returns observations only; :func:`tracefix_rl.judge.judge` turns them into a
verdict here, in the server process. Code that does not parse never reaches the sandbox.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from tracefix_rl.episode.editor import SyntaxProblem
from tracefix_rl.episode.errors import ActionError
from tracefix_rl.episode.trace import TraceData, trace_of
from tracefix_rl.judge import TestVerdict, Verdict, judge
from tracefix_rl.sandbox import (
    EvalRequest,
    EvalResult,
    EvaluationCancelled,
    SandboxBackend,
    SandboxBusy,
    get_sandbox,
)
from tracefix_rl.tasks import Task, TaskTest

log = logging.getLogger("tracefix_rl.grading")

GRADING_ATTEMPTS = 3  # a busy sandbox is retried this often at SUBMIT / max_steps


def syntax_verdict(problem: SyntaxProblem, count: int) -> Verdict:
    """Every test fails with the parse error (code that does not parse is not run)."""
    line, message = problem
    return Verdict(tests=(TestVerdict(False, message, line),) * count)


class Grader:
    """Runs one environment's evaluations: at most one in flight, cancellable.

    A ``SandboxFailure`` (busy, a fault of the sandbox's own, cancelled) propagates: the
    environment reports it and the step does not happen.
    """

    def __init__(self, sandbox: SandboxBackend | None = None) -> None:
        self._sandbox = sandbox
        self._evaluating = threading.Lock()  # at most one evaluation in flight
        self._cancel = threading.Event()  # set by cancel(): stops the evaluation in flight
        self._closed = False

    @property
    def sandbox(self) -> SandboxBackend:
        if self._sandbox is None:
            self._sandbox = get_sandbox()
        return self._sandbox

    @property
    def busy(self) -> bool:
        """An evaluation is in flight."""
        return self._evaluating.locked()

    def cancel(self) -> None:
        """Cancel the evaluation in flight, if any (thread-safe): a queued one is dropped, a
        running one is killed, and its step reports the cancellation."""
        self._cancel.set()

    def close(self) -> None:
        """Cancel the evaluation in flight and refuse later ones."""
        self._closed = True
        self.cancel()

    def visible(self, task: Task, code: str, problem: SyntaxProblem | None) -> tuple[Verdict, str]:
        """The verdict on ``task``'s visible tests and the output they printed (each test's
        output headed by its name)."""
        tests = task.visible_tests
        if problem is not None:
            return syntax_verdict(problem, len(tests)), ""
        result = self._evaluate(code, tests, labels=tuple(t.name for t in tests))
        return judge(result, task.expected_visible, task.float_tolerance), result.output

    def all(self, task: Task, code: str, problem: SyntaxProblem | None) -> Verdict:
        """The verdict on every test, visible then hidden; a busy sandbox is retried
        ``GRADING_ATTEMPTS`` times, since the final grading matters most."""
        if problem is not None:
            return syntax_verdict(problem, len(task.all_tests))
        for attempt in range(GRADING_ATTEMPTS):
            try:
                return judge(self._evaluate(code, task.all_tests), task.expected,
                             task.float_tolerance)  # fmt: skip
            except SandboxBusy:
                if attempt == GRADING_ATTEMPTS - 1:
                    raise
                log.warning("sandbox busy while grading; retrying")
        raise AssertionError("unreachable")

    def trace(
        self, task: Task, code: str, index: int, spec: dict[str, Any]
    ) -> tuple[TestVerdict, str, TraceData | None, str]:
        """Visible test ``index`` of ``task`` run once as RUN_TESTS runs it (its verdict
        and output), then once more under tracing (``spec``: ``lines``, ``watch``): the
        verdict, the output, the trace (None when unusable) and why it is missing. The
        trace record is read apart from the records the judge sees."""
        test = task.visible_tests[index]
        if test.observe_list:
            spec = {**spec, "as_list": True}
        result = self._evaluate(code, (test,), labels=(test.name,), trace=spec)
        trace, missing = trace_of(result.records)
        result.records = [record for record in result.records if "trace" not in record]
        verdict = judge(result, task.expected_visible[index : index + 1], task.float_tolerance)
        return verdict.tests[0], result.output, trace, missing

    def _evaluate(
        self,
        code: str,
        tests: tuple[TaskTest, ...],
        labels: tuple[str, ...] = (),
        trace: dict[str, Any] | None = None,
    ) -> EvalResult:
        if not self._evaluating.acquire(blocking=False):
            raise ActionError("an evaluation is already running for this episode")
        try:
            if self._closed:
                raise EvaluationCancelled("the environment was closed")
            self._cancel = threading.Event()
            request = EvalRequest(code=code, tests=tuple(t.code for t in tests), labels=labels,
                                  as_list=tuple(t.observe_list for t in tests),
                                  trace=trace)  # fmt: skip
            return self.sandbox.run(request, cancel=self._cancel)
        finally:
            self._evaluating.release()
