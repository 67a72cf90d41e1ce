"""Task registry: every built-in task is oracle-valid; packs load with clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import REPO
from tracefix_rl.judge import judge
from tracefix_rl.tasks import (
    BUILTIN_DIR,
    TaskRegistry,
    TaskSelectionError,
    evaluate,
    load_registry,
)

GOOD_TASK = {
    "task_id": "pack_double",
    "difficulty": "easy",
    "description": "double(x) returns 2 * x.",
    "entry_point": "double",
    "buggy_code": "def double(x):\n    return x + 2\n",
    "solution": "def double(x):\n    return 2 * x\n",
    "visible_tests": ["double(1)", "double(5)"],
    "hidden_tests": ["double(0)", "double(-3)"],
    "bug_type": "wrong_operator",
    "source": "my-pack",
}


def curated(registry: TaskRegistry):
    return [registry.tasks[i] for i in registry.ids(source="curated")]


def test_every_builtin_task_is_valid(registry: TaskRegistry):
    assert registry.problems == []
    files = sorted(BUILTIN_DIR.glob("*.toml"))
    assert len(curated(registry)) == len(files) >= 40
    assert len({task.program for task in curated(registry)}) >= 40


def test_builtin_tiers_and_test_counts(registry: TaskRegistry):
    tiers = Counter(task.difficulty for task in curated(registry))
    assert tiers["easy"] >= 4 and tiers["medium"] >= 6 and tiers["hard"] >= 6
    for task in curated(registry):
        assert task.source == "curated"
        assert len(task.visible_tests) >= 4, task.task_id
        assert len(task.hidden_tests) >= 8, task.task_id
    assert any("class " in task.solution for task in curated(registry))
    assert any("lru" in task.task_id for task in curated(registry))


def test_oracle_holds_for_every_task(registry: TaskRegistry):
    """The solution passes everything; the buggy code fails a visible and a hidden test."""
    for task in curated(registry):
        reference = judge(evaluate_all(task, task.solution), task.expected)
        assert reference.all_passed, task.task_id
        buggy = judge(evaluate_all(task, task.buggy_code), task.expected)
        visible = len(task.visible_tests)
        assert not all(t.passed for t in buggy.tests[:visible]), task.task_id
        assert not all(t.passed for t in buggy.tests[visible:]), task.task_id
        assert task.buggy_all_passed == buggy.passed


def evaluate_all(task, code):
    from tracefix_rl.sandbox import get_sandbox

    return evaluate(get_sandbox(), code, task.all_tests)


def test_selection_is_deterministic(registry: TaskRegistry):
    picks = [registry.select(seed=s).task_id for s in range(20)]
    assert picks == [registry.select(seed=s).task_id for s in range(20)]
    for split in ("train", "eval"):
        task = registry.select(seed=3, difficulty="hard", split=split)
        assert (task.difficulty, task.split) == ("hard", split)
    assert len(set(picks)) > 3
    for tier in ("easy", "medium", "hard"):
        assert registry.select(seed=5, difficulty=tier).difficulty == tier


def test_selection_errors_are_clear(registry: TaskRegistry):
    with pytest.raises(TaskSelectionError, match="unknown task_id 'nope'"):
        registry.select(task_id="nope")
    with pytest.raises(TaskSelectionError, match="unknown difficulty 'extreme'"):
        registry.select(difficulty="extreme")
    easy = registry.ids("easy")[0]
    with pytest.raises(TaskSelectionError, match="has difficulty easy, not hard"):
        registry.select(task_id=easy, difficulty="hard")


def write_pack(tmp_path: Path) -> Path:
    pack = tmp_path / "pack"
    pack.mkdir()
    lines = [
        json.dumps(GOOD_TASK),
        "{not json",
        json.dumps({**GOOD_TASK, "task_id": "pack_missing", "solution": None}),
        json.dumps(
            {
                **GOOD_TASK,
                "task_id": "pack_presolved",
                "buggy_code": GOOD_TASK["solution"] + "# same\n",
            }
        ),
        json.dumps({**GOOD_TASK, "task_id": "pack_bad_tier", "difficulty": "extreme"}),
        json.dumps({**GOOD_TASK, "task_id": "pack_no_entry", "entry_point": "triple"}),
        json.dumps({**GOOD_TASK, "task_id": "pack_object", "hidden_tests": ["object()"]}),
        json.dumps(GOOD_TASK),
    ]
    (pack / "tasks.jsonl").write_text("\n".join(lines) + "\n")
    (pack / "broken.toml").write_text('task_id = "x"\ndifficulty = \n')
    return pack


def test_pack_loads_good_entries_and_reports_bad_ones(tmp_path: Path):
    registry = load_registry(str(write_pack(tmp_path)), corpus=None)
    assert "pack_double" in registry.tasks
    assert registry.tasks["pack_double"].source == "my-pack"
    reasons = {str(p) for p in registry.problems}
    jsonl = tmp_path / "pack" / "tasks.jsonl"

    def reported(fragment: str) -> bool:
        return any(fragment in reason for reason in reasons)

    assert reported(f"{jsonl}:2: invalid JSON")
    assert reported(f"{jsonl}:3 [pack_missing]: solution: Input should be a valid string")
    assert reported(f"{jsonl}:4 [pack_presolved]: buggy code passes every visible test")
    assert reported(f"{jsonl}:5 [pack_bad_tier]: difficulty: Input should be 'easy'")
    assert reported(f"{jsonl}:6 [pack_no_entry]: solution does not define entry_point")
    assert reported(f"{jsonl}:7 [pack_object]: hidden test 'object()' returns data that is not")
    assert reported(f"{jsonl}:8 [pack_double]: duplicate task_id")
    assert reported("broken.toml: invalid TOML")
    assert len(registry.problems) == 8
    assert len(registry.tasks) == len(list(BUILTIN_DIR.glob("*.toml"))) + 1


def test_missing_pack_path_is_reported(tmp_path: Path):
    registry = load_registry(str(tmp_path / "nowhere.jsonl"), corpus=None)
    assert [p.reason for p in registry.problems] == ["no such file or directory"]


def test_cli_validate_exits_nonzero_on_invalid(tmp_path: Path):
    env = {"TRACEFIX_TASKS": str(write_pack(tmp_path)), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "tracefix_rl.tasks", "validate", "--json", "--corpus", "none"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert len(report["invalid"]) == 8
    assert {"task_id", "source", "reason"} <= set(report["invalid"][0])
