"""The texts an agent sees: numbered code windows, test reports, clipped output, and a whole
observation as text (:func:`observation_text`, for agents that read text: MCP tools, the TRL
wrapper).

Pure functions of their arguments; :meth:`tracefix_rl.episode.state.Episode.observe` puts
them into the observation. Importing this module imports nothing else of the package, so
clients use it too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tracefix_rl.judge import Verdict
    from tracefix_rl.models import TestResult, TraceFixObservation
    from tracefix_rl.tasks import Task

FOCUS_MARK = ">>"
CONTEXT_RADIUS = 6  # lines shown on each side of a focus line
CONTEXT_CHARS = 4000  # at most this much of the file in ``localized_context``
OUTPUT_CHARS = 2000  # at most this much captured output in ``last_execution_output``

Focus = tuple[int, int, int | None]
"""Lines ``first..last`` (1-indexed, clipped to the file) and the line to mark, if any."""


def window_around(line: int) -> Focus:
    """``CONTEXT_RADIUS`` lines on each side of ``line``, which is marked."""
    return (line - CONTEXT_RADIUS, line + CONTEXT_RADIUS, line)


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


def intro(task: Task) -> str:
    return (
        f"Task {task.task_id} ({task.difficulty}). Fix the code so that it satisfies the "
        f"description; {len(task.visible_tests)} visible tests, and hidden tests at SUBMIT."
    )


def run_report(task: Task, verdict: Verdict, output: str, results: list[TestResult]) -> str:
    """RUN_TESTS' report: the counts, one line per visible test, then what they printed."""
    summary = [
        f"Ran {verdict.total} visible tests: {verdict.passed} passed, "
        f"{verdict.total - verdict.passed} failed."
    ]
    summary += [
        f"{'PASS' if r.passed else 'FAIL'} {r.test_name}"
        + (f": {r.error_message}" if r.error_message else "")
        for r in results
    ]
    printed = printed_sections(output, [t.name for t in task.visible_tests])
    if printed:
        summary += ["--- captured output ---", clip_output(printed)]
    return "\n".join(summary)


def final_report(
    task: Task, verdict: Verdict, visible_passed: int, score: float, solved: bool, truncated: bool
) -> str:
    """The last step's report: counts over visible and hidden tests, the score."""
    total = len(task.all_tests)
    how = "Reached max_steps; graded" if truncated else "Submitted"
    return (
        f"{how}: {verdict.passed}/{total} tests pass (visible "
        f"{visible_passed}/{len(task.visible_tests)}, hidden {verdict.passed - visible_passed}/"
        f"{len(task.hidden_tests)}). score={score:.3f} solved={str(solved).lower()}"
        + (" (result channel tampered with: score 0)" if verdict.tampered else "")
    )


def observation_text(obs: TraceFixObservation, started: bool = False) -> str:
    """The observation as text an agent reads: everything the observation says but the full
    file (``code_dict``, in the structured content), whose window is shown instead."""
    parts = []
    if started:
        parts.append(f"Episode {obs.episode_id}: task {obs.task_id} ({obs.difficulty}).\n"
                     f"Description:\n{obs.description.strip()}")  # fmt: skip
    if obs.last_action_error:
        parts.append(f"Error: {obs.last_action_error}")
    if obs.last_execution_output:
        parts.append(obs.last_execution_output)
    if obs.localized_context:
        window = obs.localized_context
        marked = any(line.startswith(FOCUS_MARK) for line in window.split("\n"))
        about = [f"the file has {len(obs.code_dict)} lines"]
        if marked:
            about.append(f"{FOCUS_MARK} marks the focus line")
        if obs.syntax_error:
            about.append("it does not parse (syntax error)")
        parts.append(f"Code ({'; '.join(about)}):\n{window}")
    if obs.test_results:
        tests = f"visible tests passing: {obs.tests_passed}/{obs.tests_total} (last run)"
    else:
        tests = f"visible tests: {obs.tests_total}, not run yet"
    status = [
        f"Step {obs.step_count}, {obs.steps_remaining} left",
        tests,
        f"reward {obs.reward if obs.reward is not None else 0.0:g}",
        f"done: {str(obs.done).lower()}",
    ]
    if obs.done:
        score = f"{obs.score:.3f}" if obs.score is not None else "none"
        status.append(f"score {score}, solved: {str(bool(obs.solved)).lower()}")
    parts.append(". ".join(status) + ".")
    return "\n\n".join(parts)
