"""The evaluation harness that runs inside the sandboxed child (standard library only).

For every test, the code is executed into a fresh module namespace, then the test snippet;
the value of the snippet's last expression is encoded with :func:`canonical` (or the name of
the exception raised) and written as one JSON line ``{"i": index, "v": value}`` /
``{"i": index, "e": "TypeName", "m": message, "ln": line}`` to the result pipe. Nothing here
decides pass or fail: the judge in the server compares the records with expected values that
never enter this process.

A test whose entry in ``"as_list"`` is true has an iterator value (a generator, ``map``,
any object whose type has ``__next__``) observed as the list of what it yields
(:func:`_materialize`, inside the test's time limit).

A request with ``"trace"`` (TRACE: one test) then runs that test once more under
``sys.settrace`` and writes one ``{"trace": {...}}`` record of what it saw
(:func:`_trace_run`); the server reads it as untrusted data, apart from the verdict.
"""

from __future__ import annotations

import ast
import builtins
import itertools
import json
import os
import signal
import struct
import sys
from typing import Any

# Framing between the pool and its zygotes: a 4-byte big-endian length, then JSON.
FRAME_HEADER = struct.Struct(">I")
# First line of the result channel, written once every layer is in place and before any
# agent code runs: a child that dies before it was killed by something other than the
# agent's code (the worker tells such sandbox faults apart from the agent's failures).
STARTED_LINE = b'{"started":1}\n'
# Last line of the result channel. Agent code can write it early, which only cuts off its
# own remaining records (missing records fail).
DONE_LINE = b'{"done":1}\n'

# References captured before any agent code runs (monkeypatching json/os later changes nothing).
_dumps = json.dumps
_write = os.write
_list = list
_islice = itertools.islice

# ---------------------------------------------------------------------------
# Canonical encoding (runs in the child; the judge compares these structures)
# ---------------------------------------------------------------------------

CANON_MAX_DEPTH = 50
CANON_MAX_NODES = 100_000
_FLOAT_SPECIALS = {"nan", "inf", "-inf"}


class _Unserializable(Exception):
    """Raised while encoding a value that is not exact builtin data."""


def canonical(value: Any) -> Any:
    """Encode ``value`` as type-tagged JSON data, accepting exact builtin types only.

    ``None``, ``bool``, ``int``, ``str`` and finite ``float`` map to JSON scalars
    (JSON keeps ``1``, ``1.0`` and ``true`` apart); lists map to lists; other
    containers and special floats become ``{"t": tag, "v": ...}``. Sets and dict items
    are sorted by their encoded form, so equal values encode identically. Subclasses of
    builtins and every other object encode as ``{"t": "unserializable", "v": type name}``,
    which never equals an expected value.
    """
    budget = [CANON_MAX_NODES]
    try:
        return _canon(value, 0, budget)
    except _Unserializable as exc:
        return {"t": "unserializable", "v": str(exc)}
    except RecursionError:
        return {"t": "unserializable", "v": "too deep"}


def _canon(x: Any, depth: int, budget: list[int]) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise _Unserializable("too large")
    if depth > CANON_MAX_DEPTH:
        raise _Unserializable("too deep")
    t = type(x)
    if x is None or t is bool or t is int or t is str:
        return x
    if t is float:
        if x != x:
            return {"t": "float", "v": "nan"}
        if x in (float("inf"), float("-inf")):
            return {"t": "float", "v": "inf" if x > 0 else "-inf"}
        return x
    if t is list:
        return [_canon(item, depth + 1, budget) for item in x]
    if t is tuple:
        return {"t": "tuple", "v": [_canon(item, depth + 1, budget) for item in x]}
    if t is set or t is frozenset:
        items = [_canon(item, depth + 1, budget) for item in x]
        items.sort(key=_sort_key)
        return {"t": t.__name__, "v": items}
    if t is dict:
        pairs = [[_canon(k, depth + 1, budget), _canon(v, depth + 1, budget)] for k, v in x.items()]
        pairs.sort(key=lambda kv: _sort_key(kv[0]))
        return {"t": "dict", "v": pairs}
    if t is bytes:
        return {"t": "bytes", "v": x.hex()}
    raise _Unserializable(t.__name__)


_DATA_TYPES = frozenset(
    {type(None), bool, int, float, str, bytes, list, tuple, set, frozenset, dict}
)


def _materialize(value: Any) -> Any:
    """An iterator as the list of what it yields (at most ``CANON_MAX_NODES + 1`` items,
    which :func:`canonical` already calls too large); any other value unchanged. Runs the
    iterator's code, so it is called inside the test's time limit."""
    if type(value) in _DATA_TYPES or not hasattr(type(value), "__next__"):
        return value
    return _list(_islice(value, CANON_MAX_NODES + 1))


def _sort_key(encoded: Any) -> str:
    return json.dumps(encoded, sort_keys=True, separators=(",", ":"))


# ---------------------------------------------------------------------------
# The child harness (runs in the sandboxed process; trusts nothing after exec)
# ---------------------------------------------------------------------------

SOLUTION_FILENAME = "<solution>"
TEST_FILENAME = "<test>"
MESSAGE_CHARS = 300


class TestTimeout(BaseException):
    """Raised in the child when one test exceeds its time budget."""


def _compile_test(source: str) -> tuple[Any, Any]:
    """Split a snippet into (statements, final expression or None) code objects."""
    tree = ast.parse(source, TEST_FILENAME, "exec")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    body = compile(tree, TEST_FILENAME, "exec")
    expr = compile(last, TEST_FILENAME, "eval") if last is not None else None
    return body, expr


def _solution_line(tb: Any) -> int | None:
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == SOLUTION_FILENAME:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


_WARM_UP_REQUEST = (
    '{"code": "def f(xs):\\n    return [x * 2 for x in xs]\\n", "tests": ["f([1, (2, 3)])"],'
    ' "labels": ["f"], "limits": {"per_test_s": 1.0}}'
)


def warm_up() -> None:
    """Do, on constant data, what an evaluation does (decode a request, compile and run code
    and a test, encode the value), so that the memory pages this touches are copied from the
    worker before the request arrives rather than while the caller waits (copy-on-write
    faults were a large share of a child's time). Writes nothing anywhere."""
    request = json.loads(_WARM_UP_REQUEST)
    namespace: dict[str, Any] = {"__name__": "solution", "__builtins__": builtins}
    exec(compile(request["code"], SOLUTION_FILENAME, "exec"), namespace)
    body, expr = _compile_test(request["tests"][0])
    exec(body, namespace)
    value = canonical(eval(expr, namespace))
    _dumps({"i": 0, "v": value}, separators=(",", ":")).encode()


# ---------------------------------------------------------------------------
# Tracing (TRACE): one test re-run under sys.settrace; observations only
# ---------------------------------------------------------------------------


class _Discard:
    """A stdout/stderr that drops what the traced re-run prints (the first run's output is
    the one shown)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def _short_repr(value: Any, limit: int) -> str:
    try:
        text = repr(value)
    except BaseException as exc:  # noqa: BLE001 - a repr that fails is shown as such
        text = f"<repr failed: {type(exc).__name__}>"
    if not isinstance(text, str):
        text = "<repr failed: not a str>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _frame_locals(frame: Any, max_vars: int, repr_chars: int) -> dict[str, str]:
    names: dict[str, str] = {}
    try:
        items = list(frame.f_locals.items())
    except BaseException:  # noqa: BLE001
        return names
    for name, value in items:
        if not isinstance(name, str) or name.startswith("__"):
            continue
        if len(names) == max_vars:
            names["..."] = f"{len(items) - max_vars} more"
            break
        names[name] = _short_repr(value, repr_chars)
    return names


def _trace_run(namespace: dict[str, Any], body: Any, expr: Any, spec: dict[str, Any]) -> dict:
    """Run a compiled test (``body``, then ``expr``) under ``sys.settrace`` in ``namespace``
    and return what was seen in the agent's code (``<solution>`` frames only):

    * ``path``: the first ``spec["max_events"]`` executed line numbers and ``events`` their
      count; once the path is full (and every requested line has its snapshots), line
      events are switched off (``lines_stopped``: the count stops too), which keeps a long
      loop's trace about as cheap as its untraced run;
    * ``snaps``: at each line of ``spec["lines"]`` (before it runs; the first
      ``spec["max_hits"]`` times), its frame's locals and ``spec["watch"]`` evaluated there;
    * ``exc``: the line, locals and watches of the frame where the exception that ended
      the test was raised (none if tracing was off there: a RecursionError switches it
      off); ``ret``: those of the last return to the test, and its value;
    * ``end``: ``"value"``, ``"exception"`` (with ``error``) or ``"timeout"``.
    Every value is a repr of at most ``spec["repr_chars"]`` characters, of at most
    ``spec["max_vars"]`` names per frame (the bounds come with the request)."""
    max_events, max_hits = int(spec["max_events"]), int(spec["max_hits"])
    max_vars, repr_chars = int(spec["max_vars"]), int(spec["repr_chars"])
    wanted = set(spec.get("lines") or ())
    watches = []
    for text in spec.get("watch") or ():
        try:
            watches.append((text, compile(text, "<watch>", "eval")))
        except BaseException as exc:  # noqa: BLE001 - checked by the server already
            watches.append((text, exc))
    path: list[int] = []
    hits: dict[int, int] = {}
    snaps: list[dict[str, Any]] = []
    seen: dict[str, Any] = {"events": 0, "exc": None, "exc_obj": None, "ret": None,
                            "stopped": False}  # fmt: skip

    def lines_done() -> bool:
        return len(path) >= max_events and all(hits.get(n, 0) >= max_hits for n in wanted)

    def snapshot(frame: Any, line: int, **extra: Any) -> dict[str, Any]:
        """The frame's locals at ``line`` and the watch expressions evaluated there."""
        snap: dict[str, Any] = {"line": line, **extra,
                                "locals": _frame_locals(frame, max_vars, repr_chars)}  # fmt: skip
        if watches:
            values = {}
            for text, compiled in watches:
                if isinstance(compiled, BaseException):
                    values[text] = f"<invalid: {type(compiled).__name__}>"
                    continue
                try:
                    value = eval(compiled, frame.f_globals, frame.f_locals)
                    values[text] = _short_repr(value, repr_chars)
                except TestTimeout:
                    raise
                except BaseException as exc:  # noqa: BLE001 - shown as the watch's value
                    values[text] = f"<{type(exc).__name__}: {_short_repr(str(exc), repr_chars)}>"
            snap["watch"] = values
        return snap

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            line = frame.f_lineno
            seen["events"] += 1
            if len(path) < max_events:
                path.append(line)
            if line in wanted and hits.get(line, 0) < max_hits:
                hits[line] = hits.get(line, 0) + 1
                snaps.append(snapshot(frame, line, hit=hits[line]))
            if seen["stopped"] or lines_done():
                seen["stopped"] = True
                frame.f_trace_lines = False  # call, return and exception events go on
        elif event == "exception":
            if seen["exc_obj"] is not arg[1]:  # the innermost frame of a new exception
                seen["exc_obj"] = arg[1]
                seen["exc"] = snapshot(frame, frame.f_lineno)
        elif event == "return":
            caller = frame.f_back
            if caller is not None and caller.f_code.co_filename == TEST_FILENAME:
                seen["ret"] = snapshot(frame, frame.f_lineno, value=_short_repr(arg, repr_chars),
                                       name=frame.f_code.co_name)  # fmt: skip
        return local

    def start(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename != SOLUTION_FILENAME:
            return None
        if seen["stopped"]:
            frame.f_trace_lines = False
        return local

    report: dict[str, Any] = {}
    saved = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = _Discard()
    sys.settrace(start)
    try:
        exec(body, namespace)
        if expr is not None:
            value = eval(expr, namespace)
            if spec.get("as_list"):
                _materialize(value)  # a generator's body runs here, traced
        report["end"] = "value"
    except TestTimeout:
        report["end"] = "timeout"
    except BaseException as exc:  # noqa: BLE001 - the test's failure is an observation
        report["end"] = "exception"
        report["error"] = type(exc).__name__
        if seen["exc_obj"] is not exc:  # raised where tracing was off
            seen["exc"] = None
    finally:
        sys.settrace(None)
        sys.stdout, sys.stderr = saved
    report.update(path=path, events=seen["events"], snaps=snaps, lines_stopped=seen["stopped"])
    if seen["exc"] is not None:
        report["exc"] = seen["exc"]
    if seen["ret"] is not None:
        report["ret"] = seen["ret"]
    return report


def _traced_record(code: Any, source: str, spec: dict[str, Any], per_test: float) -> dict:
    """``{"trace": report}`` for one test, re-run from a fresh namespace under the same
    per-test time limit (the verdict comes from the untraced run before it)."""
    try:
        body, expr = _compile_test(source)
        namespace: dict[str, Any] = {"__name__": "solution", "__builtins__": builtins}
        signal.setitimer(signal.ITIMER_REAL, per_test)
        try:
            exec(code, namespace)
            return {"trace": _trace_run(namespace, body, expr, spec)}
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except TestTimeout:
        return {"trace": {"end": "timeout", "path": [], "events": 0, "snaps": []}}
    except BaseException as exc:  # noqa: BLE001 - the module itself failed to load
        return {"trace": {"end": "exception", "error": type(exc).__name__, "path": [],
                          "events": 0, "snaps": []}}  # fmt: skip


def run_tests(request: dict[str, Any], fd: int) -> None:
    """Evaluate ``request`` (code, tests, labels, limits) and stream records to ``fd``.

    Runs in the sandboxed child after every layer is in place; never returns. Everything it
    compiles and runs came with this request: nothing of any other evaluation is in this
    process (the worker forks the child before a request exists and never reads one).
    """
    write = _write
    dumps = _dumps
    limits = request["limits"]
    write(fd, STARTED_LINE)

    def emit(record: dict[str, Any]) -> None:
        data = (dumps(record, separators=(",", ":")) + "\n").encode()
        while data:
            data = data[write(fd, data) :]

    def on_alarm(signum: int, frame: Any) -> None:
        raise TestTimeout(f"test exceeded {limits['per_test_s']}s")

    signal.signal(signal.SIGALRM, on_alarm)
    per_test = float(limits["per_test_s"])
    labels = request.get("labels") or []
    as_list = request.get("as_list") or []
    try:
        code = compile(request["code"], SOLUTION_FILENAME, "exec")
        code_error = None
    except (SyntaxError, ValueError) as exc:
        code, code_error = None, exc
    for index, source in enumerate(request["tests"]):
        if labels:
            try:
                print(f"--- {labels[index]} ---", flush=True)
            except BaseException:  # noqa: BLE001 - output limit reached; keep testing
                pass
        record: dict[str, Any] = {"i": index}
        try:
            signal.setitimer(signal.ITIMER_REAL, per_test)
            try:
                if code_error is not None:
                    raise code_error
                body, expr = _compile_test(source)
                namespace: dict[str, Any] = {"__name__": "solution", "__builtins__": builtins}
                exec(code, namespace)
                exec(body, namespace)
                value = eval(expr, namespace) if expr is not None else None
                if index < len(as_list) and as_list[index]:
                    value = _materialize(value)
                record["v"] = canonical(value)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except BaseException as exc:  # noqa: BLE001 - every failure is an observation
            record.pop("v", None)
            record["e"] = type(exc).__name__
            try:
                record["m"] = str(exc)[:MESSAGE_CHARS]
            except BaseException:  # noqa: BLE001
                record["m"] = ""
            if isinstance(exc, SyntaxError) and exc.filename == SOLUTION_FILENAME:
                record["ln"] = exc.lineno
            else:
                line = _solution_line(exc.__traceback__)
                if line is not None:
                    record["ln"] = line
        emit(record)
    spec = request.get("trace")
    if spec is not None and code is not None and request["tests"]:
        emit(_traced_record(code, request["tests"][0], spec, per_test))
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001
            pass
    write(fd, DONE_LINE)  # lets the worker answer without waiting for this process to exit
    os._exit(0)
