"""REPLACE_LINES: replace, delete or insert lines, with the indentation rule."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from tracefix_rl.actions.base import Action, ActionParams
from tracefix_rl.episode.editor import MAX_FILE_CHARS, MAX_FILE_LINES

if TYPE_CHECKING:
    from tracefix_rl.episode.state import Episode


class ReplaceParams(ActionParams):
    start_line: int = Field(description="First line to replace (1-indexed).")
    end_line: int = Field(
        description="Last line to replace (inclusive); start_line - 1 inserts before start_line."
    )
    new_code_block: str = Field(description="The new lines; an empty string deletes the lines.")


class ReplaceLines(Action):
    name = "REPLACE_LINES"
    order = 30
    description = (
        "Replace lines start_line..end_line (1-indexed, inclusive) with new_code_block: an "
        "empty block deletes them, a longer block grows the file, and end_line = start_line "
        "- 1 inserts before start_line (start_line = number of lines + 1 appends). "
        "Indentation: if the block's least-indented non-blank line starts at column 0, the "
        "whole block is indented like the line at start_line; otherwise it is inserted "
        f"exactly as written. The file may hold at most {MAX_FILE_LINES} lines and "
        f"{MAX_FILE_CHARS:,} characters."
    )
    Params = ReplaceParams
    examples = ({"start_line": 5, "end_line": 6, "new_code_block": "..."},)

    def apply(self, episode: Episode, params: ReplaceParams) -> float:
        start, end = params.start_line, params.end_line
        written = episode.editor.replace(start, end, params.new_code_block)
        count = len(episode.editor)
        episode.output = (
            f"Replaced {end - start + 1} line(s) at {start} with {written} line(s); "
            f"the file has {count} lines."
        )
        episode.focus_on(min(start, max(1, count)))
        return 0.0
