"""Seeded AST bug injector: mutants of the reference programs become validated tasks.

Mutations are spliced into the original source (comments and formatting survive):
operator and comparison flips, integer constants +-1, slice bounds, negated conditions and
``and``/``or`` swaps, swapped call arguments, deleted or duplicated statements, a wrong
variable, a changed return value; harder tasks combine two or three.

A mutant is kept only if it fails at least one visible and one hidden test, does not time
out on every test, and its normalized AST differs from every other kept task (the reference
passing every test is checked when the program is loaded). The same seed gives the same
corpus. Tiers come from measured features (see :func:`tier_of`).
"""

from __future__ import annotations

import ast
import copy
import difflib
import hashlib
import json
import math
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tracefix_rl.judge import Verdict
from tracefix_rl.sandbox import Limits, SandboxBackend
from tracefix_rl.tasks.oracle import buggy_verdict, check_buggy, program_digest
from tracefix_rl.tasks.schema import Task

GENERATOR_VERSION = 1
DEFAULT_SEED = 20261121
DEFAULT_PER_PROGRAM = 30
TOP_UP_SLACK = 1.25  # validate this many candidates per missing task in each round
EDIT_COUNTS, EDIT_WEIGHTS = (1, 2, 3), (6, 3, 1)
# Tight limits while validating mutants: reference tests run in milliseconds. A mutant with
# any timeout is rejected, so infinite loops never make the corpus depend on machine load.
VALIDATION_LIMITS = Limits(wall_s=0.5, per_test_s=0.1, cpu_s=2)

BINOP_FLIPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Add, ast.Div: ast.FloorDiv,
               ast.FloorDiv: ast.Div, ast.Mod: ast.FloorDiv}  # fmt: skip
COMPARE_FLIPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
                 ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In,
                 ast.Is: ast.IsNot, ast.IsNot: ast.Is}  # fmt: skip
BUG_TYPES = {
    "operator": "wrong_operator", "comparison": "wrong_comparison", "constant": "off_by_one",
    "slice": "wrong_slice", "negation": "inverted_condition", "swap_args": "swapped_arguments",
    "delete_statement": "missing_statement", "duplicate_statement": "duplicated_statement",
    "wrong_variable": "wrong_variable", "return_value": "wrong_return_value",
}  # fmt: skip
OPERATOR_PARENTS = (ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp)


@dataclass(frozen=True)
class Site:
    """One place a mutation can be applied: the kind and the node's position."""

    kind: str
    index: int  # position of the node in ast.walk order


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _local_names(function: ast.FunctionDef) -> list[str]:
    names = {a.arg for a in function.args.args + function.args.kwonlyargs}
    for node in ast.walk(function):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return sorted(names - {"self", "cls"})


def _enclosing_function(node: ast.AST, parents: dict) -> ast.FunctionDef | None:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.FunctionDef):
            return node
    return None


def _is_docstring(node: ast.AST, parents: dict) -> bool:
    parent = parents.get(node)
    body = getattr(parent, "body", None)
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str) and bool(body) and body[0] is node)  # fmt: skip


def find_sites(tree: ast.AST) -> list[Site]:
    """Every applicable mutation, in a deterministic order."""
    parents = _parents(tree)
    sites = []
    for index, node in enumerate(ast.walk(tree)):
        inside = _enclosing_function(node, parents) is not None
        if isinstance(node, ast.BinOp) and type(node.op) in BINOP_FLIPS:
            sites.append(Site("operator", index))
        elif (
            isinstance(node, ast.Compare)
            and len(node.ops) == 1
            and type(node.ops[0]) in COMPARE_FLIPS
        ):
            sites.append(Site("comparison", index))
        elif (isinstance(node, ast.Constant) and type(node.value) is int and abs(node.value) < 1000
              and inside):  # fmt: skip
            sites.append(Site("constant", index))
        elif isinstance(node, ast.Slice) and (node.lower or node.upper):
            sites.append(Site("slice", index))
        elif isinstance(node, ast.If | ast.While | ast.BoolOp):
            sites.append(Site("negation", index))
        elif (isinstance(node, ast.Call) and len(node.args) >= 2
              and not any(isinstance(a, ast.Starred) for a in node.args[:2])):  # fmt: skip
            sites.append(Site("swap_args", index))
        elif isinstance(node, ast.Return) and node.value is not None and inside:
            sites.append(Site("return_value", index))
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and inside:
            function = _enclosing_function(node, parents)
            if function is not None and node.id in _local_names(function):
                sites.append(Site("wrong_variable", index))
        if (isinstance(node, ast.Assign | ast.AugAssign | ast.Expr | ast.Return) and inside
                and not _is_docstring(node, parents)):  # fmt: skip
            sites.append(Site("delete_statement", index))
            if isinstance(node, ast.AugAssign | ast.Expr):
                sites.append(Site("duplicate_statement", index))
    return sites


def _offsets(lines: list[bytes], node: ast.AST) -> tuple[int, int]:
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    return (starts[node.lineno - 1] + node.col_offset,
            starts[node.end_lineno - 1] + node.end_col_offset)  # fmt: skip


def _replace(source: str, node: ast.AST, new: ast.AST, parents: dict) -> str:
    text = ast.unparse(new)
    if isinstance(new, OPERATOR_PARENTS) and isinstance(parents.get(node), OPERATOR_PARENTS):
        text = f"({text})"
    data = source.encode()
    start, end = _offsets(data.splitlines(keepends=True), node)
    return (data[:start] + text.encode() + data[end:]).decode()


def _statement_lines(source: str, node: ast.stmt) -> tuple[list[str], int, int] | None:
    lines = source.splitlines(keepends=True)
    first, last = node.lineno - 1, node.end_lineno - 1
    if lines[first][: node.col_offset].strip():  # shares its line with other code
        return None
    return lines, first, last


def apply(source: str, site: Site, rng: random.Random) -> str | None:
    """``source`` with the mutation at ``site`` applied (None if it does not apply)."""
    tree = ast.parse(source)
    parents = _parents(tree)
    node = list(ast.walk(tree))[site.index]
    new = copy.deepcopy(node)
    kind = site.kind
    if kind == "operator":
        new.op = BINOP_FLIPS[type(node.op)]()
    elif kind == "comparison":
        new.ops = [COMPARE_FLIPS[type(node.ops[0])]()]
    elif kind == "constant":
        new.value = node.value + rng.choice((-1, 1))
    elif kind == "slice":
        bound = rng.choice([b for b in ("lower", "upper") if getattr(node, b) is not None])
        value = getattr(node, bound)
        shifted = ast.BinOp(value, rng.choice((ast.Add(), ast.Sub())), ast.Constant(1))
        setattr(new, bound, shifted if rng.random() < 0.7 else None)
    elif kind == "negation":
        if isinstance(node, ast.BoolOp):
            new.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        else:
            return _replace(source, node.test, ast.UnaryOp(ast.Not(), node.test), parents)
    elif kind == "swap_args":
        new.args[0], new.args[1] = new.args[1], new.args[0]
    elif kind == "return_value":
        function = _enclosing_function(node, parents)
        names = [n for n in _local_names(function) if ast.unparse(node.value) != n]
        if names and rng.random() < 0.6:
            return _replace(source, node.value, ast.Name(rng.choice(names)), parents)
        return _replace(source, node.value, ast.Constant(None), parents)
    elif kind == "wrong_variable":
        others = [n for n in _local_names(_enclosing_function(node, parents)) if n != node.id]
        if not others:
            return None
        new.id = rng.choice(others)
    elif kind in ("delete_statement", "duplicate_statement"):
        found = _statement_lines(source, node)
        if found is None:
            return None
        lines, first, last = found
        block = lines[first : last + 1]
        if kind == "duplicate_statement":
            return "".join(lines[: last + 1] + block + lines[last + 1 :])
        body = getattr(parents[node], "body", [])
        siblings = [s for s in body if s is not node and not _is_docstring(s, parents)]
        replacement = [] if siblings else [" " * node.col_offset + "pass\n"]
        return "".join(lines[:first] + replacement + lines[last + 1 :])
    return _replace(source, node, new, parents)


def normalized(source: str) -> str:
    """The AST without positions (comments and formatting do not count)."""
    return ast.dump(ast.parse(source), annotate_fields=False, include_attributes=False)


def mutate(solution: str, rng: random.Random) -> tuple[str, list[str]] | None:
    """Apply 1-3 random mutations; returns (code, kinds) or None."""
    count = rng.choices(EDIT_COUNTS, EDIT_WEIGHTS)[0]
    code, kinds = solution, []
    for _ in range(count):
        sites = find_sites(ast.parse(code))
        if not sites:
            return None
        site = rng.choice(sites)
        try:
            mutated = apply(code, site, rng)
            if mutated is None:
                return None
            ast.parse(mutated)
        except (SyntaxError, ValueError, IndexError, AttributeError, TypeError):
            return None
        code = mutated
        kinds.append(site.kind)
    return code, kinds


def features_of(program: Task, code: str, edits: list[str], visible_failing: int) -> dict:
    changed = sum(1 for line in difflib.ndiff(program.solution.splitlines(), code.splitlines())
                  if line.startswith(("- ", "+ ")))  # fmt: skip
    return {
        "edits": len(edits),
        "kinds": edits,
        "visible_failing": visible_failing,
        "visible_total": len(program.visible_tests),
        "fix_lines": changed,
        "program_lines": len(program.solution.strip().splitlines()),
    }


def difficulty_points(features: dict[str, Any]) -> int:
    """Points that make a generated task harder (the tier rule, documented in docs/tasks.md):
    +2 per edit beyond the first; +2 if exactly one visible test fails, +1 if at most half
    fail; +1 if the fix spans more than two changed lines; +1 for programs over 25 lines and
    +1 more over 45."""
    points = 2 * (features["edits"] - 1)
    failing, total = features["visible_failing"], features["visible_total"]
    points += 2 if failing == 1 else 1 if failing * 2 <= total else 0
    points += 1 if features["fix_lines"] > 2 else 0
    points += (features["program_lines"] > 25) + (features["program_lines"] > 45)
    return points


def tier_of(features: dict[str, Any]) -> str:
    """easy: 0-1 points, medium: 2-3, hard: 4 or more."""
    points = difficulty_points(features)
    return "easy" if points <= 1 else "medium" if points <= 3 else "hard"


def _task_id(program: str, code: str) -> str:
    return f"gen-{program}-{hashlib.sha256(normalized(code).encode()).hexdigest()[:8]}"


def _candidates(program: Task, seed: int, seen: set[str], limit: int):
    """Distinct mutants of ``program`` in a deterministic order (a generator)."""
    rng = random.Random(f"{seed}:{program.program}")
    for _ in range(limit):
        result = mutate(program.solution, rng)
        if result is None:
            continue
        code, kinds = result
        key = normalized(code)
        if key not in seen:
            seen.add(key)
            yield code, kinds


def _rejection(program: Task, verdict: Verdict) -> str | None:
    if verdict.timed_out or any((t.detail or "").startswith("timed out") for t in verdict.tests):
        return "timed out"
    return check_buggy(program, verdict)


def generate(programs: list[Task], sandbox: SandboxBackend, seed: int = DEFAULT_SEED,
             per_program: int = DEFAULT_PER_PROGRAM,
             progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Generate and validate mutants of every program; returns corpus entries (dicts).

    Validation runs in rounds over all programs at once: each round validates, per program,
    only as many new candidates as it still needs (plus some slack); the first valid
    candidates in generation order are kept, so the result does not depend on timing.
    """
    ordered = sorted(programs, key=lambda p: p.program)
    seen = {normalized(p.solution) for p in ordered}
    streams = {p.program: _candidates(p, seed, seen, per_program * 40) for p in ordered}
    accepted: dict[str, list[tuple[int, str, list[str], Verdict]]] = {
        p.program: [] for p in ordered
    }
    position = {p.program: 0 for p in ordered}
    workers = int(sandbox.describe().get("workers", 2))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while True:
            batch = []
            for program in ordered:
                missing = per_program - len(accepted[program.program])
                for _ in range(math.ceil(missing * TOP_UP_SLACK) if missing > 0 else 0):
                    candidate = next(streams[program.program], None)
                    if candidate is None:
                        break
                    batch.append((program, position[program.program], *candidate))
                    position[program.program] += 1
            if not batch:
                break
            verdicts = pool.map(
                lambda c: buggy_verdict(c[0], c[2], sandbox, VALIDATION_LIMITS), batch
            )
            for (program, order, code, kinds), verdict in zip(batch, verdicts, strict=True):
                if _rejection(program, verdict) is None:
                    accepted[program.program].append((order, code, kinds, verdict))
            if progress:
                done = sum(min(len(a), per_program) for a in accepted.values())
                progress(f"validated {len(batch)} candidates; {done} tasks kept so far")
    corpus = []
    for program in ordered:
        for _, code, kinds, verdict in sorted(accepted[program.program])[:per_program]:
            visible = len(program.visible_tests)
            visible_passed = sum(t.passed for t in verdict.tests[:visible])
            features = features_of(program, code, kinds, visible - visible_passed)
            corpus.append({
                "task_id": _task_id(program.program, code),
                "program": program.program,
                "program_digest": program_digest(program),
                "difficulty": tier_of(features),
                "bug_type": BUG_TYPES[kinds[0]] if len(kinds) == 1 else "multiple",
                "features": features,
                "visible_passed": visible_passed,
                "all_passed": verdict.passed,
                "passing": "".join("1" if t.passed else "0" for t in verdict.tests),
                "buggy_code": code,
            })  # fmt: skip
    return corpus


def write_corpus(path: Path, corpus: list[dict[str, Any]], seed: int, per_program: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"generator_version": GENERATOR_VERSION, "seed": seed,
              "per_program": per_program, "count": len(corpus)}  # fmt: skip
    lines = [json.dumps({"corpus": header})] + [json.dumps(entry) for entry in corpus]
    path.write_text("\n".join(lines) + "\n")


def read_corpus(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    if not path.exists():
        return {}, []
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])["corpus"] if lines else {}
    return header, [json.loads(line) for line in lines[1:] if line.strip()]
