"""HumanEvalFix (HumanEvalPack, Python; Muennighoff et al., 2023) as drafts: one per row.

A row of the HumanEvalPack Python JSONL has ``task_id`` (``Python/N``), ``declaration``
(imports, helpers and the signature), ``buggy_solution`` and ``canonical_solution`` (the
body), ``docstring``, ``entry_point``, ``bug_type`` and ``test``: a module defining
``check(candidate)`` whose body asserts on ``candidate(...)``, then calling it (the
published rows name the parameter after the entry point, ``def check(has_close_elements)``;
whatever its name, it is read as ``candidate``). Optional:
``example_test`` (the docstring's examples, in the same form) and ``import``.

The program is ``declaration`` + body, as HumanEvalFix presents it; the description is the
docstring. Each assert in ``check`` becomes a test:

* ``assert candidate(...) == value`` (or ``assert candidate(...)`` / ``assert not ...``)
  becomes the call, ``value`` cross-checked against the solution;
* any other assert becomes a test that runs it and then observes ``True``, so the buggy
  code fails it by raising ``AssertionError`` (or anything else);
* a loop or block holding asserts becomes one such test;
* other statements (imports, assignments) run before every later test, as they did before
  the asserts that follow them; asserts that do not involve ``candidate`` are left out.

The docstring's example asserts are added when ``test`` does not have them already (when
``example_test`` parses: one published row's does not).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

from tracefix_rl.tasks.importers import Draft, slug
from tracefix_rl.tasks.schema import shown_name
from tracefix_rl.tasks.sources import json_lines

SOURCE = "humanevalfix"
REQUIRED = ("task_id", "declaration", "buggy_solution", "canonical_solution", "test",
            "entry_point")  # fmt: skip
CHECK_FUNCTION = "check"
CANDIDATE = "candidate"
METADATA_NAME = "METADATA"


class _AsCandidate(ast.NodeTransformer):
    """Renames ``check``'s parameter to ``candidate`` (the loader's name for the function
    under test)."""

    def __init__(self, parameter: str) -> None:
        self.parameter = parameter

    def visit_Name(self, node: ast.Name) -> ast.Name:  # noqa: N802 - ast's visitor name
        if node.id == self.parameter:
            return ast.copy_location(ast.Name(id=CANDIDATE, ctx=node.ctx), node)
        return node


def _uses_candidate(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Name) and n.id == "candidate" for n in ast.walk(node))


def _has_assert(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Assert) for n in ast.walk(node))


def _simple_assert(node: ast.Assert) -> bool:
    """``assert candidate(...) [== literal]`` / ``assert not candidate(...)``: the loader
    turns these into the call with a given value."""
    test = node.test
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        test = test.operand
    if isinstance(test, ast.Compare):
        if len(test.ops) != 1 or not isinstance(test.ops[0], ast.Eq):
            return False
        try:
            ast.literal_eval(test.comparators[0])
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return False
        test = test.left
    return isinstance(test, ast.Call) and _uses_candidate(test)


def tests_from_check(source: str, entry_point: str) -> tuple[list[Any], list[str]]:
    """Pack test items from a HumanEval ``test`` module, and notes on what was left out."""
    tree = ast.parse(source)
    prelude: list[str] = []
    check = None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == CHECK_FUNCTION:
            check = node
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            continue  # check(entry_point)
        elif isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == METADATA_NAME for t in node.targets
        ):
            continue
        else:
            prelude.append(ast.unparse(node))
    if check is None or not check.args.args:
        raise ValueError(f"no def {CHECK_FUNCTION}(candidate) in the test")
    check = _AsCandidate(check.args.args[0].arg).visit(check)
    items: list[Any] = []
    notes: list[str] = []
    bind = f"candidate = {entry_point}"
    for node in check.body:
        if not _has_assert(node):
            prelude.append(ast.unparse(node))
            continue
        if not _uses_candidate(node):
            notes.append(f"left out (does not call candidate): {shown_name(node, entry_point)}")
            continue
        if isinstance(node, ast.Assert) and _simple_assert(node) and not prelude:
            items.append(f"assert {ast.unparse(node.test)}")
            continue
        statement = ast.unparse(ast.Assert(test=node.test)) if isinstance(
            node, ast.Assert) else ast.unparse(node)  # fmt: skip
        name = shown_name(node.test if isinstance(node, ast.Assert) else node, entry_point)
        code = "\n".join([bind, *prelude, statement, "True"])
        items.append({"name": name, "code": code})
    return items, notes


def _key(item: Any) -> str:
    return item if isinstance(item, str) else item["code"]


def draft(row: dict[str, Any]) -> Draft:
    """The draft of one HumanEvalPack row."""
    name = str(row.get("task_id", "?"))
    missing = [f for f in REQUIRED if not isinstance(row.get(f), str)]
    if missing:
        return Draft(name, dropped=f"missing field(s): {', '.join(missing)}")
    entry_point = row["entry_point"]
    header = row["declaration"]
    imports = row.get("import") or ""
    if imports.strip() and imports.strip() not in header:
        header = imports.rstrip("\n") + "\n" + header
    try:
        items, notes = tests_from_check(row["test"], entry_point)
        if isinstance(row.get("example_test"), str) and row["example_test"].strip():
            try:
                examples, _ = tests_from_check(row["example_test"], entry_point)
            except (SyntaxError, ValueError) as exc:
                examples = []
                notes.append(f"docstring examples left out: example_test does not parse ({exc})")
            present = {_key(item) for item in items}
            added = [item for item in examples if _key(item) not in present]
            items += added
            if added:
                notes.append(f"{len(added)} docstring example(s) added as tests")
    except SyntaxError as exc:
        return Draft(name, dropped=f"test does not parse: {exc.msg}")
    except ValueError as exc:
        return Draft(name, dropped=str(exc))
    number = name.rsplit("/", 1)[-1]
    docstring = (row.get("docstring") or "").strip()
    entry: dict[str, Any] = {
        "task_id": f"{SOURCE}-{slug(number)}",
        "description": docstring or f"Fix {entry_point} so that it passes its tests.",
        "entry_point": entry_point,
        "buggy_code": header + row["buggy_solution"],
        "solution": header + row["canonical_solution"],
        "tests": items,
        "bug_type": slug(row.get("bug_type") or "unspecified"),
        "source": SOURCE,
        "program": f"{SOURCE}-{slug(number)}",
    }
    return Draft(name, entry, notes=notes)


def drafts(path: Path) -> list[Draft]:
    """A draft per row of the JSONL file at ``path`` (rows that are not JSON objects are
    drafts dropped with the reason)."""
    result = []
    for number, row in json_lines(path.read_text(encoding="utf-8")):
        if isinstance(row, json.JSONDecodeError):
            result.append(Draft(f"line {number}", dropped=f"invalid JSON: {row.msg}"))
            continue
        if not isinstance(row, dict):
            result.append(Draft(f"line {number}", dropped="not a JSON object"))
            continue
        result.append(draft(row))
    return result
