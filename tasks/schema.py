"""The task schema: what a task file holds, how it is validated, and the in-memory Task."""

from __future__ import annotations

import ast
import copy
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from tracefix_rl.sandbox import canonical
from tracefix_rl.tasks.vocabulary import Difficulty

MAX_CODE_CHARS = 20_000
TEST_NAME_CHARS = 80
SOURCE_CURATED = "curated"
SOURCE_GENERATED = "generated"
MAX_FLOAT_TOLERANCE = 0.5
Observe = Literal["value", "list"]


class TaskTestSpec(BaseModel):
    """A test given as a table with an explicit name."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=TEST_NAME_CHARS)
    code: str = Field(min_length=1)
    observe: Observe | None = None
    """Overrides the task's ``observe`` for this test."""


class CaseSpec(BaseModel):
    """A QuixBugs-style case: call ``entry_point(*input)``; ``output`` is cross-checked. An
    iterator it returns is observed as a list (as QuixBugs' own harness does)."""

    model_config = ConfigDict(extra="forbid")
    input: list[Any]
    output: Any = None


TestItem = str | TaskTestSpec | CaseSpec


class TaskSpec(BaseModel):
    """The on-disk schema of one task."""

    model_config = ConfigDict(extra="forbid")

    task_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
    difficulty: Difficulty
    description: str = Field(min_length=1)
    entry_point: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    buggy_code: str = Field(min_length=1, max_length=MAX_CODE_CHARS)
    solution: str = Field(min_length=1, max_length=MAX_CODE_CHARS)
    visible_tests: list[TestItem] | None = Field(default=None, min_length=1)
    hidden_tests: list[TestItem] | None = Field(default=None, min_length=1)
    tests: list[TestItem] | None = Field(default=None, min_length=2)
    """Instead of visible/hidden: the loader chooses about a third as visible."""
    bug_type: str = "unspecified"
    source: str = "imported"
    program: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
    observe: Observe = "value"
    float_tolerance: float | None = Field(default=None, gt=0, le=MAX_FLOAT_TOLERANCE)

    @model_validator(mode="after")
    def _one_way_of_giving_tests(self) -> TaskSpec:
        split = (self.visible_tests is not None, self.hidden_tests is not None)
        if self.tests is not None and any(split):
            raise ValueError("give either tests or visible_tests and hidden_tests, not both")
        if self.tests is None and not all(split):
            missing = [n for n, given in zip(("visible_tests", "hidden_tests"), split,
                                             strict=True) if not given]  # fmt: skip
            raise ValueError(f"{' and '.join(missing)} missing (or give one tests list)")
        return self

    @field_validator("buggy_code", "solution")
    @classmethod
    def _code_parses(cls, code: str) -> str:
        try:
            ast.parse(code)
        except SyntaxError as exc:
            raise ValueError(f"does not parse: {exc.msg} (line {exc.lineno})") from None
        return code

    @field_validator("visible_tests", "hidden_tests", "tests")
    @classmethod
    def _tests_parse(cls, tests: list[TestItem] | None) -> list[TestItem] | None:
        if tests is None:
            return None
        for position, test in enumerate(tests, 1):
            if isinstance(test, CaseSpec):
                continue
            source = test if isinstance(test, str) else test.code
            if not source.strip():
                raise ValueError(f"test {position} is empty")
            try:
                ast.parse(source)
            except SyntaxError as exc:
                raise ValueError(f"test {position} does not parse: {exc.msg}") from None
        return tests


@dataclass(frozen=True)
class TaskTest:
    """A test snippet, the name shown to the agent, and an optional given expected value
    (canonical form) that the solution must reproduce."""

    __test__ = False  # not a pytest test class

    name: str
    code: str
    given: Any = None
    has_given: bool = False
    observe_list: bool = False
    """An iterator value is observed as the list of what it yields."""


@dataclass(frozen=True)
class Task:
    """A validated task with its expected observations and baseline (buggy) results."""

    task_id: str
    difficulty: str
    description: str
    entry_point: str
    buggy_code: str
    solution: str
    visible_tests: tuple[TaskTest, ...]
    hidden_tests: tuple[TaskTest, ...]
    bug_type: str
    source: str
    origin: str
    program: str = ""
    split: str = ""
    features: dict[str, Any] = field(default_factory=dict)
    expected: tuple[dict[str, Any], ...] = ()
    buggy_visible_passed: int = 0
    buggy_all_passed: int = 0
    float_tolerance: float | None = None
    choose_visible: bool = False
    """The task gave one ``tests`` list (held in ``hidden_tests`` until the oracle check
    chooses the visible ones)."""
    buggy_passing: tuple[bool, ...] = ()
    """Whether the buggy code passes each test of ``all_tests`` (visible, then hidden), as the
    oracle check (or, for generated tasks, generation) measured it; empty when not measured
    (a corpus written before it stored them: the episode measures them at its first
    grading)."""

    @property
    def all_tests(self) -> tuple[TaskTest, ...]:
        return self.visible_tests + self.hidden_tests

    @property
    def expected_visible(self) -> tuple[dict[str, Any], ...]:
        return self.expected[: len(self.visible_tests)]


@dataclass(frozen=True)
class TaskProblem:
    """Why a task entry was rejected."""

    origin: str
    reason: str
    task_id: str | None = None
    source: str | None = None

    def __str__(self) -> str:
        who = f" [{self.task_id}]" if self.task_id else ""
        return f"{self.origin}{who}: {self.reason}"


def format_validation_error(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        parts.append(f"{where or 'entry'}: {error['msg']}")
    return "; ".join(parts)


def _assert_candidate(source: str, entry_point: str) -> TaskTest | None:
    """``assert candidate(...) == X`` (HumanEvalFix style) as a value test with X given."""
    try:
        tree = ast.parse(source.strip())
    except SyntaxError:
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
        return None
    test = tree.body[0].test
    uses_candidate = any(isinstance(n, ast.Name) and n.id == "candidate" for n in ast.walk(test))
    if not uses_candidate:
        return None
    expression, given = test, True
    if isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq):
        try:
            given = ast.literal_eval(test.comparators[0])
        except ValueError:
            return None
        expression = test.left
    elif isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        expression, given = test.operand, False
    call = ast.unparse(expression)
    code = f"candidate = {entry_point}\n{call}"
    if given is True or given is False:
        code = f"candidate = {entry_point}\nbool({call})"
    return TaskTest(shown_name(expression, entry_point), code, canonical(given), True)


def shown_name(node: ast.AST, entry_point: str) -> str:
    """A test's name as the agent sees it: the expression with ``candidate`` written as the
    entry point's name, at most ``TEST_NAME_CHARS`` long."""
    renamed = copy.deepcopy(node)
    for child in ast.walk(renamed):
        if isinstance(child, ast.Name) and child.id == "candidate":
            child.id = entry_point
    text = " ".join(ast.unparse(renamed).split())
    return text if len(text) <= TEST_NAME_CHARS else text[: TEST_NAME_CHARS - 3] + "..."


def convert_tests(
    items: Iterable[TestItem], entry_point: str, prefix: str, observe: Observe = "value"
) -> tuple[TaskTest, ...]:
    """Turn schema test items into TaskTests (JSON cases and assert lines included)."""
    tests = []
    as_list = observe == "list"
    for position, item in enumerate(items, 1):
        if isinstance(item, TaskTestSpec):
            own = as_list if item.observe is None else item.observe == "list"
            tests.append(TaskTest(item.name, item.code, observe_list=own))
            continue
        if isinstance(item, CaseSpec):
            call = f"{entry_point}({', '.join(repr(argument) for argument in item.input)})"
            name = call if len(call) <= TEST_NAME_CHARS else f"{prefix}_{position}"
            tests.append(TaskTest(name, call, canonical(item.output), True, observe_list=True))
            continue
        converted = _assert_candidate(item, entry_point)
        if converted is not None:
            tests.append(replace(converted, observe_list=as_list))
            continue
        source = item.strip("\n")
        single = "\n" not in source.strip() and len(source.strip()) <= TEST_NAME_CHARS
        name = source.strip() if single else f"{prefix}_{position}"
        tests.append(TaskTest(name, source, observe_list=as_list))
    return tuple(tests)


def defines(code: str, name: str) -> bool:
    """``code`` defines ``name`` at module level (function, class or assignment)."""
    tree = ast.parse(code)
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if node.name == name:
                return True
        elif isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            return True
    return False


def parse_task(origin: str, raw: Any) -> Task | TaskProblem:
    """Validate one raw entry against the schema (no code is run)."""
    if isinstance(raw, Exception):
        return TaskProblem(origin, str(raw))
    if not isinstance(raw, dict):
        return TaskProblem(origin, f"a task must be an object, got {type(raw).__name__}")
    task_id = raw.get("task_id") if isinstance(raw.get("task_id"), str) else None
    source = raw.get("source") if isinstance(raw.get("source"), str) else None
    try:
        spec = TaskSpec.model_validate(raw)
    except ValidationError as exc:
        return TaskProblem(origin, format_validation_error(exc), task_id, source)
    for label, code in (("solution", spec.solution), ("buggy_code", spec.buggy_code)):
        if not defines(code, spec.entry_point):
            return TaskProblem(
                origin, f"{label} does not define entry_point {spec.entry_point!r}", task_id,
                source,
            )  # fmt: skip
    if spec.buggy_code.strip() == spec.solution.strip():
        return TaskProblem(origin, "buggy_code is identical to solution", task_id, source)
    if spec.tests is not None:
        visible: tuple[TaskTest, ...] = ()
        hidden = convert_tests(spec.tests, spec.entry_point, "test", spec.observe)
    else:
        visible = convert_tests(spec.visible_tests or (), spec.entry_point, "visible", spec.observe)
        hidden = convert_tests(spec.hidden_tests or (), spec.entry_point, "hidden", spec.observe)
    return Task(
        task_id=spec.task_id,
        difficulty=spec.difficulty,
        description=spec.description.strip(),
        entry_point=spec.entry_point,
        buggy_code=spec.buggy_code.strip("\n") + "\n",
        solution=spec.solution.strip("\n") + "\n",
        visible_tests=visible,
        hidden_tests=hidden,
        bug_type=spec.bug_type,
        source=spec.source,
        origin=origin,
        program=spec.program or spec.task_id,
        float_tolerance=spec.float_tolerance,
        choose_visible=spec.tests is not None,
    )
