"""One episode: its task, the file being fixed, the reward's potential, and what the last
step showed. Actions change it; :meth:`Episode.observe` turns it into an observation."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence
from typing import Any

from tracefix_rl.episode import render
from tracefix_rl.episode.editor import Editor
from tracefix_rl.episode.grading import Grader
from tracefix_rl.episode.reward import REWARD_DIGITS, Shaping
from tracefix_rl.episode.trace import TraceData
from tracefix_rl.judge import TestVerdict, Verdict
from tracefix_rl.models import TestResult, TraceFixObservation, TraceFixState
from tracefix_rl.tasks import Task

_measured_baselines: dict[tuple[str, str], tuple[bool, ...]] = {}
_baselines_lock = threading.Lock()


def normalised_gain(before: Sequence[bool], after: Sequence[bool], solved: bool) -> float:
    """The episode's normalised gain over the buggy original, in [0, 1].

    ``before`` and ``after`` are per-test outcomes (visible, then hidden) of the buggy code
    and of the final code. 1 when ``solved``; else the originally failing tests now passing,
    minus the originally passing tests now failing, over the originally failing tests,
    clamped to [0, 1]: 0 for code no better than the buggy original."""
    if solved:
        return 1.0
    failing = [index for index, passed in enumerate(before) if not passed]
    if not failing:
        return 0.0
    fixed = sum(1 for index in failing if after[index])
    regressed = sum(1 for index, passed in enumerate(before) if passed and not after[index])
    return min(1.0, max(0.0, (fixed - regressed) / len(failing)))


def task_fingerprint(task: Task) -> str:
    """Identifies a task's buggy code, solution, tests and expected values: a saved episode
    continues only on the very task it started on."""
    payload = json.dumps([task.buggy_code, task.solution, [t.code for t in task.all_tests],
                          list(task.expected)], sort_keys=True)  # fmt: skip
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def verdict_data(verdict: Verdict) -> dict[str, Any]:
    return {"tests": [[t.passed, t.detail, t.line] for t in verdict.tests],
            "tampered": verdict.tampered, "timed_out": verdict.timed_out}  # fmt: skip


def verdict_of(data: dict[str, Any]) -> Verdict:
    tests = tuple(TestVerdict(bool(p), d, line) for p, d, line in data["tests"])
    return Verdict(tests, tampered=bool(data["tampered"]), timed_out=bool(data["timed_out"]))


class Episode:
    """Everything one episode holds, created whole by ``reset``.

    ``state`` is the wire :class:`TraceFixState`; ``editor`` the file; ``shaping`` the
    reward's potential. ``output``, ``error``, ``focus``, ``results`` and ``tests_passed``
    are what the last step showed; ``score``, ``gain``, ``solved`` and ``truncated`` are set
    by :meth:`finish`, which ends the episode.
    """

    def __init__(self, task: Task, state: TraceFixState, grader: Grader) -> None:
        self.task = task
        self.state = state
        self.editor = Editor(task.buggy_code)
        self.shaping = Shaping(
            phi_buggy=task.buggy_visible_passed / len(task.visible_tests),
            score_buggy=task.buggy_all_passed / len(task.all_tests),
        )
        self._grader = grader
        self._measured: tuple[str, Verdict, str] | None = None  # (code, verdict, output)
        self.output = render.intro(task)
        self.error: str | None = None
        self.focus: render.Focus | None = None
        self.results: list[TestResult] = []
        self.tests_passed = 0
        self.score: float | None = None
        self.gain: float | None = None
        self.solved: bool | None = None
        self.truncated: bool | None = None

    # -- saving and restoring (an HTTP episode kept in Redis moves between replicas) ------

    def snapshot(self) -> dict[str, Any]:
        """Everything that the next step and observation depend on, as JSON data: the state,
        the file and its undo history, the reward's potential, the last measured run, and
        what the last step showed. The task is named by id (and checked by fingerprint)."""
        measured = None
        if self._measured is not None:
            code, verdict, output = self._measured
            measured = {"code": code, "verdict": verdict_data(verdict), "output": output}
        return {
            "task_id": self.task.task_id,
            "task_fingerprint": task_fingerprint(self.task),
            "state": self.state.model_dump(),
            "editor": self.editor.snapshot(),
            "phi": self.shaping.phi,
            "measured": measured,
            "output": self.output,
            "error": self.error,
            "focus": list(self.focus) if self.focus is not None else None,
            "results": [result.model_dump() for result in self.results],
            "tests_passed": self.tests_passed,
            "score": self.score,
            "gain": self.gain,
            "solved": self.solved,
            "truncated": self.truncated,
        }

    @classmethod
    def restore(cls, task: Task, data: dict[str, Any], grader: Grader) -> Episode:
        """The episode :meth:`snapshot` saw, on ``task`` (which must be the same task: a
        ``ValueError`` says so when its fingerprint differs)."""
        if data["task_fingerprint"] != task_fingerprint(task):
            raise ValueError(
                f"task {task.task_id!r} differs from the one this episode was started on "
                "(replicas must serve the same tasks)"
            )
        episode = cls(task, TraceFixState.model_validate(data["state"]), grader)
        episode.editor = Editor.restore(task.buggy_code, data["editor"])
        episode.shaping.phi = float(data["phi"])
        measured = data["measured"]
        if measured is not None:
            episode._measured = (measured["code"], verdict_of(measured["verdict"]),
                                 measured["output"])  # fmt: skip
        episode.output = data["output"]
        episode.error = data["error"]
        focus = data["focus"]
        episode.focus = (focus[0], focus[1], focus[2]) if focus is not None else None
        episode.results = [TestResult.model_validate(r) for r in data["results"]]
        episode.tests_passed = data["tests_passed"]
        episode.score, episode.gain = data["score"], data["gain"]
        episode.solved, episode.truncated = data["solved"], data["truncated"]
        return episode

    # -- what the agent looks at -----------------------------------------------------------

    def show(self, first: int, last: int) -> None:
        """Show lines ``first..last`` next, unmarked."""
        self.focus = (first, last, None)

    def focus_on(self, line: int) -> None:
        """Show a window around ``line`` next, marked."""
        self.focus = render.window_around(line)

    def show_results(self, verdict: Verdict) -> None:
        """Report ``verdict`` on the visible tests (hidden tests are never shown)."""
        self.results = [
            TestResult(test_name=test.name, passed=v.passed, error_message=v.detail)
            for test, v in zip(self.task.visible_tests, verdict.tests, strict=True)
        ]
        self.tests_passed = verdict.passed

    # -- evaluation ----------------------------------------------------------------------------

    def measure_visible(self) -> tuple[Verdict, str]:
        """Visible-test verdict and captured output of the current code (remembered for the
        last code measured: re-running unchanged code does not reach the sandbox)."""
        code = self.editor.code
        if self._measured is None or self._measured[0] != code:
            verdict, output = self._grader.visible(self.task, code, self.editor.syntax_problem())
            self._measured = (code, verdict, output)
        return self._measured[1], self._measured[2]

    def trace_visible(
        self, index: int, spec: dict[str, Any]
    ) -> tuple[TestVerdict, str, TraceData | None, str]:
        """TRACE of visible test ``index`` on the current code (see ``Grader.trace``)."""
        return self._grader.trace(self.task, self.editor.code, index, spec)

    def finish(self, truncated: bool) -> float:
        """Grade the current code on every test, end the episode, return the final reward.

        A ``SandboxFailure`` propagates before anything changes, so the grading can be
        retried."""
        task = self.task
        verdict = self._grader.all(task, self.editor.code, self.editor.syntax_problem())
        visible = len(task.visible_tests)
        on_visible = Verdict(verdict.tests[:visible], verdict.tampered, verdict.timed_out)
        score = 0.0 if verdict.tampered else verdict.passed / len(task.all_tests)
        solved = verdict.all_passed and not verdict.tampered
        after = [t.passed and not verdict.tampered for t in verdict.tests]
        gain = normalised_gain(self.buggy_outcomes(), after, solved)
        reward = self.shaping.final(on_visible.passed / visible, score, solved)
        self.show_results(on_visible)
        self.output = render.final_report(
            task, verdict, on_visible.passed, score, solved, truncated
        )
        self.score, self.gain, self.solved, self.truncated = score, gain, solved, truncated
        self.state.done = True
        return reward

    def buggy_outcomes(self) -> tuple[bool, ...]:
        """Whether the buggy code passes each of ``all_tests``: the oracle check's record, or
        (for tasks loaded without it, e.g. generated ones) measured in the sandbox once per
        process and task. A ``SandboxFailure`` propagates, as in :meth:`finish`."""
        task = self.task
        if task.buggy_passing:
            return task.buggy_passing
        key = (task.task_id, task.buggy_code)
        with _baselines_lock:
            known = _measured_baselines.get(key)
        if known is None:
            verdict = self._grader.all(task, task.buggy_code, None)
            known = tuple(t.passed for t in verdict.tests)
            with _baselines_lock:
                _measured_baselines[key] = known
        return known

    # -- the observation -----------------------------------------------------------------------

    def observe(self, reward: float, done: bool | None = None) -> TraceFixObservation:
        """The observation after a step that earned ``reward``. The code window is the
        step's focus; without one, the line of a syntax error, else the whole file."""
        task, editor, state = self.task, self.editor, self.state
        reward = round(reward, REWARD_DIGITS)
        problem = editor.syntax_problem()
        first, last, mark = self.focus or (1, len(editor.lines), None)
        if problem is not None and problem[0] is not None and self.focus is None:
            first, last, mark = render.window_around(problem[0])
        return TraceFixObservation(
            done=state.done if done is None else done,
            reward=reward,
            task_id=task.task_id,
            difficulty=task.difficulty,
            description=task.description,
            episode_id=state.episode_id or "",
            code_dict={number: text for number, text in enumerate(editor.lines, 1)},
            localized_context=render.render_window(editor.lines, first, last, mark),
            last_execution_output=self.output,
            syntax_error=problem is not None,
            test_results=list(self.results),
            tests_passed=self.tests_passed,
            tests_total=len(task.visible_tests),
            step_count=state.step_count,
            steps_remaining=max(0, state.max_steps - state.step_count),
            reward_last_step=reward,
            last_action_error=self.error,
            score=self.score,
            gain=self.gain,
            solved=self.solved,
            truncated=self.truncated,
        )
