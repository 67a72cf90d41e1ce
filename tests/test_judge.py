"""The judge: type-strict comparison, missing records fail, tampering voids the run."""

from __future__ import annotations

import signal

from tracefix_rl.judge import judge, render, values_equal
from tracefix_rl.sandbox import EvalResult, canonical


def result(records, malformed=0, timed_out=False, overflow=False, signum=None) -> EvalResult:
    return EvalResult(
        records=records,
        malformed_lines=malformed,
        output="",
        output_truncated=False,
        exit_code=None if signum else 0,
        signal=signum,
        timed_out=timed_out,
        result_overflow=overflow,
        duration_ms=1.0,
    )


EXPECTED = [{"v": 3}, {"e": "ValueError"}]


def test_matching_records_pass():
    verdict = judge(result([{"i": 0, "v": 3}, {"i": 1, "e": "ValueError", "m": "x"}]), EXPECTED)
    assert verdict.all_passed and verdict.passed == 2


def test_missing_record_fails_with_reason():
    verdict = judge(result([{"i": 0, "v": 3}], timed_out=True), EXPECTED)
    assert [t.passed for t in verdict.tests] == [True, False]
    assert "timed out" in verdict.tests[1].detail


def test_cpu_limit_kill_is_a_time_out():
    """RLIMIT_CPU (SIGXCPU) can beat the wall clock when per-test budgets add up to it."""
    verdict = judge(result([{"i": 0, "v": 3}], signum=signal.SIGXCPU), EXPECTED)
    assert verdict.timed_out and verdict.passed == 1
    assert verdict.tests[1].detail == "no result: the run timed out (CPU time limit reached)"
    killed = judge(result([{"i": 0, "v": 3}], signum=signal.SIGSEGV), EXPECTED)
    assert not killed.timed_out and "signal 11" in killed.tests[1].detail


def test_duplicates_out_of_range_and_malformed_mark_tampered():
    for records, malformed in (
        ([{"i": 0, "v": 3}, {"i": 0, "v": 3}, {"i": 1, "e": "ValueError"}], 0),
        ([{"i": 0, "v": 3}, {"i": 1, "e": "ValueError"}, {"i": 2, "v": 1}], 0),
        ([{"i": 0, "v": 3, "e": "X"}, {"i": 1, "e": "ValueError"}], 0),
        ([{"i": "0", "v": 3}, {"i": 1, "e": "ValueError"}], 0),
        ([{"i": 0, "v": 3}, {"i": 1, "e": "ValueError"}], 1),
    ):
        verdict = judge(result(records, malformed), EXPECTED)
        assert verdict.tampered and verdict.passed == 0


def test_result_overflow_is_tampering():
    assert judge(result([{"i": 0, "v": 3}], overflow=True), EXPECTED[:1]).tampered


def test_type_strict_equality():
    assert not values_equal(True, 1)
    assert not values_equal(1, 1.0)
    assert values_equal(0.1 + 0.2, 0.3)
    assert not values_equal(canonical((1, 2)), canonical([1, 2]))
    assert values_equal(canonical({"a": [1, (2, 3)]}), canonical({"a": [1, (2, 3)]}))
    assert not values_equal(canonical(float("nan")), 0.0)
    unserializable = {"t": "unserializable", "v": "Weird"}
    assert not values_equal(unserializable, canonical(3))


def test_failure_details_are_readable():
    verdict = judge(result([{"i": 0, "v": [1, 2]}, {"i": 1, "v": 5}]), EXPECTED)
    assert verdict.tests[0].detail == "expected 3, got [1, 2]"
    assert verdict.tests[1].detail == "expected ValueError to be raised, got 5"
    verdict = judge(result([{"i": 0, "e": "KeyError", "m": "'k'", "ln": 4}]), EXPECTED[:1])
    assert verdict.tests[0].detail == "raised KeyError: 'k' (line 4)"
    assert verdict.tests[0].line == 4


def test_render_looks_like_python():
    value = canonical({"a": (1,), "b": {2}, "c": float("inf"), "d": b"x"})
    assert render(value) == "{'a': (1,), 'b': {2}, 'c': float('inf'), 'd': b'x'}"
    assert render(canonical(set())) == "set()"
