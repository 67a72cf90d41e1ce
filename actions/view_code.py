"""VIEW_CODE: show the file, or a range of its lines."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from tracefix_rl.actions.base import Action, ActionParams
from tracefix_rl.episode.errors import ActionError
from tracefix_rl.episode.render import CONTEXT_RADIUS

if TYPE_CHECKING:
    from tracefix_rl.episode.state import Episode

DEFAULT_SPAN = 2 * CONTEXT_RADIUS  # lines after start_line shown when end_line is omitted


class ViewParams(ActionParams):
    start_line: int | None = Field(
        default=None, description="First line to show (1-indexed); omit both to see all."
    )
    end_line: int | None = Field(
        default=None,
        description=f"Last line to show (inclusive); default start_line + {DEFAULT_SPAN}.",
    )


class ViewCode(Action):
    name = "VIEW_CODE"
    order = 10
    description = (
        "Show the current code with line numbers: the whole file, or lines "
        f"start_line..end_line (start_line alone shows {DEFAULT_SPAN + 1} lines from it)."
    )
    Params = ViewParams
    examples = ({}, {"start_line": 3, "end_line": 9})

    def apply(self, episode: Episode, params: ViewParams) -> float:
        count = len(episode.editor)
        start, end = params.start_line, params.end_line
        if start is None and end is None:
            start, end = 1, count
        elif start is None:
            raise ActionError("end_line given without start_line")
        else:
            if not 1 <= start <= count:
                raise ActionError(f"start_line {start} is outside the file (1..{count})")
            if end is None:
                end = min(count, start + DEFAULT_SPAN)
            if not start <= end <= count:
                raise ActionError(f"line range {start}-{end} is outside the file (1..{count})")
        episode.show(start, end)
        episode.output = f"Showing lines {start}-{end} of {count}."
        return 0.0
