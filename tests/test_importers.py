"""Imported benchmarks: the QuixBugs and HumanEvalPack importers on hand-written fixtures in
those layouts, and the loader semantics they rely on (iterators observed as lists, JSON
cross-checks, a single tests list split by the loader, buggy time-outs, float tolerance)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO
from tracefix_rl.environment import TraceFixEnvironment
from tracefix_rl.judge import json_equal, values_equal
from tracefix_rl.models import TraceFixAction
from tracefix_rl.sandbox import canonical, get_sandbox
from tracefix_rl.tasks.oracle import buggy_verdict, oracle_check
from tracefix_rl.tasks.registry import TaskRegistry, load_registry
from tracefix_rl.tasks.schema import Task, TaskProblem, parse_task

FIXTURES = REPO / "tests" / "fixtures"
QUIXBUGS = FIXTURES / "quixbugs"
HUMANEVALPACK = FIXTURES / "humanevalpack-python.jsonl"
QUIXBUGS_KEPT = {"clip_all", "double_all", "first_even", "leaves", "moves", "newton_root",
                 "popcount"}  # fmt: skip
HUMANEVAL_KEPT = {"Python/0", "Python/1", "Python/2", "Python/3", "Python/4", "Python/5"}


def run_import(benchmark: str, source: Path, output: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "tracefix_rl.tasks", "import", benchmark, str(source),
         "-o", str(output), "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "[1/" in done.stderr  # progress, on stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def packs(tmp_path_factory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("packs")
    return {
        "folder": folder,
        "quixbugs": run_import("quixbugs", QUIXBUGS, folder / "quixbugs.jsonl"),
        "humanevalpack": run_import("humanevalpack", HUMANEVALPACK, folder / "humanevalfix.jsonl"),
    }


def rows_by_problem(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["problem"]: row for row in report["rows"]}


@pytest.fixture(scope="module")
def imported(packs) -> dict[str, Task]:
    registry = load_registry(packs["folder"], corpus=None)
    assert registry.problems == []  # every written entry loads; the .txt reports are ignored
    return {t.task_id: t for t in registry.tasks.values() if t.source != "curated"}


# -- the importers ----------------------------------------------------------------------------


def test_quixbugs_import_keeps_what_loads_and_says_why_the_rest_was_dropped(packs):
    report = packs["quixbugs"]
    rows = rows_by_problem(report)
    assert {name for name, row in rows.items() if row["kept"]} == QUIXBUGS_KEPT
    assert report["problems"] == 9 and report["kept"] == 7
    assert report["skipped_without_cases"] == ["walk"]
    assert rows["abs_sum"]["reason"] == "buggy code passes all 3 tests"
    assert rows["first_even"]["notes"] == [
        "the buggy code fails 1 of 4 tests: it is visible, and every hidden test passes on the "
        "buggy code"
    ]
    assert rows["orphan"]["reason"] == "correct_python_programs/orphan.py is missing"
    notes = " | ".join(rows["double_all"]["notes"])
    assert "double_all.json line 6 skipped: invalid JSON" in notes
    assert "'double_all([0, 5])' dropped: solution gives [0, 10]" in notes
    assert rows["double_all"]["tests"] == 4 and rows["double_all"]["tests_dropped"] == 1
    text = Path(report["report"]).read_text()
    assert "DROPPED abs_sum: buggy code passes all 3 tests" in text
    assert "KEPT    leaves -> quixbugs-leaves" in text
    entries = [json.loads(line) for line in Path(report["output"]).read_text().splitlines()]
    assert len(entries) == 7 and all("tests" in e and "visible_tests" not in e for e in entries)
    assert {e["source"] for e in entries} == {"quixbugs"}


def test_humanevalpack_import_converts_asserts_blocks_and_examples(packs):
    report = packs["humanevalpack"]
    rows = rows_by_problem(report)
    assert {name for name, row in rows.items() if row["kept"]} == HUMANEVAL_KEPT
    assert "the buggy code fails 1 of 4 tests: it is visible" in rows["Python/4"]["notes"][0]
    assert rows["Python/6"]["reason"] == "missing field(s): test"
    assert rows["Python/7"]["reason"].startswith("1 test after conversion; a task needs at least 2")
    assert any("left out (does not call candidate): assert True" in n
               for n in rows["Python/0"]["notes"])  # fmt: skip
    notes = rows["Python/5"]["notes"]
    assert "2 docstring example(s) added as tests" in notes
    assert any("'apply_discount(99, 50)' dropped: solution gives 50" in n for n in notes)
    entries = {e["task_id"]: e for e in map(json.loads, Path(report["output"]).read_text()
                                                .splitlines())}  # fmt: skip
    square = entries["humanevalfix-2"]
    assert square["bug_type"] == "excess_logic" and square["entry_point"] == "is_square"
    loop = next(t for t in square["tests"] if isinstance(t, dict) and t["name"].startswith("for"))
    assert loop["code"].splitlines()[:2] == ["candidate = is_square", "import math"]
    assert entries["humanevalfix-1"]["buggy_code"].startswith("from typing import List\n")
    assert entries["humanevalfix-0"]["description"].startswith("Count the vowels")


def test_import_of_a_folder_that_is_not_a_checkout_names_what_is_missing(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "tracefix_rl.tasks", "import", "quixbugs", str(tmp_path),
         "-o", str(tmp_path / "p.jsonl")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    assert (
        "is not a QuixBugs checkout: no python_programs/, correct_python_programs/" in done.stderr
    )


# -- the loader semantics they rely on --------------------------------------------------------


def test_generators_are_observed_as_lists(imported):
    task = imported["quixbugs-leaves"]
    assert all(t.observe_list for t in task.all_tests)
    assert {"v": [1, 2, 3, 4]} in task.expected
    verdict = buggy_verdict(task, task.buggy_code, get_sandbox())
    details = [t.detail for t in verdict.tests if not t.passed]
    assert details and all("unserializable generator" in d for d in details)


def test_tuples_match_json_arrays_in_the_cross_check_but_grading_stays_type_strict(imported):
    task = imported["quixbugs-moves"]
    assert {"v": [{"t": "tuple", "v": [1, 3]}]} in task.expected  # the solution's own value
    as_lists = task.solution.replace("steps.append((start, end))", "steps.append([start, end])")
    verdict = buggy_verdict(task, as_lists, get_sandbox())
    assert verdict.passed == 1  # only moves(0, 1, 3) == [] still passes


def test_buggy_code_that_loops_forever_is_a_task_and_the_agent_sees_time_outs(imported):
    task = imported["quixbugs-popcount"]
    names = {t.name for t in task.all_tests}  # a bare JSON argument is the one argument
    assert names == {"popcount(127)", "popcount(128)", "popcount(5)"}
    assert task.buggy_all_passed == 0
    verdict = buggy_verdict(task, task.buggy_code, get_sandbox())
    assert all(d.startswith(("timed out", "no result")) for d in (t.detail for t in verdict.tests))


def test_float_tolerance_applies_to_the_cross_check_and_to_grading(imported):
    task = imported["quixbugs-newton_root"]
    assert task.float_tolerance == 0.01
    assert {t.name for t in task.all_tests} >= {"newton_root(2, 0.01)"}
    nearby = task.solution.replace("approx = x / 2", "approx = x / 2 + 1e-4")
    assert buggy_verdict(task, nearby, get_sandbox()).all_passed
    far = task.solution.replace("return approx", "return approx * 1.05")
    assert buggy_verdict(task, far, get_sandbox()).passed == 0


def test_the_loader_chooses_a_third_visible_with_failures_on_both_sides(packs, imported):
    task = imported["quixbugs-clip_all"]
    assert (len(task.visible_tests), len(task.hidden_tests)) == (3, 6)
    visible = len(task.visible_tests)
    assert not all(task.buggy_passing[:visible]) and not all(task.buggy_passing[visible:])
    again = load_registry(packs["folder"], corpus=None).tasks["quixbugs-clip_all"]
    assert again.visible_tests == task.visible_tests and again.expected == task.expected


SPLIT_TASK = {
    "task_id": "split_me", "difficulty": "easy", "description": "Negate x.", "entry_point": "f",
    "buggy_code": "def f(x):\n    return x if x > 2 else -x\n",
    "solution": "def f(x):\n    return -x\n",
}  # fmt: skip


def test_a_single_tests_list_is_split_or_the_reason_given(registry):
    sandbox = get_sandbox()
    split = oracle_check(parse_task("t", {**SPLIT_TASK, "tests": [f"f({i})" for i in range(9)]}),
                         sandbox)  # fmt: skip
    assert isinstance(split, Task) and len(split.visible_tests) == 3
    assert not all(split.buggy_passing[:3]) and not all(split.buggy_passing[3:])
    assert split.visible_tests + split.hidden_tests != () and not split.choose_visible
    tests = ["f(0)", "f(1)", "f(2)", "f(3)"]  # only f(3) fails on the buggy code
    one = oracle_check(parse_task("t", {**SPLIT_TASK, "tests": tests}), sandbox)
    assert isinstance(one, Task) and [t.name for t in one.visible_tests] == ["f(3)"]
    assert one.buggy_passing == (False, True, True, True)
    none = oracle_check(parse_task("t", {**SPLIT_TASK, "tests": tests[:3]}), sandbox)
    assert isinstance(none, TaskProblem) and none.reason == "buggy code passes all 3 tests"
    explicit = {**SPLIT_TASK, "visible_tests": tests[3:], "hidden_tests": tests[:3]}
    rejected = oracle_check(parse_task("t", explicit), sandbox)  # the waiver is for tests only
    assert rejected.reason == "buggy code passes every hidden test"
    both = parse_task("t", {**SPLIT_TASK, "tests": tests, "visible_tests": tests})
    assert "give either tests or visible_tests and hidden_tests, not both" in both.reason
    neither = parse_task("t", {**SPLIT_TASK, "visible_tests": tests})
    assert "hidden_tests missing (or give one tests list)" in neither.reason


def test_observe_list_on_a_task_and_per_test(registry):
    entry = {**SPLIT_TASK, "observe": "list",
             "buggy_code": "def f(x):\n    yield from range(x - 1)\n",
             "solution": "def f(x):\n    yield from range(x)\n",
             "visible_tests": ["f(2)", "f(1)"],
             "hidden_tests": ["f(3)", "map(abs, [-1, 2])"]}  # fmt: skip
    task = oracle_check(parse_task("t", entry), get_sandbox())
    assert isinstance(task, Task), task
    assert [e["v"] for e in task.expected] == [[0, 1], [0], [0, 1, 2], [1, 2]]
    raw = {**entry, "visible_tests": ["f(2)", {"name": "raw", "code": "f(1)", "observe": "value"}]}
    problem = oracle_check(parse_task("t", raw), get_sandbox())
    assert isinstance(problem, TaskProblem)
    assert "'raw' returns data that is not builtin" in problem.reason
    endless = {**entry, "solution": "def f(x):\n    while True:\n        yield x\n"}
    problem = oracle_check(parse_task("t", endless), get_sandbox())
    assert isinstance(problem, TaskProblem) and "too large" in problem.reason  # bounded


def test_json_cross_check_rules():
    assert json_equal(canonical([[1, 3]]), canonical([(1, 3)]))
    assert json_equal(canonical(1), canonical(1.0)) and not json_equal(
        canonical(True), canonical(1)
    )
    assert json_equal(canonical({"1": [2]}), canonical({1: (2,)}))
    assert json_equal(canonical(float("nan")), canonical(float("nan")))
    assert not json_equal(canonical(1.4142), canonical(1.41666))
    assert json_equal(canonical(1.4142), canonical(1.41666), float_tolerance=0.01)
    assert not json_equal(canonical(10**400), canonical(1.0))
    assert not values_equal(canonical((1, 3)), canonical([1, 3]))  # grading stays strict
    assert values_equal(4.0, 4.03, float_tolerance=0.01)
    assert not values_equal(4.0, 4.03)


# -- through the server -----------------------------------------------------------------------


def test_imported_tasks_solve_end_to_end_and_are_listed_by_source(packs, imported, start_server):
    proc = start_server(extra_env={"TRACEFIX_TASKS": str(packs["folder"])})
    assert httpx.get(f"{proc.url}/health").json()["tasks_skipped"] == 0
    page = httpx.get(f"{proc.url}/tasks", params={"source": "quixbugs"}).json()
    assert page["total"] == 7 and {r["source"] for r in page["tasks"]} == {"quixbugs"}
    assert page["by_source"]["quixbugs"] == 7 and page["by_source"]["humanevalfix"] == 6
    assert page["by_source"]["curated"] == 40
    client = httpx.Client(base_url=proc.url, timeout=60)
    for task in imported.values():
        reset = client.post("/reset", json={"task_id": task.task_id}).json()["observation"]
        lines = len(task.buggy_code.splitlines())
        edit = {"action_type": "REPLACE_LINES", "start_line": 1, "end_line": lines,
                "new_code_block": task.solution.rstrip("\n")}  # fmt: skip
        assert reset["task_id"] == task.task_id
        client.post("/step", json={"action": edit}).raise_for_status()
        final = client.post("/step", json={"action": {"action_type": "SUBMIT"}}).json()
        assert final["observation"]["solved"] is True, (task.task_id, final["observation"])
    stats = subprocess.run(
        [sys.executable, "-m", "tracefix_rl.tasks", "stats", "--json", "--corpus", "none"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={"TRACEFIX_TASKS": str(packs["folder"]), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    facts = json.loads(stats.stdout)
    assert facts["by_source"] == {"curated": 40, "humanevalfix": 6, "quixbugs": 7}
    assert sum(facts["by_source_tier"]["quixbugs"].values()) == 7


def test_trace_follows_a_generator_observed_as_a_list(imported):
    """TRACE runs the generator's body under tracing (the list observation drives it)."""
    task = imported["quixbugs-leaves"]
    env = TraceFixEnvironment(registry=TaskRegistry(tasks={task.task_id: task}))
    try:
        env.reset(task_id=task.task_id)
        failing = next(i for i, ok in enumerate(task.buggy_passing) if not ok) + 1
        observation = env.step(TraceFixAction(action_type="TRACE", test=failing, lines=[4]))
    finally:
        env.close()
    assert observation.last_action_error is None
    report = observation.last_execution_output
    assert "got <unserializable generator>" in report
    path = report.split("Executed lines", 1)[1].splitlines()[0]
    assert " 4 " in f"{path} " and "Line 4, hit 1 (before it runs): locals: tree=" in report
