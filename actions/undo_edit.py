"""UNDO_EDIT: bring back the version before the last edit."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tracefix_rl.actions.base import Action
from tracefix_rl.episode.editor import UNDO_DEPTH, UNDO_MAX_BYTES

if TYPE_CHECKING:
    from tracefix_rl.actions.base import NoParams
    from tracefix_rl.episode.state import Episode


class UndoEdit(Action):
    name = "UNDO_EDIT"
    order = 40
    description = (
        "Revert the last REPLACE_LINES or RESET_TO_ORIGINAL. Up to the last "
        f"{UNDO_DEPTH} versions are kept, within {UNDO_MAX_BYTES // 1024} KiB (the oldest "
        "go first)."
    )

    def apply(self, episode: Episode, params: NoParams) -> float:
        episode.editor.undo()
        episode.output = f"Undid the last edit; the file has {len(episode.editor)} lines."
        episode.focus = None
        return 0.0
