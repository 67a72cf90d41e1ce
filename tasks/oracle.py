"""The oracle check: expected observations come from running the solution in the sandbox;
the buggy code must fail at least one visible and one hidden test (for a task that gave one
``tests`` list, the check chooses the visible tests so that it does)."""

from __future__ import annotations

import hashlib
import json
import random
import threading
from dataclasses import replace
from typing import Any

from tracefix_rl.judge import TIMEOUT_EXCEPTION, Verdict, expected_record, json_equal, judge
from tracefix_rl.sandbox import EvalRequest, EvalResult, Limits, SandboxBackend
from tracefix_rl.tasks.schema import Task, TaskProblem, TaskTest

FATAL_REFERENCE_ERRORS = (TIMEOUT_EXCEPTION, "MemoryError", "RecursionError")
VISIBLE_SHARE = 1 / 3  # of a single tests list, shown to the agent


def evaluate(
    sandbox: SandboxBackend,
    code: str,
    tests: tuple[TaskTest, ...],
    cancel: threading.Event | None = None,
    **kw: Any,
) -> EvalResult:
    """Run ``code`` against ``tests`` in the sandbox (returns the raw ``EvalResult``)."""
    request = EvalRequest(code=code, tests=tuple(t.code for t in tests),
                          as_list=tuple(t.observe_list for t in tests), **kw)  # fmt: skip
    return sandbox.run(request, cancel=cancel)


def program_digest(task: Task) -> str:
    """Identifies a program's solution, tests and expected values (for caches)."""
    payload = json.dumps(
        [task.solution, [t.code for t in task.all_tests], list(task.expected)], sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def reference_run(task: Task, sandbox: SandboxBackend) -> tuple[dict[str, Any], ...] | str:
    """Expected observations from the solution, or why they cannot be trusted."""
    tests = task.all_tests
    reference = evaluate(sandbox, task.solution, tests)
    records = {r.get("i"): r for r in reference.records}
    problems = []
    if reference.timed_out:
        problems.append("solution timed out")
    for index, test in enumerate(tests):
        record = records.get(index)
        kind = "visible" if index < len(task.visible_tests) else "hidden"
        if task.choose_visible:
            kind = "the"
        if record is None:
            problems.append(f"solution produced no result for {kind} test {test.name!r}")
        elif record.get("e") in FATAL_REFERENCE_ERRORS:
            problems.append(f"solution hit {record['e']} on {kind} test {test.name!r}")
        elif "v" in record and _contains_unserializable(record["v"]):
            problems.append(
                f"{kind} test {test.name!r} returns data that is not builtin "
                f"({record['v']}); end the test with an expression of builtin types"
            )
        elif test.has_given and not (
            "v" in record and json_equal(test.given, record["v"], task.float_tolerance)
        ):
            shown = record.get("v", record.get("e"))
            problems.append(f"solution gives {shown!r} for {kind} test {test.name!r}, but the "
                            f"task says {test.given!r}")  # fmt: skip
    if problems:
        return "; ".join(problems)
    return tuple(expected_record(records[i]) for i in range(len(tests)))


def buggy_verdict(task: Task, code: str, sandbox: SandboxBackend,
                  limits: Limits | None = None) -> Verdict:  # fmt: skip
    result = evaluate(sandbox, code, task.all_tests, limits=limits)
    return judge(result, task.expected, task.float_tolerance)


def check_buggy(task: Task, verdict: Verdict, allow_timeouts: bool = False,
                hidden_failure: bool = True) -> str | None:  # fmt: skip
    """Why ``verdict`` (of the buggy code) makes the task invalid, or None. A buggy program
    that times out everywhere is a fine task when written by a person (the bug may be an
    infinite loop: ``allow_timeouts``), not when a mutation made it. ``hidden_failure``:
    some hidden test must fail too (waived only for a single tests list whose buggy code
    fails one test, which :func:`choose_visible` makes visible)."""
    visible = len(task.visible_tests)
    if all(t.passed for t in verdict.tests[:visible]):
        return "buggy code passes every visible test"
    if hidden_failure and all(t.passed for t in verdict.tests[visible:]):
        return "buggy code passes every hidden test"
    if not allow_timeouts and all(
        not t.passed and (t.detail or "").startswith(("timed out", "no result"))
        for t in verdict.tests
    ):
        return "buggy code times out on every test"
    return None


def oracle_check(task: Task, sandbox: SandboxBackend) -> Task | TaskProblem:
    """Compute expected observations from the solution and check the buggy code fails."""
    expected = reference_run(task, sandbox)
    if isinstance(expected, str):
        return TaskProblem(task.origin, expected, task.task_id, task.source)
    task = replace(task, expected=expected)
    verdict = buggy_verdict(task, task.buggy_code, sandbox)
    single_failure = False
    if task.choose_visible:
        chosen = choose_visible(task, verdict)
        if isinstance(chosen, str):
            return TaskProblem(task.origin, chosen, task.task_id, task.source)
        single_failure = sum(not t.passed for t in verdict.tests) == 1
        task, verdict = chosen
    problem = check_buggy(task, verdict, allow_timeouts=True, hidden_failure=not single_failure)
    if problem is not None:
        return TaskProblem(task.origin, problem, task.task_id, task.source)
    visible = len(task.visible_tests)
    return replace(
        task,
        buggy_visible_passed=sum(t.passed for t in verdict.tests[:visible]),
        buggy_all_passed=verdict.passed,
        buggy_passing=tuple(t.passed for t in verdict.tests),
    )


def choose_visible(task: Task, verdict: Verdict) -> tuple[Task, Verdict] | str:
    """Split a single ``tests`` list (held in ``hidden_tests``): about a third visible,
    chosen deterministically from the task id, such that at least one visible and one hidden
    test fail on the buggy code (``verdict``); each part keeps the file's order. When the
    buggy code fails just one test, no such split exists: that test is made visible (the
    hidden tests then all pass on the buggy code and guard against a fix fitted to it).
    Returns the split task and its verdict in the new order, or why it cannot be split."""
    tests = task.hidden_tests
    failing = [i for i, t in enumerate(verdict.tests) if not t.passed]
    if not failing:
        return f"buggy code passes all {len(tests)} tests"
    order = list(range(len(tests)))
    random.Random(hashlib.sha256(task.task_id.encode()).hexdigest()).shuffle(order)
    count = min(len(tests) - 1, max(1, round(len(tests) * VISIBLE_SHARE)))
    visible, hidden = order[:count], order[count:]
    if not any(i in failing for i in visible):
        first = next(i for i in order if i in failing)
        hidden[hidden.index(first)], visible[-1] = visible[-1], first
    if len(failing) > 1 and not any(i in failing for i in hidden):
        moved = next(i for i in reversed(visible) if i in failing)
        spare = next((i for i in hidden if i not in failing), hidden[0])
        visible[visible.index(moved)], hidden[hidden.index(spare)] = spare, moved
    visible.sort()
    hidden.sort()
    new_order = visible + hidden
    split = replace(
        task,
        visible_tests=tuple(tests[i] for i in visible),
        hidden_tests=tuple(tests[i] for i in hidden),
        expected=tuple(task.expected[i] for i in new_order),
        choose_visible=False,
    )
    return split, replace(verdict, tests=tuple(verdict.tests[i] for i in new_order))


def _contains_unserializable(value: Any) -> bool:
    if type(value) is list:
        return any(_contains_unserializable(v) for v in value)
    if type(value) is dict:
        if value.get("t") == "unserializable":
            return True
        return _contains_unserializable(value.get("v"))
    return False
