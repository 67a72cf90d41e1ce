"""What the agent prints: logs to stderr, and the ``[START]``/``[STEP]``/``[END]`` lines to
stdout."""

from __future__ import annotations

import sys


def log(message: str) -> None:
    """One line of progress on stderr (stdout is the transcript)."""
    print(message, file=sys.stderr, flush=True)


def emit(line: str) -> None:
    """One transcript line on stdout, flushed."""
    print(line, flush=True)


def two_decimals(value: float) -> str:
    """``f"{value:.2f}"`` without a negative zero (-0.004 prints as 0.00)."""
    text = f"{value:.2f}"
    return "0.00" if text == "-0.00" else text


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines too) made one space."""
    return " ".join(str(text).split())


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, marked with "…" when cut."""
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"
