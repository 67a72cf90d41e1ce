"""Importers: public benchmarks converted into task packs (``TRACEFIX_TASKS`` files).

``python -m tracefix_rl.tasks import quixbugs DIR -o PACK.jsonl`` and ``... import
humanevalpack FILE -o PACK.jsonl``. An importer turns each benchmark problem into a
:class:`Draft` (a pack entry with a single ``tests`` list, or why none could be made); then
:func:`finish` checks every draft the way the loader will:

1. each test is run alone against the reference solution, and dropped (with its reason)
   when the solution does not give a value in time, or gives one that disagrees with the
   value the benchmark states (compared in JSON's terms, see ``judge.json_equal``);
2. the remaining tests go through the loader's oracle check (``tasks.oracle.oracle_check``),
   which chooses the visible third and requires a failing visible and hidden test;
3. the tier comes from the same measured features as generated tasks (``tier_of``).

Only entries that pass are written, so the pack loads without a skipped task; the report
says, per problem, what was kept and why anything was dropped. Nothing here is written from
a benchmark's data: importers read the user's copy, laid out as the benchmark publishes it.
"""

from __future__ import annotations

import difflib
import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tracefix_rl.sandbox import SandboxBackend
from tracefix_rl.tasks.generate import features_of, tier_of
from tracefix_rl.tasks.oracle import oracle_check, reference_run
from tracefix_rl.tasks.schema import Task, TaskProblem, TaskTest, parse_task

PLACEHOLDER_TIER = "medium"  # replaced by the measured tier before an entry is written
IMPORTED_EDIT = "imported"  # the kind of each hunk of an imported fix, in the tier features


@dataclass
class Draft:
    """One benchmark problem: the pack entry made from it (``entry`` with a ``tests``
    list), or ``dropped`` saying why none was; ``notes`` on what conversion left out."""

    name: str
    entry: dict[str, Any] | None = None
    dropped: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    """What became of one draft: the entry written (None if dropped) and the report row."""

    name: str
    entry: dict[str, Any] | None
    row: dict[str, Any]


def test_problems(task: Task, sandbox: SandboxBackend) -> list[str | None]:
    """Per test of ``task`` (all in ``hidden_tests``): why its solution fails it (no value
    in time, an exception, or a value disagreeing with the one given), or None. Each test
    runs alone, so one slow test cannot starve the others of the run's time."""

    def problem(test: TaskTest) -> str | None:
        single = replace(task, visible_tests=(), hidden_tests=(test,))
        expected = reference_run(single, sandbox)
        if isinstance(expected, str):
            return expected
        if "e" in expected[0]:
            return f"the solution raises {expected[0]['e']}"
        return None

    workers = int(sandbox.describe().get("workers", 2))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="import") as pool:
        return list(pool.map(problem, task.hidden_tests))


def _features(task: Task) -> dict[str, Any]:
    """The tier features of a checked task, as ``tasks.generate.features_of`` measures a
    mutant's; its edits are the fix's separate hunks."""
    buggy, fixed = task.buggy_code.splitlines(), task.solution.splitlines()
    opcodes = difflib.SequenceMatcher(None, buggy, fixed, autojunk=False).get_opcodes()
    hunks = sum(1 for op in opcodes if op[0] != "equal")
    visible = len(task.visible_tests)
    failing = sum(not passed for passed in task.buggy_passing[:visible])
    return features_of(task, task.buggy_code, [IMPORTED_EDIT] * max(1, hunks), failing)


def check_draft(draft: Draft, sandbox: SandboxBackend) -> Outcome:
    """Run the checks above on one draft."""
    row: dict[str, Any] = {"problem": draft.name, "kept": False, "notes": list(draft.notes)}
    if draft.entry is None:
        row["reason"] = draft.dropped or "not converted"
        return Outcome(draft.name, None, row)
    entry = {**draft.entry, "difficulty": PLACEHOLDER_TIER}
    row["task_id"] = entry.get("task_id")
    if len(entry["tests"]) < 2:
        row["reason"] = (f"{len(entry['tests'])} test after conversion; a task needs at least "
                         "2 (a visible and a hidden one)")  # fmt: skip
        return Outcome(draft.name, None, row)
    parsed = parse_task(draft.name, entry)
    if isinstance(parsed, TaskProblem):
        row["reason"] = parsed.reason
        return Outcome(draft.name, None, row)
    problems = test_problems(parsed, sandbox)
    tests = parsed.hidden_tests
    kept = [i for i, problem in enumerate(problems) if problem is None]
    row["notes"] += [f"test {tests[i].name!r} dropped: {problem}"
                     for i, problem in enumerate(problems) if problem]  # fmt: skip
    row.update(tests=len(kept), tests_dropped=len(tests) - len(kept))
    if len(kept) < 2:
        row["reason"] = f"{len(kept)} of {len(tests)} tests usable; at least 2 needed"
        return Outcome(draft.name, None, row)
    pruned = replace(parsed, hidden_tests=tuple(tests[i] for i in kept))
    checked = oracle_check(pruned, sandbox)
    if isinstance(checked, TaskProblem):
        row["reason"] = checked.reason
        return Outcome(draft.name, None, row)
    tier = tier_of(_features(checked))
    kept_items = [entry["tests"][i] for i in kept]
    visible = len(checked.visible_tests)
    if all(checked.buggy_passing[visible:]):
        row["notes"].append(f"the buggy code fails 1 of {len(checked.all_tests)} tests: it is "
                            "visible, and every hidden test passes on the buggy code")  # fmt: skip
    row.update(kept=True, difficulty=tier, visible=visible,
               buggy_visible_failing=visible - checked.buggy_visible_passed)  # fmt: skip
    return Outcome(draft.name, {**entry, "difficulty": tier, "tests": kept_items}, row)


def finish(
    drafts: list[Draft],
    sandbox: SandboxBackend,
    output: Path,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Check every draft, write the kept entries to ``output`` (JSONL) and return the
    report rows (one per draft, in order)."""
    done = [0]
    lock = threading.Lock()

    def check(draft: Draft) -> Outcome:
        outcome = check_draft(draft, sandbox)
        if progress is not None:
            state = "kept" if outcome.entry is not None else f"dropped: {outcome.row['reason']}"
            with lock:
                done[0] += 1
                progress(f"[{done[0]}/{len(drafts)}] {draft.name}: {state}")
        return outcome

    workers = int(sandbox.describe().get("workers", 2))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="import-task") as pool:
        outcomes = list(pool.map(check, drafts))
    output.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(o.entry) + "\n" for o in outcomes if o.entry is not None]
    output.write_text("".join(lines), encoding="utf-8")
    return [o.row for o in outcomes]


def slug(text: str) -> str:
    """``text`` as an id part: lowercase letters, digits and ``_``."""
    cleaned = "".join(c if c.isalnum() else "_" for c in text.strip().lower())
    return "_".join(part for part in cleaned.split("_") if part) or "unspecified"


def _quixbugs(path: Path) -> tuple[list[Draft], list[str]]:
    from tracefix_rl.tasks.importers import quixbugs

    return quixbugs.drafts(path)


def _humanevalpack(path: Path) -> tuple[list[Draft], list[str]]:
    from tracefix_rl.tasks.importers import humanevalpack

    return humanevalpack.drafts(path), []


IMPORTERS: dict[str, Callable[[Path], tuple[list[Draft], list[str]]]] = {
    "quixbugs": _quixbugs,
    "humanevalpack": _humanevalpack,
}
"""Benchmark name -> reader of its published layout: (drafts, problems skipped unread)."""
