"""Reading an action out of a model's reply, leniently but never guessing an action from prose."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import tokenize
from collections.abc import Iterator
from typing import Any

from pydantic import ValidationError

from tracefix_rl.agent.output import clip, one_line
from tracefix_rl.models import TraceFixAction

# -- parsing the model's reply ------------------------------------------------------------------


class ParseError(ValueError):
    """The model's reply holds no valid action; the message says what could not be read."""


_FIELDS = set(TraceFixAction.model_fields) - {"metadata"}
_LENIENT_JSON = json.JSONDecoder(strict=False)  # literal newlines and tabs inside strings
QUOTED_CHARS = 120  # how much of an unreadable reply an error quotes
LINE_FIELDS = ("start_line", "end_line")


def parse_action(text: str | None) -> TraceFixAction:
    """The first object in ``text`` that names an ``action_type``, as a valid action.

    Accepted forms: JSON (code fences and prose around it allowed, literal newlines inside
    strings allowed), a Python dict literal (single quotes, ``True``/``None``, trailing
    commas), and a JSON object whose closing braces alone were cut off. A bare action name in
    prose is never taken for an action. ``ParseError`` says what could not be read."""
    if not text or not text.strip():
        raise ParseError("empty reply")
    problem: str | None = None
    for value, why in _objects(text):
        if isinstance(value, dict) and "action_type" in value:
            return action_from_dict(value)
        problem = problem or why
    if problem:
        raise ParseError(problem)
    if any(isinstance(v, dict) for v, _ in _objects(text)):
        raise ParseError(f"JSON object without action_type in reply: {_quote(text)}")
    raise ParseError(f"no JSON action in reply: {_quote(text)}")


def parse_arguments(raw: str) -> TraceFixAction:
    """A tool call's ``arguments`` as an action, read as leniently as :func:`parse_action`."""
    if not raw.strip():
        raise ParseError("empty tool-call arguments")
    try:
        value = _LENIENT_JSON.decode(raw)
    except ValueError:
        return parse_action(raw)
    if not isinstance(value, dict):
        raise ParseError(f"tool-call arguments are not an object: {_quote(raw)}")
    return action_from_dict(value)


def action_from_dict(data: dict[str, Any]) -> TraceFixAction:
    """A valid action from a model's JSON object. Models often write line numbers as strings
    (``"5"``), which the server's strict JSON-integer fields refuse, so they are converted."""
    kept = {k: v for k, v in data.items() if k in _FIELDS}
    if isinstance(kept.get("action_type"), str):
        kept["action_type"] = kept["action_type"].strip().upper()
    for name in LINE_FIELDS:
        value = kept.get(name)
        if isinstance(value, str) and value.strip().isdigit():
            kept[name] = int(value.strip())
    try:
        return TraceFixAction(**kept)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ParseError(f"invalid action ({where}: {first['msg']})") from None


def _quote(text: str) -> str:
    return clip(one_line(text), QUOTED_CHARS)


def _objects(text: str) -> Iterator[tuple[Any, str | None]]:
    """For every ``{`` in ``text`` (outermost first): the value read from there, or None and
    why it could not be read (None, None when there is nothing worth reporting)."""
    for start, char in enumerate(text):
        if char == "{":
            yield _read_object(text, start)


def _read_object(text: str, start: int) -> tuple[Any, str | None]:
    """The object at ``text[start]`` as JSON, else as a Python literal, else as JSON whose
    closing braces were cut off; or None and why not (only where ``action_type`` follows)."""
    try:
        return _LENIENT_JSON.raw_decode(text, start)[0], None
    except json.JSONDecodeError as exc:
        json_error = exc
    end = _python_extent(text, start)
    if end is not None:
        with contextlib.suppress(ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return ast.literal_eval(text[start:end]), None
    elif (closed := _close_braces(text[start:])) is not None:
        return closed, None
    if "action_type" not in text[start:]:
        return None, None
    if end is None:
        return None, "the reply ends inside its JSON action (no closing brace: cut off?)"
    where = f"line {json_error.lineno} column {json_error.colno}"
    return None, f"unreadable JSON action ({json_error.msg} at {where} of the reply)"


def _python_extent(text: str, start: int) -> int | None:
    """The index just past the brace that closes ``text[start]``, read as Python tokens
    (strings in either quote style, triple-quoted too); None when the text ends first."""
    source = text[start:]
    offsets = [0]  # where each line starts, split as the tokenizer reads them (at "\n")
    for line in io.StringIO(source).readlines():
        offsets.append(offsets[-1] + len(line))
    depth = 0
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.OP and token.string in "([{":
                depth += 1
            elif token.type == tokenize.OP and token.string in ")]}":
                depth -= 1
                if depth == 0:
                    row, col = token.end
                    return start + offsets[row - 1] + col
    except (tokenize.TokenError, SyntaxError):
        return None
    return None


def _close_braces(fragment: str) -> Any:
    """A JSON object that is complete but for its final closing braces (a cut-off reply),
    or None. Only whole values count: a string or number that was cut is never completed."""
    body = fragment.rstrip().rstrip(",")
    if not body or body[-1] not in '"]}el':  # a complete string, list, object, literal
        return None
    for missing in range(1, 4):
        try:
            value = _LENIENT_JSON.decode(body + "}" * missing)
        except ValueError:
            continue
        return value if isinstance(value, dict) else None
    return None
