"""TRACE: run one visible test again with tracing and report what happened inside the code.

Bounded, deterministic and stateless (debug-gym's pdb is none of these): one test, the same
time limit as RUN_TESTS, a report of at most ``episode.trace.REPORT_CHARS`` characters,
nothing kept between calls. The test first runs as RUN_TESTS runs it (its verdict and
output are that run's, so tracing never changes a verdict), then once more under
``sys.settrace`` inside the sandbox child; the trace comes back as untrusted data
(``episode.trace``). Only visible tests can be traced. It costs a step and earns no
shaping reward.
"""

from __future__ import annotations

import ast
from typing import TYPE_CHECKING

from pydantic import Field

from tracefix_rl.actions.base import Action, ActionParams
from tracefix_rl.episode import render
from tracefix_rl.episode.errors import ActionError
from tracefix_rl.episode.trace import MAX_HITS, render_report, spec

if TYPE_CHECKING:
    from tracefix_rl.episode.state import Episode
    from tracefix_rl.tasks import Task

MAX_LINES = 5  # lines to snapshot per TRACE
MAX_WATCH = 5  # watch expressions per TRACE
WATCH_CHARS = 100  # characters of one watch expression


class TraceParams(ActionParams):
    test: int | str = Field(
        description="The visible test to trace: its 1-based number in RUN_TESTS' list, or its name."
    )
    lines: list[int] | None = Field(
        default=None,
        max_length=MAX_LINES,
        description=f"Up to {MAX_LINES} line numbers: the locals there (before the line runs, "
        f"the first {MAX_HITS} times it runs).",
    )
    watch: list[str] | None = Field(
        default=None,
        max_length=MAX_WATCH,
        description=f"Up to {MAX_WATCH} Python expressions (at most {WATCH_CHARS} characters "
        "each) evaluated at those lines, and where the test failed or returned.",
    )


def test_index(task: Task, test: int | str) -> int:
    """The 0-based index of the visible test ``test`` names (number or name)."""
    count = len(task.visible_tests)
    if isinstance(test, int):
        if not 1 <= test <= count:
            raise ActionError(f"test {test} is not a visible test (1..{count})")
        return test - 1
    for index, candidate in enumerate(task.visible_tests):
        if candidate.name == test:
            return index
    if test.strip().isdigit():
        return test_index(task, int(test.strip()))
    names = "; ".join(candidate.name for candidate in task.visible_tests)
    raise ActionError(f"no visible test is named {test[:80]!r} (only visible tests can be "
                      f"traced: {names})")  # fmt: skip


def _check_watch(text: str) -> None:
    if len(text) > WATCH_CHARS:
        raise ActionError(f"watch expression longer than {WATCH_CHARS} characters")
    try:
        ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ActionError(f"watch {text!r} is not a Python expression") from None


class Trace(Action):
    name = "TRACE"
    order = 25
    description = (
        "Run one visible test again with tracing and report the lines it executed (loops "
        "folded as [a b]×n), the locals where it failed (at the exception, or at the return "
        "when the value was wrong), and, if you ask, the locals at lines you name and watch "
        "expressions evaluated there. Use it to see why a test fails. Costs a step, earns no "
        "reward; the test's verdict is the one RUN_TESTS gives."
    )
    Params = TraceParams
    examples = ({"test": 1}, {"test": 2, "lines": [4], "watch": ["total"]})

    def apply(self, episode: Episode, params: TraceParams) -> float:
        task = episode.task
        index = test_index(task, params.test)
        count = len(episode.editor)
        lines = sorted(set(params.lines or ()))
        for line in lines:
            if not 1 <= line <= count:
                raise ActionError(f"line {line} is outside the file (1..{count})")
        watch = list(dict.fromkeys(params.watch or ()))
        for text in watch:
            _check_watch(text)
        test = task.visible_tests[index]
        heading = f"TRACE of visible test {index + 1} of {len(task.visible_tests)}: {test.name}"
        problem = episode.editor.syntax_problem()
        if problem is not None:
            line, message = problem
            episode.output = f"{heading}\nResult: nothing ran: the code does not parse ({message})"
            episode.focus = None if line is None else render.window_around(line)
            return 0.0
        verdict, output, data, missing = episode.trace_visible(index, spec(lines, watch))
        result = "PASS" if verdict.passed else f"FAIL: {verdict.detail}"
        printed = render.clip_output(render.printed_sections(output, [test.name]))
        episode.output = render_report(heading, result, data, missing, verdict.passed, printed)
        where = data.exc.line if data is not None and data.exc is not None else verdict.line
        episode.focus = None if where is None else render.window_around(where)
        return 0.0
