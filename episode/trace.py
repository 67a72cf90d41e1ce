"""TRACE's report: the sandbox child's trace record, read as untrusted data and rendered.

The child (``sandbox.harness._trace_run``) writes one ``{"trace": {...}}`` record. Agent
code runs in that process and can write records too, so here the record is only data: it
is validated against :class:`TraceData` (bounded sizes; anything else is "unavailable"),
never affects a verdict, and the rendered report is cut at :data:`REPORT_CHARS`.
Rendering is deterministic: the same record gives the same bytes (memory addresses in
reprs are masked, since they differ between processes).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

REPORT_CHARS = 3000  # the whole report, truncation marker included
MAX_CYCLE = 12  # longest repeated run of lines folded into "[a b c]×n"
# The child's bounds, sent with each TRACE request (spec()):
PATH_EVENTS = 2000  # line events kept in order (all are counted)
MAX_HITS = 3  # snapshots per requested line
MAX_VARS = 16  # names per frame
VALUE_CHARS = 80  # characters of a repr (and of any name or value shown)
MAX_SNAPSHOTS = 60  # what a record may hold: lines x hits, with room to spare
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
TRUNCATED = "\n... [report truncated at {chars} characters]"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class Snapshot(_Strict):
    """Locals (and watch values) of one frame at one line; reprs, already cut."""

    line: int = Field(ge=1, le=10**6)
    hit: int | None = Field(default=None, ge=1, le=1000)
    locals: dict[str, str] = Field(default_factory=dict, max_length=MAX_VARS + 1)
    watch: dict[str, str] = Field(default_factory=dict, max_length=64)
    value: str | None = None  # a return's value
    name: str | None = None  # the function that returned


class TraceData(_Strict):
    """One trace record, as the child wrote it (see ``sandbox.harness._trace_run``)."""

    end: Literal["value", "exception", "timeout"]
    error: str | None = None
    path: list[int] = Field(max_length=PATH_EVENTS)
    events: int = Field(ge=0)
    lines_stopped: bool = False
    snaps: list[Snapshot] = Field(max_length=MAX_SNAPSHOTS)
    exc: Snapshot | None = None
    ret: Snapshot | None = None


def spec(lines: list[int], watch: list[str]) -> dict[str, Any]:
    """The ``trace`` of an ``EvalRequest``: what to snapshot and the child's bounds."""
    return {"lines": lines, "watch": watch, "max_events": PATH_EVENTS, "max_hits": MAX_HITS,
            "max_vars": MAX_VARS, "repr_chars": VALUE_CHARS}  # fmt: skip


def trace_of(records: list[dict[str, Any]]) -> tuple[TraceData | None, str]:
    """The trace among ``records`` and, when there is none usable, why."""
    found = [record["trace"] for record in records if "trace" in record]
    if not found:
        return None, "no trace: the run ended before the traced re-run finished"
    if len(found) > 1:
        return None, "no trace: the program wrote records of its own to the result channel"
    try:
        return TraceData.model_validate(found[0]), ""
    except ValidationError:
        return None, "no trace: the trace record was malformed"


def fold_path(lines: list[int]) -> str:
    """Line numbers in order, each run of a repeated block of up to :data:`MAX_CYCLE`
    lines written once with its count: ``3 [4 5 6]×12 7``."""
    out: list[str] = []
    i, count = 0, len(lines)
    while i < count:
        best_len, best_reps = 1, 1
        for length in range(1, min(MAX_CYCLE, (count - i) // 2) + 1):
            block = lines[i : i + length]
            reps = 1
            while lines[i + reps * length : i + (reps + 1) * length] == block:
                reps += 1
            if reps > 1 and length * reps > best_len * best_reps:
                best_len, best_reps = length, reps
        block = lines[i : i + best_len]
        if best_reps == 1:
            out.append(str(lines[i]))
        elif best_len == 1:
            out.append(f"{block[0]}×{best_reps}")
        else:
            out.append(f"[{' '.join(map(str, block))}]×{best_reps}")
        i += best_len * best_reps
    return " ".join(out)


def _shown(text: str) -> str:
    text = _ADDRESS.sub(" at 0x…", text)
    return text if len(text) <= VALUE_CHARS else text[: VALUE_CHARS - 3] + "..."


def _names(values: dict[str, str], joiner: str = "=") -> str:
    return ", ".join(f"{_shown(k)}{joiner}{_shown(v)}" for k, v in values.items()) or "(none)"


def _frame(snap: Snapshot) -> str:
    text = f"locals: {_names(snap.locals)}"
    if snap.watch:
        text += f"; watch: {_names(snap.watch, ' = ')}"
    return text


def render_report(heading: str, result: str, data: TraceData | None, missing: str,
                  passed: bool, printed: str = "") -> str:  # fmt: skip
    """The report: the test and its result (as RUN_TESTS shows it), the executed path, the
    frame where it went wrong (or returned), the requested snapshots, and what the untraced
    run printed; at most :data:`REPORT_CHARS` characters in all."""
    parts = [heading, f"Result: {result}"]
    if data is None:
        parts.append(missing)
    else:
        if data.end == "timeout":
            parts.append("The traced run timed out: the trace below is partial.")
        shown = fold_path(data.path)
        more = data.events - len(data.path)
        if data.lines_stopped:
            counted = f"the first {data.events} line events; lines were not traced after them"
        else:
            counted = f"{data.events} line events"
            if more > 0:
                shown += f" ... ({more} more line events not shown)"
        parts.append(f"Executed lines ({counted}): {shown or '(none)'}")
        error = _shown(data.error or "an exception")
        if data.end == "exception" and data.exc is not None:
            parts.append(f"Raised {error} at line {data.exc.line}; {_frame(data.exc)}")
        elif data.end == "exception":
            parts.append(f"Raised {error} where tracing was off (a RecursionError switches it "
                         "off), so its frame is unknown; Result names the line.")  # fmt: skip
        elif data.ret is not None and (not passed or data.end == "value"):
            ret = data.ret
            parts.append(f"{_shown(ret.name or 'the function')} returned {_shown(ret.value or '')}"
                         f" at line {ret.line}; {_frame(ret)}")  # fmt: skip
        for snap in data.snaps:
            parts.append(f"Line {snap.line}, hit {snap.hit} (before it runs): {_frame(snap)}")
    if printed:
        parts += ["--- captured output (the untraced run) ---", printed]
    report = "\n".join(parts)
    if len(report) > REPORT_CHARS:
        marker = TRUNCATED.format(chars=REPORT_CHARS)
        report = report[: REPORT_CHARS - len(marker)] + marker
    return report
