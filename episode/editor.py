"""The file an agent fixes: its lines, edits with the indentation rule, and undo.

Nothing here runs code; :func:`syntax_error_of` only parses it.
"""

from __future__ import annotations

import ast
import functools
import sys
import threading

from tracefix_rl.episode.errors import ActionError

MAX_FILE_LINES = 400
MAX_FILE_CHARS = 20_000
UNDO_DEPTH = 50
# Bytes of memory the undo history may hold (about ten ASCII files at the size cap): bounds
# an episode's memory, since a server keeps hundreds of them; the oldest levels go first.
UNDO_MAX_BYTES = 256 * 1024
SYNTAX_CACHE_SIZE = 512  # programs; at most ~10 MB of code at the 20,000-character cap

SyntaxProblem = tuple[int | None, str]
"""Where a program fails to parse (its line, if known) and the message an agent sees."""

# CPython 3.11's ast.parse is not safe to run in several threads at once: under load
# (256 HTTP episodes) it failed now and then with "SystemError: AST constructor recursion
# depth mismatch". Parsing takes at most about a millisecond, so one parse at a time.
_PARSE_LOCK = threading.Lock()


@functools.lru_cache(maxsize=SYNTAX_CACHE_SIZE)
def syntax_error_of(code: str) -> SyntaxProblem | None:
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


def reindent(block: str, indent: str) -> list[str]:
    """Apply the indentation rule: a flush-left block is shifted to ``indent``."""
    lines = block.split("\n")
    if block.endswith("\n"):
        lines.pop()
    body = [line for line in lines if line.strip()]
    if not body or min(len(line) - len(line.lstrip()) for line in body) > 0:
        return lines
    return [indent + line if line.strip() else line for line in lines]


class Editor:
    """The current file (a list of lines without their newlines), the original it started
    from, and the earlier versions an undo brings back.

    Every change is validated before anything is modified, so a rejected edit
    (:class:`ActionError`) leaves the file and its history as they were.
    """

    def __init__(self, original_code: str) -> None:
        self.original: tuple[str, ...] = tuple(original_code.rstrip("\n").split("\n"))
        self.lines: list[str] = list(self.original)
        self.history: list[str] = []  # earlier versions of the file, oldest first
        # Every task's buggy code was parsed when the task loaded, so it is known to parse.
        self._parsed: tuple[str, SyntaxProblem | None] = (self.code, None)

    def snapshot(self) -> dict[str, list[str]]:
        """The file and its undo history as JSON data (the original comes with the task)."""
        return {"lines": list(self.lines), "history": list(self.history)}

    @classmethod
    def restore(cls, original_code: str, data: dict[str, list[str]]) -> Editor:
        """The editor :meth:`snapshot` saw, on ``original_code``."""
        editor = cls(original_code)
        editor.lines = [str(line) for line in data["lines"]]
        editor.history = [str(version) for version in data["history"]]
        return editor

    @property
    def code(self) -> str:
        """The file as the sandbox runs it (newline-terminated)."""
        return "\n".join(self.lines) + "\n"

    def __len__(self) -> int:
        return len(self.lines)

    def syntax_problem(self) -> SyntaxProblem | None:
        """:func:`syntax_error_of` the current code, remembered for the last code seen
        (every observation asks, and parsing a long program costs about a millisecond)."""
        code = self.code
        if self._parsed[0] != code:
            self._parsed = (code, syntax_error_of(code))
        return self._parsed[1]

    def replace(self, start: int, end: int, block: str) -> int:
        """Replace lines ``start..end`` (1-indexed, inclusive) with ``block`` reindented by
        :func:`reindent` to the line at ``start``; ``end = start - 1`` inserts. Returns the
        number of lines written."""
        count = len(self.lines)
        if not 1 <= start <= count + 1:
            raise ActionError(f"start_line {start} is outside 1..{count + 1}")
        if not start - 1 <= end <= count:
            raise ActionError(
                f"end_line {end} must be between start_line - 1 ({start - 1}, insert) and {count}"
            )
        anchor = self.lines[start - 1] if start <= count else (self.lines[-1] if count else "")
        indent = anchor[: len(anchor) - len(anchor.lstrip())]
        written = reindent(block, indent) if block else []
        lines = self.lines[: start - 1] + written + self.lines[end:]
        if len(lines) > MAX_FILE_LINES or sum(len(x) + 1 for x in lines) > MAX_FILE_CHARS:
            raise ActionError(
                f"the edit would make the file larger than {MAX_FILE_LINES} lines or "
                f"{MAX_FILE_CHARS} characters"
            )
        self._remember()
        self.lines = lines
        return len(written)

    def undo(self) -> None:
        """Bring back the version before the last edit or reset."""
        if not self.history:
            raise ActionError("nothing to undo")
        self.lines = self.history.pop().split("\n")[:-1]

    def reset_to_original(self) -> None:
        """Restore the original code; the current version can be undone back to."""
        if tuple(self.lines) == self.original:
            raise ActionError("the code is already the original; nothing to reset")
        self._remember()
        self.lines = list(self.original)

    def _remember(self) -> None:
        """Push the current version; keep at most ``UNDO_DEPTH`` levels in ``UNDO_MAX_BYTES``
        (the newest level is always kept)."""
        self.history.append("".join(line + "\n" for line in self.lines))
        del self.history[:-UNDO_DEPTH]
        total = sum(map(sys.getsizeof, self.history))
        while total > UNDO_MAX_BYTES and len(self.history) > 1:
            total -= sys.getsizeof(self.history.pop(0))
