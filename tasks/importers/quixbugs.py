"""QuixBugs (Lin et al., 2017) as drafts: one per Python program that has JSON test cases.

A QuixBugs checkout holds ``python_programs/NAME.py`` (the buggy program: one function
``NAME`` with one defect, its description in a module-level string after it),
``correct_python_programs/NAME.py`` (the fix) and ``json_testcases/NAME.json`` (one case a
line: ``[[arguments...], expected]``). The graph programs have Python test files instead of
JSON cases and are reported as skipped.

Each case becomes a ``{"input": [...], "output": ...}`` test: called as ``NAME(*arguments)``,
an iterator result observed as a list (QuixBugs' harness lists generators), the expected
output cross-checked against the correct program in JSON's terms (so tuples match JSON
arrays). Floats in the expected outputs get ``float_tolerance`` (QuixBugs compares them
approximately). A buggy program that loops forever stays: time-outs are what the agent sees.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

from tracefix_rl.tasks.importers import Draft
from tracefix_rl.tasks.sources import json_lines

SOURCE = "quixbugs"
FOLDERS = ("python_programs", "correct_python_programs", "json_testcases")
FLOAT_TOLERANCE = 0.01
"""For a program whose expected outputs hold floats: QuixBugs' published outputs were
computed by another implementation (the Java one), within the programs' own epsilons."""


class QuixBugsLayoutError(ValueError):
    """The folder is not a QuixBugs checkout."""


def description_of(code: str, name: str) -> str:
    """The program's module-level string (QuixBugs puts the spec after the function), else a
    one-line spec."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        tree = None
    for node in tree.body if tree else ():
        value = node.value.value if isinstance(node, ast.Expr) and isinstance(
            node.value, ast.Constant) else None  # fmt: skip
        if isinstance(value, str) and value.strip():
            return value.strip()
    return f"Fix {name} so that it passes its tests."


def _cases(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The cases of one JSON test file and notes on the lines that are not cases."""
    cases, notes = [], []
    for number, case in json_lines(path.read_text(encoding="utf-8")):
        if isinstance(case, json.JSONDecodeError):
            notes.append(f"{path.name} line {number} skipped: invalid JSON ({case.msg})")
            continue
        if not (isinstance(case, list) and len(case) == 2):
            notes.append(f"{path.name} line {number} skipped: not [arguments, expected]")
            continue
        arguments, expected = case
        if not isinstance(arguments, list):
            arguments = [arguments]
        cases.append({"input": arguments, "output": expected})
    return cases, notes


def _has_float(value: Any) -> bool:
    if isinstance(value, float):
        return True
    if isinstance(value, list):
        return any(_has_float(v) for v in value)
    if isinstance(value, dict):
        return any(_has_float(v) for v in value.values())
    return False


def draft(root: Path, name: str) -> Draft:
    """The draft of program ``name`` in the checkout at ``root``."""
    buggy_path = root / "python_programs" / f"{name}.py"
    fixed_path = root / "correct_python_programs" / f"{name}.py"
    for path in (buggy_path, fixed_path):
        if not path.is_file():
            return Draft(name, dropped=f"{path.relative_to(root)} is missing")
    buggy = buggy_path.read_text(encoding="utf-8")
    fixed = fixed_path.read_text(encoding="utf-8")
    cases, notes = _cases(root / "json_testcases" / f"{name}.json")
    if not cases:
        return Draft(name, dropped="no test cases in its JSON file", notes=notes)
    entry: dict[str, Any] = {
        "task_id": f"{SOURCE}-{name}",
        "description": description_of(buggy, name),
        "entry_point": name,
        "buggy_code": buggy,
        "solution": fixed,
        "tests": cases,
        "bug_type": "unspecified",
        "source": SOURCE,
        "program": f"{SOURCE}-{name}",
    }
    if any(_has_float(case["output"]) for case in cases):
        entry["float_tolerance"] = FLOAT_TOLERANCE
        notes.append(f"floats compared within {FLOAT_TOLERANCE} (relative, absolute near 0)")
    return Draft(name, entry, notes=notes)


def drafts(root: Path) -> tuple[list[Draft], list[str]]:
    """A draft per program with JSON cases, and the programs skipped for having none."""
    missing = [folder for folder in FOLDERS if not (root / folder).is_dir()]
    if missing:
        raise QuixBugsLayoutError(
            f"{root} is not a QuixBugs checkout: no {', '.join(f'{m}/' for m in missing)}"
        )
    with_cases = sorted(p.stem for p in (root / "json_testcases").glob("*.json"))
    programs = sorted(p.stem for p in (root / "python_programs").glob("*.py"))
    helpers = {"node"}  # the graph programs' Node class
    skipped = [name for name in programs if name not in with_cases
               and not name.endswith("_test") and name not in helpers]  # fmt: skip
    return [draft(root, name) for name in with_cases], skipped
