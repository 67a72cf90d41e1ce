"""RUN_TESTS: run the visible tests on the current code."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tracefix_rl.actions.base import Action
from tracefix_rl.episode import render

if TYPE_CHECKING:
    from tracefix_rl.actions.base import NoParams
    from tracefix_rl.episode.state import Episode


class RunTests(Action):
    name = "RUN_TESTS"
    order = 20
    description = (
        "Run the visible tests on the current code and report each test's result, the "
        "output the code printed, and the line where a failing test raised. Pays the change "
        "in the visible pass fraction since the last run (re-running unchanged code earns "
        "nothing)."
    )

    def apply(self, episode: Episode, params: NoParams) -> float:
        verdict, output = episode.measure_visible()
        reward = episode.shaping.measured(verdict.passed / verdict.total)
        episode.show_results(verdict)
        episode.output = render.run_report(episode.task, verdict, output, episode.results)
        failing = next((t.line for t in verdict.tests if not t.passed and t.line), None)
        episode.focus = None if failing is None else render.window_around(failing)
        return reward
