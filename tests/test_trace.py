"""TRACE: the report's content on curated tasks, its bounds, its determinism, and its rules
(visible tests only, the RUN_TESTS verdict, one step's cost and no shaping reward)."""

from __future__ import annotations

import httpx
import pytest

from tracefix_rl.episode.reward import INVALID_ACTION_PENALTY, STEP_COST
from tracefix_rl.episode.trace import REPORT_CHARS, fold_path, trace_of
from tracefix_rl.models import TraceFixAction

TASK = "sum_of_evens_wrong_modulus"
LRU = "lru_cache_get_does_not_promote"


def act(env, action_type: str, **params):
    return env.step(TraceFixAction(action_type=action_type, **params))


def rewrite(env, code: str) -> None:
    lines = len(env.episode.editor)
    obs = act(env, "REPLACE_LINES", start_line=1, end_line=lines, new_code_block=code)
    assert obs.last_action_error is None, obs.last_action_error


def test_fold_path_writes_each_repeated_block_once():
    assert fold_path([3, 4, 5, 6, 4, 5, 6, 4, 5, 6, 4, 7]) == "3 [4 5 6]×3 4 7"
    assert fold_path([2, 3] * 500) == "[2 3]×500"
    assert fold_path([1, 1, 1, 2]) == "1×3 2"
    assert fold_path([]) == "" and fold_path([5, 6, 7]) == "5 6 7"


def test_a_failing_value_shows_the_path_the_return_and_the_snapshots(make_env):
    env = make_env()
    env.reset(task_id=TASK)
    obs = act(env, "TRACE", test=3, lines=[6], watch=["n % 2", "total"])
    assert obs.last_action_error is None
    report = obs.last_execution_output
    assert report.splitlines() == [
        "TRACE of visible test 3 of 4: sum_of_evens([7, 9, 11])",
        "Result: FAIL: expected 0, got 27",
        "Executed lines (12 line events): 3 [4 5 6]×3 4 7",
        "sum_of_evens returned 27 at line 7; locals: nums=[7, 9, 11], total=27, n=11; "
        "watch: n % 2 = 1, total = 27",
        "Line 6, hit 1 (before it runs): locals: nums=[7, 9, 11], total=0, n=7; "
        "watch: n % 2 = 1, total = 0",
        "Line 6, hit 2 (before it runs): locals: nums=[7, 9, 11], total=7, n=9; "
        "watch: n % 2 = 1, total = 7",
        "Line 6, hit 3 (before it runs): locals: nums=[7, 9, 11], total=16, n=11; "
        "watch: n % 2 = 1, total = 16",
    ]
    # one step's cost, no shaping reward, RUN_TESTS' verdict untouched
    assert obs.reward == -STEP_COST and obs.step_count == 1 and obs.test_results == []
    by_name = act(env, "TRACE", test="sum_of_evens([])").last_execution_output
    assert by_name.splitlines()[:2] == ["TRACE of visible test 2 of 4: sum_of_evens([])",
                                        "Result: PASS"]  # fmt: skip


def test_an_exception_shows_the_locals_where_it_was_raised(make_env):
    env = make_env()
    env.reset(task_id=TASK)
    rewrite(env, "def sum_of_evens(nums):\n    total = 0\n    for n in nums:\n"
                 "        total += nums[n * 10]\n    return total\n")  # fmt: skip
    obs = act(env, "TRACE", test=1, watch=["n * 10"])
    report = obs.last_execution_output
    assert "Result: FAIL: raised IndexError: list index out of range (line 4)" in report
    assert ("Raised IndexError at line 4; locals: nums=[1, 2, 3, 4], total=0, n=1; "
            "watch: n * 10 = 10") in report  # fmt: skip
    assert ">>    4 |" in obs.localized_context  # the focus is the raising line


def test_a_loop_that_never_ends_returns_a_partial_trace(make_env):
    env = make_env()
    env.reset(task_id=TASK)
    rewrite(env, "def sum_of_evens(nums):\n    total = 0\n    while True:\n"
                 "        total += 1\n")  # fmt: skip
    report = act(env, "TRACE", test=2).last_execution_output
    assert "Result: FAIL" in report and "timed out" in report
    assert "The traced run timed out: the trace below is partial." in report
    assert ("Executed lines (the first 2000 line events; lines were not traced after them): "
            "2 [3 4]×999 3") in report  # fmt: skip
    assert len(report) <= REPORT_CHARS


def test_tracing_never_changes_a_verdict(make_env):
    """A test that passes under RUN_TESTS but is too slow to trace in time still passes
    (asking for a line reached only at the end keeps every line event traced)."""
    env = make_env()
    env.reset(task_id=TASK)
    rewrite(env, "def sum_of_evens(nums):\n    for _ in range(10_000_000):\n        pass\n"
                 "    return sum(n for n in nums if n % 2 == 0)\n")  # fmt: skip
    assert act(env, "RUN_TESTS").tests_passed == 4
    report = act(env, "TRACE", test=1, lines=[4]).last_execution_output
    assert "Result: PASS" in report
    assert "The traced run timed out: the trace below is partial." in report
    cheap = act(env, "TRACE", test=1).last_execution_output  # lines stop after the path
    assert "timed out" not in cheap and "lines were not traced after them" in cheap


def test_the_report_is_capped_with_a_marker(make_env):
    env = make_env()
    env.reset(task_id=TASK)
    rewrite(env, "def sum_of_evens(nums):\n    a = b = c = d = e = f = g = 'x' * 500\n"
                 "    total = 0\n    for n in nums:\n        print('y' * 300)\n"
                 "        total += n\n    return total\n")  # fmt: skip
    report = act(env, "TRACE", test=1, lines=[3, 4, 5, 6, 7],
                 watch=["a", "b", "c", "d", "e"]).last_execution_output  # fmt: skip
    assert len(report) == REPORT_CHARS
    assert report.endswith(f"\n... [report truncated at {REPORT_CHARS} characters]")
    assert "'xxxxx" in report and "...'" not in report.split("\n")[2]


def test_only_visible_tests_can_be_traced_and_bad_parameters_are_named(make_env):
    env = make_env()
    env.reset(task_id=TASK)
    hidden = env.episode.task.hidden_tests[0].name
    cost = -(STEP_COST + INVALID_ACTION_PENALTY)
    for params, error in (
        ({"test": 5}, "test 5 is not a visible test (1..4)"),
        ({"test": 0}, "test 0 is not a visible test (1..4)"),
        ({"test": hidden}, f"no visible test is named {hidden[:80]!r} (only visible tests"),
        ({"test": 1, "lines": [8]}, "line 8 is outside the file (1..7)"),
        ({"test": 1, "lines": [1, 2, 3, 4, 5, 6]}, "TRACE: lines: List should have at most 5"),
        ({"test": 1, "watch": ["total +"]}, "watch 'total +' is not a Python expression"),
        ({"test": 1, "watch": ["x" * 101]}, "watch expression longer than 100 characters"),
        ({}, "TRACE needs test (test: The visible test to trace"),
    ):
        obs = act(env, "TRACE", **params)
        assert obs.last_action_error.startswith(error), (params, obs.last_action_error)
        assert obs.reward == pytest.approx(cost)
    with pytest.raises(ValueError):
        TraceFixAction(action_type="TRACE", test=True)  # strict on the wire


def test_the_record_is_untrusted_data():
    assert trace_of([{"i": 0, "v": 1}])[0] is None
    two = [{"trace": {"end": "value", "path": [], "events": 0, "snaps": []}}] * 2
    assert trace_of(two) == (None, "no trace: the program wrote records of its own to the "
                                   "result channel")  # fmt: skip
    huge = {"trace": {"end": "value", "path": [1] * 5000, "events": 5000, "snaps": []}}
    assert trace_of([huge]) == (None, "no trace: the trace record was malformed")
    wrong = {"trace": {"end": "value", "path": ["1"], "events": 1, "snaps": []}}
    assert trace_of([wrong])[0] is None


def test_the_same_trace_is_byte_identical_across_two_servers(start_server):
    """Same input, same report: reprs with memory addresses are masked."""
    reports = []
    for _ in range(2):
        server = start_server()
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for task, test in ((LRU, 1), (LRU, 3), (TASK, 1)):
                reset = http.post("/reset", json={"task_id": task}).json()
                episode = reset["observation"]["episode_id"]
                step = http.post("/step", json={"episode_id": episode, "action": {
                    "action_type": "TRACE", "test": test, "watch": ["self"]}}).json()  # fmt: skip
                reports.append(step["observation"]["last_execution_output"])
    assert reports[:3] == reports[3:]
    assert "object at 0x…>" in reports[0] and "0x7" not in "".join(reports)


def test_a_recursion_error_still_names_its_line(make_env):
    """Hitting the recursion limit switches tracing off: the report says so, and Result
    (the untraced run) names the line."""
    env = make_env()
    env.reset(task_id=TASK)
    rewrite(env, "def sum_of_evens(nums):\n    return sum_of_evens(nums[:])\n")
    report = act(env, "TRACE", test=1).last_execution_output
    assert "Result: FAIL: raised RecursionError: maximum recursion depth exceeded" in report
    assert "(line 2)" in report.splitlines()[1]
    assert "Raised RecursionError where tracing was off" in report, report
