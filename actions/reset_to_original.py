"""RESET_TO_ORIGINAL: restore the buggy program the episode started with."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tracefix_rl.actions.base import Action

if TYPE_CHECKING:
    from tracefix_rl.actions.base import NoParams
    from tracefix_rl.episode.state import Episode


class ResetToOriginal(Action):
    name = "RESET_TO_ORIGINAL"
    order = 50
    description = (
        "Restore the original code the episode started with; UNDO_EDIT brings your version back."
    )

    def apply(self, episode: Episode, params: NoParams) -> float:
        episode.editor.reset_to_original()
        episode.output = "Restored the original code (UNDO_EDIT brings your version back)."
        episode.focus = None
        return 0.0
