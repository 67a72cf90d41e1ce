"""The judge: compares a sandbox's observations with expected observations.

Runs in the server process only. It never executes agent code or agent objects: records
arrive as JSON text and are compared as plain data (see ``sandbox.canonical``).
Rules: a missing record fails its test; duplicate, out-of-range or malformed records (or a
flooded result channel) mark the run *tampered*, which fails every test.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Sequence
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


def judge(result: EvalResult, expected: Sequence[dict[str, Any]]) -> Verdict:
    """Grade ``result`` against ``expected`` (one record per test, in order)."""
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
    verdicts = tuple(_judge_one(by_index.get(i), expected[i], missing) for i in range(total))
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
    actual: dict[str, Any] | None, expected: dict[str, Any], missing: str
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
    if values_equal(actual["v"], expected["v"]):
        return TestVerdict(True)
    return TestVerdict(False, f"expected {render(expected['v'])}, got {render(actual['v'])}")


def values_equal(a: Any, b: Any) -> bool:
    """Type-strict equality of canonical values; floats compare with a tolerance."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        return math.isclose(a, b, rel_tol=FLOAT_REL_TOL, abs_tol=FLOAT_ABS_TOL)
    if type(a) is list:
        return len(a) == len(b) and all(values_equal(x, y) for x, y in zip(a, b, strict=True))
    if type(a) is dict:
        return a.keys() == b.keys() and all(values_equal(a[k], b[k]) for k in a)
    return a == b


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
