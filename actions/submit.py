"""SUBMIT: grade the code on every test and end the episode."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tracefix_rl.actions.base import Action

if TYPE_CHECKING:
    from tracefix_rl.actions.base import NoParams
    from tracefix_rl.episode.state import Episode


class Submit(Action):
    name = "SUBMIT"
    order = 60
    description = (
        "Grade the current code on the visible and hidden tests and end the episode (it "
        "also ends, graded the same way, when max_steps is reached). The hidden tests check "
        "every input the description allows, not only the visible examples."
    )

    def apply(self, episode: Episode, params: NoParams) -> float:
        return episode.finish(truncated=False)
