"""The judge: compares a sandbox's observations with expected observations.

Runs in the server process only. It never executes agent code or agent objects: records
arrive as JSON text and are compared as plain data (see ``sandbox.canonical``).
Rules: a missing record fails its test; duplicate, out-of-range or malformed records (or a
flooded result channel) mark the run *tampered*, which fails every test.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tracefix_rl.sandbox import EvalResult, TestTimeout

FLOAT_REL_TOL = 1e-9
FLOAT_ABS_TOL = 1e-12
RENDER_CHARS = 160
TIMEOUT_EXCEPTION = TestTimeout.__name__  # raised in the sandbox child when a test overruns


@dataclass(frozen=True)
class TestVerdict:
    """Pass/fail of one test plus a human-readable reason when it failed."""

    __test__ = False  # not a pytest test class

    passed: bool
    detail: str | None = None
    line: int | None = None


@dataclass(frozen=True)
class Verdict:
    """Per-test verdicts of one evaluation."""

    tests: tuple[TestVerdict, ...]
    tampered: bool = False
    timed_out: bool = False

    @property
    def passed(self) -> int:
        return sum(t.passed for t in self.tests)

    @property
    def total(self) -> int:
        return len(self.tests)

    @property
    def all_passed(self) -> bool:
        return self.total > 0 and self.passed == self.total


def expected_record(record: dict[str, Any]) -> dict[str, Any]:
    """Reduce a reference run's record to what a test must reproduce."""
    if "e" in record:
        return {"e": record["e"]}
    return {"v": record["v"]}


def judge(
    result: EvalResult, expected: Sequence[dict[str, Any]], float_tolerance: float | None = None
) -> Verdict:
    """Grade ``result`` against ``expected`` (one record per test, in order); floats match
    within ``float_tolerance`` when the task gives one (see :func:`values_equal`)."""
    total = len(expected)
    by_index: dict[int, dict[str, Any]] = {}
    tampered = result.malformed_lines > 0 or result.result_overflow
    for record in result.records:
        index = record.get("i")
        well_formed = (
            type(index) is int and 0 <= index < total and (("v" in record) != ("e" in record))
        )
        if not well_formed or index in by_index:
            tampered = True
            continue
        by_index[index] = record
    timed_out = result.timed_out or result.signal == signal.SIGXCPU
    if tampered:
        failed = TestVerdict(False, "result channel tampered with; run discarded")
        return Verdict(tests=(failed,) * total, tampered=True, timed_out=timed_out)
    missing = _missing_reason(result)
    verdicts = tuple(
        _judge_one(by_index.get(i), expected[i], missing, float_tolerance) for i in range(total)
    )
    return Verdict(tests=verdicts, timed_out=timed_out)


def _missing_reason(result: EvalResult) -> str:
    if result.timed_out:
        return "no result: the run timed out"
    if result.signal == signal.SIGXCPU:  # RLIMIT_CPU: the same overrun, counted in CPU time
        return "no result: the run timed out (CPU time limit reached)"
    if result.signal is not None:
        return f"no result: the process was killed by signal {result.signal}"
    if result.exit_code is not None:
        return f"no result: the process exited early (exit code {result.exit_code})"
    return "no result: the run ended before this test"


def _judge_one(
    actual: dict[str, Any] | None,
    expected: dict[str, Any],
    missing: str,
    float_tolerance: float | None = None,
) -> TestVerdict:
    if actual is None:
        return TestVerdict(False, missing)
    line = actual.get("ln") if type(actual.get("ln")) is int else None
    if "e" in actual:
        if "e" in expected and actual["e"] == expected["e"]:
            return TestVerdict(True)
        message = str(actual.get("m") or "")
        if actual["e"] == TIMEOUT_EXCEPTION:
            detail = f"timed out ({message})" if message else "timed out"
        else:
            detail = f"raised {actual['e']}" + (f": {message}" if message else "")
        if line is not None:
            detail += f" (line {line})"
        if "e" in expected:
            detail = f"expected {expected['e']} to be raised, but {detail}"
        return TestVerdict(False, detail, line)
    if "e" in expected:
        return TestVerdict(
            False, f"expected {expected['e']} to be raised, got {render(actual['v'])}"
        )
    if values_equal(actual["v"], expected["v"], float_tolerance):
        return TestVerdict(True)
    return TestVerdict(False, f"expected {render(expected['v'])}, got {render(actual['v'])}")


def values_equal(a: Any, b: Any, float_tolerance: float | None = None) -> bool:
    """Type-strict equality of canonical values. Floats match within a relative tolerance of
    ``FLOAT_REL_TOL`` or, when a task gives ``float_tolerance``, when they differ by at most
    ``float_tolerance`` × max(1, |a|, |b|) (relative for large values, absolute near 0)."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        return floats_close(a, b, float_tolerance)
    return _items_equal(a, b, lambda x, y: values_equal(x, y, float_tolerance))


def _items_equal(a: Any, b: Any, equal: Callable[[Any, Any], bool]) -> bool:
    """``a == b`` for two values of one type; lists and dicts item by item with ``equal``."""
    if type(a) is list:
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))
    if type(a) is dict:
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    return a == b


def floats_close(a: float, b: float, float_tolerance: float | None = None) -> bool:
    if float_tolerance is None:
        return math.isclose(a, b, rel_tol=FLOAT_REL_TOL, abs_tol=FLOAT_ABS_TOL)
    return math.isclose(a, b, rel_tol=float_tolerance, abs_tol=float_tolerance)


def json_view(value: Any) -> Any:
    """A canonical value as JSON would hold it: tuples, sets and lists become lists, dicts
    become objects with string keys (as ``json.dumps`` writes them), special floats stay
    floats. Used to cross-check a value given in a JSON file or an ``assert`` line against
    the solution's observation, never to grade."""
    if type(value) is list:
        return [json_view(v) for v in value]
    if type(value) is not dict:
        return value
    tag, inner = value.get("t"), value.get("v")
    if tag in ("tuple", "set", "frozenset"):
        return [json_view(v) for v in inner]
    if tag == "dict":
        return {_json_key(k): json_view(v) for k, v in inner}
    if tag == "float":
        return float(inner)
    if tag == "bytes":
        return {"bytes": inner}
    return _NEVER_EQUAL


class _NeverEqual:
    def __eq__(self, other: object) -> bool:
        return False

    __hash__ = None  # type: ignore[assignment]


_NEVER_EQUAL = _NeverEqual()


def _json_key(key: Any) -> str:
    if type(key) is str:
        return key
    if key is None or type(key) is bool:
        return {None: "null", True: "true", False: "false"}[key]
    if type(key) in (int, float):
        return repr(key) if type(key) is float else str(key)
    return _render(key)


def json_equal(given: Any, observed: Any, float_tolerance: float | None = None) -> bool:
    """``given`` (a canonical value from a task file) agrees with ``observed`` (the
    solution's canonical observation) in JSON's own terms: see :func:`json_view`; numbers
    compare by value (``1`` ≈ ``1.0``, never ``true``); NaN matches NaN."""
    return _json_equal(json_view(given), json_view(observed), float_tolerance)


def _json_equal(a: Any, b: Any, float_tolerance: float | None) -> bool:
    numbers = (int, float)
    if type(a) in numbers and type(b) in numbers:
        if type(a) is int and type(b) is int:
            return a == b
        try:
            x, y = float(a), float(b)
        except OverflowError:  # an int too large for a float equals no float
            return False
        return (x != x and y != y) or floats_close(x, y, float_tolerance)
    if type(a) is not type(b):
        return False
    return _items_equal(a, b, lambda x, y: _json_equal(x, y, float_tolerance))


def render(value: Any) -> str:
    """Show a canonical value the way Python would print it (truncated)."""
    text = _render(value)
    return text if len(text) <= RENDER_CHARS else text[: RENDER_CHARS - 3] + "..."


def _render(value: Any) -> str:
    if type(value) is list:
        return "[" + ", ".join(_render(v) for v in value) + "]"
    if type(value) is not dict:
        return repr(value)
    tag, inner = value.get("t"), value.get("v")
    if tag == "tuple":
        items = [_render(v) for v in inner]
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    if tag in ("set", "frozenset"):
        body = "{" + ", ".join(_render(v) for v in inner) + "}" if inner else "set()"
        return body if tag == "set" else f"frozenset({body})"
    if tag == "dict":
        return "{" + ", ".join(f"{_render(k)}: {_render(v)}" for k, v in inner) + "}"
    if tag == "float":
        return f"float('{inner}')"
    if tag == "bytes":
        return repr(bytes.fromhex(inner))
    return f"<unserializable {inner}>"
