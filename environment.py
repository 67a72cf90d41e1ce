"""The tracefix_rl environment: reset/step/state, one handler per action, reward, grading.

Reward (every constant below is used; see the README's reward section):

* every step costs ``STEP_COST``; a rejected action costs ``INVALID_ACTION_PENALTY`` more;
* RUN_TESTS pays potential-based shaping ``VISIBLE_WEIGHT * (phi - phi_prev)``, where phi
  is the visible pass fraction and phi_prev the fraction of the last *measured* code
  (initially the buggy code's), so re-running unchanged code earns nothing and edit/undo
  cycles telescope to zero;
* the episode's last step (SUBMIT, or reaching ``max_steps``) settles the shaping against
  the final code and adds ``SCORE_WEIGHT * (score - score_buggy) + SOLVE_BONUS * solved``,
  where ``score`` is the pass fraction over visible and hidden tests.

So an episode's return is ``VISIBLE_WEIGHT*(phi_final - phi_buggy) + SCORE_WEIGHT*(score -
score_buggy) + SOLVE_BONUS*solved - costs``: leaving the code as it was returns at most 0,
and the shortest correct fix has the highest return.
"""

from tracefix_rl import models  # noqa: F401  (first: keeps gradio out unless the web UI is on)

# isort: split

import ast
import functools
import logging
import os
import random
import sys
import threading
import uuid
from collections.abc import Callable
from importlib import metadata
from typing import Any

from openenv.core.env_server.interfaces import Environment
from openenv.core.env_server.types import EnvironmentMetadata

from tracefix_rl.judge import TestVerdict, Verdict, judge
from tracefix_rl.models import (
    ResetArgs,
    TestResult,
    TraceFixAction,
    TraceFixObservation,
    TraceFixState,
)
from tracefix_rl.sandbox import (
    EvalResult,
    EvaluationCancelled,
    SandboxBackend,
    SandboxBusy,
    SandboxFailure,
    get_sandbox,
)
from tracefix_rl.tasks import Task, TaskRegistry, TaskTest, evaluate, get_registry

log = logging.getLogger("tracefix_rl.environment")

STEP_COST = 0.01
INVALID_ACTION_PENALTY = 0.02
VISIBLE_WEIGHT = 0.2
SCORE_WEIGHT = 0.3
SOLVE_BONUS = 1.0
REWARD_RANGE = (-1.0, 2.0)  # declared in openenv.yaml; every step reward lies inside it
REWARD_DIGITS = 6

MAX_STEPS_ENV = "MAX_STEPS"
DEFAULT_MAX_STEPS = 50
MAX_FILE_LINES = 400
MAX_FILE_CHARS = 20_000
UNDO_DEPTH = 50
# Bytes of memory the undo history may hold (about ten ASCII files at the size cap): bounds
# an episode's memory, since a server keeps hundreds of them; the oldest levels go first.
UNDO_MAX_BYTES = 256 * 1024
CONTEXT_RADIUS = 6
CONTEXT_CHARS = 4000
OUTPUT_CHARS = 2000
GRADING_ATTEMPTS = 3
FOCUS_MARK = ">>"


def default_max_steps() -> int:
    """``MAX_STEPS`` from the environment, else 50."""
    return int(os.environ.get(MAX_STEPS_ENV, DEFAULT_MAX_STEPS))


class ActionError(Exception):
    """An action the environment rejects; its message becomes ``last_action_error``."""


# CPython 3.11's ast.parse is not safe to run in several threads at once: under load
# (256 HTTP episodes) it failed now and then with "SystemError: AST constructor recursion
# depth mismatch". Parsing takes at most about a millisecond, so one parse at a time.
_PARSE_LOCK = threading.Lock()


SYNTAX_CACHE_SIZE = 512  # programs; at most ~10 MB of code at the 20,000-character cap


@functools.lru_cache(maxsize=SYNTAX_CACHE_SIZE)
def syntax_error_of(code: str) -> tuple[int | None, str] | None:
    """``(line, message)`` if ``code`` does not parse, else None. Nothing is executed.

    Cached across episodes: a trainer plays each task many times at once (a GRPO group
    starts from the same buggy program), and parsing was a fifth of the server's busy time
    at 256 sessions (profiled with py-spy)."""
    try:
        with _PARSE_LOCK:
            ast.parse(code, "<solution>")
    except SyntaxError as exc:
        return exc.lineno, f"SyntaxError: {exc.msg} (line {exc.lineno})"
    except (ValueError, RecursionError, MemoryError) as exc:
        return None, f"{type(exc).__name__}: the code cannot be parsed"
    return None


def render_window(lines: list[str], first: int, last: int, focus: int | None) -> str:
    """Numbered lines ``first..last`` (1-indexed) with the focus line marked."""
    rows = []
    for number in range(max(1, first), min(len(lines), last) + 1):
        mark = FOCUS_MARK if number == focus else " " * len(FOCUS_MARK)
        rows.append(f"{mark} {number:4d} | {lines[number - 1]}")
    text = "\n".join(rows)
    return text if len(text) <= CONTEXT_CHARS else text[: CONTEXT_CHARS - 4] + "\n..."


def clip_output(text: str, limit: int = OUTPUT_CHARS) -> str:
    """Keep the head and tail of long output."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n... [{len(text) - limit} characters cut] ...\n{text[-half:]}"


def printed_sections(output: str, labels: list[str]) -> str:
    """Drop the per-test headers the sandbox prints before tests that printed nothing."""
    headers = {f"--- {label} ---" for label in labels}
    kept: list[str] = []
    pending: str | None = None
    for line in output.split("\n"):
        if line in headers:
            pending = line
        elif line or pending is None:
            if pending is not None:
                kept.append(pending)
                pending = None
            kept.append(line)
    return "\n".join(kept).strip("\n")


def reindent(block: str, indent: str) -> list[str]:
    """Apply the indentation rule: a flush-left block is shifted to ``indent``."""
    lines = block.split("\n")
    if block.endswith("\n"):
        lines.pop()
    body = [line for line in lines if line.strip()]
    if not body or min(len(line) - len(line.lstrip()) for line in body) > 0:
        return lines
    return [indent + line if line.strip() else line for line in lines]


class TraceFixEnvironment(Environment[TraceFixAction, TraceFixObservation, TraceFixState]):
    """A debugging episode: fix the buggy program so that every test passes."""

    SUPPORTS_CONCURRENT_SESSIONS = True

    def __init__(
        self,
        registry: TaskRegistry | None = None,
        sandbox: SandboxBackend | None = None,
    ) -> None:
        super().__init__()
        self._registry = registry
        self._sandbox = sandbox
        self._rng = random.Random()
        self._handlers: dict[str, Callable[[TraceFixAction], float]] = {
            "VIEW_CODE": self._view_code,
            "RUN_TESTS": self._run_tests,
            "REPLACE_LINES": self._replace_lines,
            "UNDO_EDIT": self._undo_edit,
            "RESET_TO_ORIGINAL": self._reset_to_original,
            "SUBMIT": self._submit,
        }
        self._task: Task | None = None
        self._state = TraceFixState(max_steps=default_max_steps())
        self._evaluating = threading.Lock()  # at most one evaluation in flight per episode
        self._cancel = threading.Event()  # set by cancel(): stops the evaluation in flight
        self._closed = False
        self._parsed: tuple[str, tuple[int | None, str] | None] | None = None

    # -- public API ---------------------------------------------------------------------

    @property
    def registry(self) -> TaskRegistry:
        if self._registry is None:
            self._registry = get_registry()
        return self._registry

    @property
    def sandbox(self) -> SandboxBackend:
        if self._sandbox is None:
            self._sandbox = get_sandbox()
        return self._sandbox

    @property
    def state(self) -> TraceFixState:
        return self._state

    def reset(
        self,
        seed: int | None = None,
        episode_id: str | None = None,
        task_id: str | None = None,
        difficulty: str | None = None,
        task_name: str | None = None,
        max_steps: int | None = None,
        split: str | None = None,
        index: int | None = None,
        **kwargs: Any,
    ) -> TraceFixObservation:
        """Start an episode; the arguments are those of :class:`models.ResetArgs` (validated
        here, so every transport gets the same errors: a wrong type raises pydantic's
        ``ValidationError`` naming the field, an unknown task ``TaskSelectionError``).
        Unknown keyword arguments (e.g. dataset columns) are ignored.
        """
        args = ResetArgs(
            seed=seed, episode_id=episode_id, task_id=task_id, difficulty=difficulty,
            task_name=task_name, max_steps=max_steps, split=split, index=index,
        )  # fmt: skip
        steps = default_max_steps() if args.max_steps is None else args.max_steps
        task = self.registry.select(
            seed=args.seed, task_id=args.task_id or args.task_name, difficulty=args.difficulty,
            rng=self._rng, split=args.split, index=args.index,
        )  # fmt: skip
        self._task = task
        self._lines = task.buggy_code.rstrip("\n").split("\n")
        self._parsed = (self._code(), None)  # every task's buggy code parsed when it loaded
        self._history: list[str] = []  # earlier versions of the file, oldest first
        self._phi_measured = task.buggy_visible_passed / len(task.visible_tests)
        self._measured_code: str | None = None
        self._measured: tuple[Verdict, str] | None = None
        self._results: list[TestResult] = []
        self._tests_passed = 0
        self._output = (
            f"Task {task.task_id} ({task.difficulty}). Fix the code so that it satisfies the "
            f"description; {len(task.visible_tests)} visible tests, and hidden tests at SUBMIT."
        )
        self._error: str | None = None
        self._focus: tuple[int, int, int | None] | None = None
        self._score: float | None = None
        self._solved: bool | None = None
        self._truncated: bool | None = None
        self._state = TraceFixState(
            episode_id=args.episode_id if args.episode_id is not None else str(uuid.uuid4()),
            step_count=0,
            task_id=task.task_id,
            difficulty=task.difficulty,
            max_steps=steps,
            done=False,
        )
        self._reset_rubric()
        return self._observe(0.0)

    def step(
        self, action: TraceFixAction, timeout_s: float | None = None, **kwargs: Any
    ) -> TraceFixObservation:
        """Apply one action; invalid actions are reported, never raised.

        When the sandbox cannot evaluate (busy, a fault of its own, or the evaluation was
        cancelled) the step does not happen: nothing changes, it is not counted, its reward
        is 0, and ``last_action_error`` says why, so the agent can retry. If that happens to
        the final grading at ``max_steps``, the episode stays open and the next step retries
        the grading instead of applying its action.
        """
        if self._task is None:
            self._error = "no episode is running: call reset first"
            return self._observe(0.0, done=False)
        if self._state.done:
            self._error = "the episode is over: call reset to start a new one"
            return self._observe(-INVALID_ACTION_PENALTY)
        self._error = None
        if self._state.step_count >= self._state.max_steps:
            return self._retry_final_grading()
        reward = -STEP_COST
        try:
            reward += self._handlers[action.action_type](action)
        except ActionError as exc:
            self._error = str(exc)
            reward -= INVALID_ACTION_PENALTY
        except SandboxFailure as exc:
            self._error = f"{exc} (the step was not counted and changed nothing)"
            return self._observe(0.0)
        self._state.step_count += 1
        if not self._state.done and self._state.step_count >= self._state.max_steps:
            try:
                reward += self._finish(truncated=True)
            except SandboxFailure as exc:
                self._error = (
                    f"max_steps reached, but grading failed: {exc}; the episode stays open "
                    "and the next step retries the grading"
                )
        return self._observe(reward)

    def _retry_final_grading(self) -> TraceFixObservation:
        try:
            reward = self._finish(truncated=True)
        except SandboxFailure as exc:
            self._error = (
                f"max_steps reached, but grading failed again: {exc}; send any action to "
                "retry the grading"
            )
            return self._observe(0.0)
        return self._observe(reward)

    def cancel(self) -> None:
        """Cancel this episode's evaluation in flight, if any (thread-safe): a queued one is
        dropped, a running one is killed, and its step reports the cancellation."""
        self._cancel.set()

    def close(self) -> None:
        """Release the episode: the evaluation in flight is cancelled, later ones refused."""
        self._closed = True
        self.cancel()

    # -- OpenEnv's Task API (GET /tracefix_rl/splits, POST /tracefix_rl/tasks, ...) ---------

    def list_splits(self) -> list[dict[str, str]]:
        """The splits: ``train``, and ``eval`` (programs held out of training)."""
        return [{"name": "train", "type": "train"}, {"name": "eval", "type": "test"}]

    def list_tasks(self, split: str) -> list[dict[str, object]]:
        """Every task of ``split``; ``reset(split=..., index=...)`` plays the one at ``index``."""
        return self.registry.task_specs(split)

    def num_tasks(self, split: str) -> int:
        return len(self.registry.task_specs(split))

    def get_task(self, split: str, index: int) -> dict[str, object]:
        """The task at ``index`` of ``split``; ``IndexError`` (HTTP 400) outside it."""
        found = self.registry.task_specs(split, index, index + 1) if index >= 0 else []
        if not found:
            raise IndexError(f"no task {index} in split {split!r}")
        return found[0]

    def get_task_range(
        self, split: str, start: int | None, stop: int | None
    ) -> list[dict[str, object]]:
        return self.registry.task_specs(split, start, stop)

    def get_metadata(self) -> EnvironmentMetadata:
        try:
            version = metadata.version("tracefix-rl")
        except metadata.PackageNotFoundError:
            version = "0.0.0"
        return EnvironmentMetadata(
            name="tracefix_rl",
            description=(
                "A debugging gym: fix a buggy Python program by viewing it, running its "
                "visible tests and replacing lines; graded in a sandbox on hidden tests."
            ),
            version=version,
            author="tracefix_rl",
        )

    # -- action handlers (each returns its reward on top of the step cost) ---------------

    def _view_code(self, action: TraceFixAction) -> float:
        first, last = self._range(action, allow_default=True)
        self._focus = (first, last, None)
        self._output = f"Showing lines {first}-{last} of {len(self._lines)}."
        return 0.0

    def _run_tests(self, action: TraceFixAction) -> float:
        assert self._task is not None
        verdict, output = self._measure_visible()
        phi = verdict.passed / verdict.total
        shaping = VISIBLE_WEIGHT * (phi - self._phi_measured)
        self._phi_measured = phi
        self._results = self._visible_results(verdict)
        self._tests_passed = verdict.passed
        summary = [
            f"Ran {verdict.total} visible tests: {verdict.passed} passed, "
            f"{verdict.total - verdict.passed} failed."
        ]
        summary += [
            f"{'PASS' if r.passed else 'FAIL'} {r.test_name}"
            + (f": {r.error_message}" if r.error_message else "")
            for r in self._results
        ]
        printed = printed_sections(output, [t.name for t in self._task.visible_tests])
        if printed:
            summary += ["--- captured output ---", clip_output(printed)]
        self._output = "\n".join(summary)
        failing = next((t.line for t in verdict.tests if not t.passed and t.line), None)
        self._focus = None if failing is None else self._window_around(failing)
        return shaping

    def _replace_lines(self, action: TraceFixAction) -> float:
        if action.start_line is None or action.end_line is None:
            raise ActionError("REPLACE_LINES needs start_line and end_line")
        if action.new_code_block is None:
            raise ActionError("REPLACE_LINES needs new_code_block (empty string deletes lines)")
        count = len(self._lines)
        start, end = action.start_line, action.end_line
        if not 1 <= start <= count + 1:
            raise ActionError(f"start_line {start} is outside 1..{count + 1}")
        if not start - 1 <= end <= count:
            raise ActionError(
                f"end_line {end} must be between start_line - 1 ({start - 1}, insert) and {count}"
            )
        anchor = self._lines[start - 1] if start <= count else (self._lines[-1] if count else "")
        indent = anchor[: len(anchor) - len(anchor.lstrip())]
        block = reindent(action.new_code_block, indent) if action.new_code_block else []
        lines = self._lines[: start - 1] + block + self._lines[end:]
        if len(lines) > MAX_FILE_LINES or sum(len(x) + 1 for x in lines) > MAX_FILE_CHARS:
            raise ActionError(
                f"the edit would make the file larger than {MAX_FILE_LINES} lines or "
                f"{MAX_FILE_CHARS} characters"
            )
        self._push_history()
        self._lines = lines
        removed = end - start + 1
        self._output = (
            f"Replaced {removed} line(s) at {start} with {len(block)} line(s); "
            f"the file has {len(lines)} lines."
        )
        self._focus = self._window_around(min(start, max(1, len(lines))))
        return 0.0

    def _undo_edit(self, action: TraceFixAction) -> float:
        if not self._history:
            raise ActionError("nothing to undo")
        self._lines = self._history.pop().split("\n")[:-1]
        self._output = f"Undid the last edit; the file has {len(self._lines)} lines."
        self._focus = None
        return 0.0

    def _reset_to_original(self, action: TraceFixAction) -> float:
        assert self._task is not None
        original = self._task.buggy_code.rstrip("\n").split("\n")
        if self._lines == original:
            raise ActionError("the code is already the original; nothing to reset")
        self._push_history()
        self._lines = original
        self._output = "Restored the original code (UNDO_EDIT brings your version back)."
        self._focus = None
        return 0.0

    def _submit(self, action: TraceFixAction) -> float:
        return self._finish(truncated=False)

    # -- grading --------------------------------------------------------------------------

    def _finish(self, truncated: bool) -> float:
        """Grade the current code on every test, end the episode, return the final reward."""
        assert self._task is not None
        task = self._task
        verdict = self._grade_all()
        visible = len(task.visible_tests)
        visible_verdict = Verdict(verdict.tests[:visible], verdict.tampered, verdict.timed_out)
        total_tests = len(task.all_tests)
        score = 0.0 if verdict.tampered else verdict.passed / total_tests
        solved = verdict.all_passed and not verdict.tampered
        phi = visible_verdict.passed / visible
        reward = (
            VISIBLE_WEIGHT * (phi - self._phi_measured)
            + SCORE_WEIGHT * (score - task.buggy_all_passed / total_tests)
            + (SOLVE_BONUS if solved else 0.0)
        )
        self._phi_measured = phi
        self._results = self._visible_results(visible_verdict)
        self._tests_passed = visible_verdict.passed
        hidden_passed = verdict.passed - visible_verdict.passed
        how = "Reached max_steps; graded" if truncated else "Submitted"
        self._output = (
            f"{how}: {verdict.passed}/{total_tests} tests pass (visible "
            f"{visible_verdict.passed}/{visible}, hidden {hidden_passed}/"
            f"{len(task.hidden_tests)}). score={score:.3f} solved={str(solved).lower()}"
            + (" (result channel tampered with: score 0)" if verdict.tampered else "")
        )
        self._score, self._solved, self._truncated = score, solved, truncated
        self._state.done = True
        return reward

    def _evaluate(self, code: str, tests: tuple[TaskTest, ...], **kw: Any) -> EvalResult:
        """Run one sandbox evaluation for this episode (never two at once)."""
        if not self._evaluating.acquire(blocking=False):
            raise ActionError("an evaluation is already running for this episode")
        try:
            if self._closed:
                raise EvaluationCancelled("the environment was closed")
            self._cancel = threading.Event()
            return evaluate(self.sandbox, code, tests, cancel=self._cancel, **kw)
        finally:
            self._evaluating.release()

    def _grade_all(self) -> Verdict:
        assert self._task is not None
        code = self._code()
        if self._syntax_problem(code) is not None:
            return self._syntax_verdict(len(self._task.all_tests))
        for attempt in range(GRADING_ATTEMPTS):
            try:
                result = self._evaluate(code, self._task.all_tests)
                return judge(result, self._task.expected)
            except SandboxBusy:
                if attempt == GRADING_ATTEMPTS - 1:
                    raise
                log.warning("sandbox busy while grading; retrying")
        raise AssertionError("unreachable")

    def _measure_visible(self) -> tuple[Verdict, str]:
        """Visible-test verdict and captured output for the current code (cached per code)."""
        assert self._task is not None
        code = self._code()
        if self._measured is not None and self._measured_code == code:
            return self._measured
        task = self._task
        if (problem := self._syntax_problem(code)) is not None:
            verdict = self._syntax_verdict(len(task.visible_tests), problem)
            measured = (verdict, "")
        else:
            result = self._evaluate(
                code,
                task.visible_tests,
                labels=tuple(t.name for t in task.visible_tests),
            )
            measured = (judge(result, task.expected_visible), result.output)
        self._measured_code, self._measured = code, measured
        return measured

    def _syntax_verdict(self, count: int, problem: tuple[int | None, str] | None = None) -> Verdict:
        line, message = problem or self._syntax_problem(self._code()) or (None, "SyntaxError")
        return Verdict(tests=(TestVerdict(False, message, line),) * count)

    def _visible_results(self, verdict: Verdict) -> list[TestResult]:
        assert self._task is not None
        return [
            TestResult(test_name=test.name, passed=v.passed, error_message=v.detail)
            for test, v in zip(self._task.visible_tests, verdict.tests, strict=True)
        ]

    # -- helpers ----------------------------------------------------------------------------

    def _code(self) -> str:
        return "\n".join(self._lines) + "\n"

    def _syntax_problem(self, code: str) -> tuple[int | None, str] | None:
        """``syntax_error_of(code)``, remembered for the last code seen (every observation
        asks, and parsing a long program costs about a millisecond)."""
        if self._parsed is None or self._parsed[0] != code:
            self._parsed = (code, syntax_error_of(code))
        return self._parsed[1]

    def _push_history(self) -> None:
        self._history.append("".join(line + "\n" for line in self._lines))
        del self._history[:-UNDO_DEPTH]
        total = sum(map(sys.getsizeof, self._history))
        while total > UNDO_MAX_BYTES and len(self._history) > 1:
            total -= sys.getsizeof(self._history.pop(0))

    def _window_around(self, line: int) -> tuple[int, int, int | None]:
        return (line - CONTEXT_RADIUS, line + CONTEXT_RADIUS, line)

    def _range(self, action: TraceFixAction, allow_default: bool) -> tuple[int, int]:
        count = len(self._lines)
        start, end = action.start_line, action.end_line
        if start is None and end is None and allow_default:
            return 1, count
        if start is None:
            raise ActionError("end_line given without start_line")
        if not 1 <= start <= count:
            raise ActionError(f"start_line {start} is outside the file (1..{count})")
        if end is None:
            end = min(count, start + 2 * CONTEXT_RADIUS)
        if not 1 <= start <= end <= count:
            raise ActionError(f"line range {start}-{end} is outside the file (1..{count})")
        return start, end

    def _observe(self, reward: float, done: bool | None = None) -> TraceFixObservation:
        task = self._task
        if task is None:
            return TraceFixObservation(
                done=False, reward=0.0, last_action_error=self._error, reward_last_step=0.0
            )
        reward = round(reward, REWARD_DIGITS)
        problem = self._syntax_problem(self._code())
        first, last, focus = self._focus or (1, len(self._lines), None)
        if problem is not None and problem[0] is not None and self._focus is None:
            first, last, focus = self._window_around(problem[0])
        state = self._state
        return TraceFixObservation(
            done=state.done if done is None else done,
            reward=reward,
            task_id=task.task_id,
            difficulty=task.difficulty,
            description=task.description,
            episode_id=state.episode_id or "",
            code_dict={number: text for number, text in enumerate(self._lines, 1)},
            localized_context=render_window(self._lines, first, last, focus),
            last_execution_output=self._output,
            syntax_error=problem is not None,
            test_results=list(self._results),
            tests_passed=self._tests_passed,
            tests_total=len(task.visible_tests),
            step_count=state.step_count,
            steps_remaining=max(0, state.max_steps - state.step_count),
            reward_last_step=reward,
            last_action_error=self._error,
            score=self._score,
            solved=self._solved,
            truncated=self._truncated,
        )
