"""Task registry: task files are data, validated on load and oracle-checked in the sandbox.

Built-in tasks live in ``task_data/curated/*.toml``. ``TRACEFIX_TASKS`` names extra tasks:
a ``.jsonl`` file (one task per line), a ``.json`` file (one task or a list), a ``.toml``
file (one task), or a folder of such files. Every task goes through the same checks:

1. schema (pydantic): required fields, difficulty, code and tests that parse;
2. oracle: the solution runs through the sandbox to produce the expected observation of
   every test (it must not time out, crash or return non-builtin data), and the buggy code
   must fail at least one visible and at least one hidden test.

A task that fails a check is reported (file, line, reason) and skipped.
Run ``python -m tasks validate`` to check the registry from the command line.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import random
import sys
import threading
import tomllib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from judge import TIMEOUT_EXCEPTION, Verdict, expected_record, judge
from models import DIFFICULTIES, Difficulty
from sandbox import EvalRequest, EvalResult, SandboxBackend, get_sandbox

log = logging.getLogger("tracefix_rl.tasks")

BUILTIN_DIR = Path(__file__).resolve().parent / "task_data" / "curated"
TASKS_ENV = "TRACEFIX_TASKS"
TASK_FILE_SUFFIXES = (".toml", ".json", ".jsonl")
MAX_CODE_CHARS = 20_000
TEST_NAME_CHARS = 80


class TaskTestSpec(BaseModel):
    """A test given as a table with an explicit name."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=TEST_NAME_CHARS)
    code: str = Field(min_length=1)


class TaskSpec(BaseModel):
    """The on-disk schema of one task."""

    model_config = ConfigDict(extra="forbid")

    task_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
    difficulty: Difficulty
    description: str = Field(min_length=1)
    entry_point: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    buggy_code: str = Field(min_length=1, max_length=MAX_CODE_CHARS)
    solution: str = Field(min_length=1, max_length=MAX_CODE_CHARS)
    visible_tests: list[str | TaskTestSpec] = Field(min_length=1)
    hidden_tests: list[str | TaskTestSpec] = Field(min_length=1)
    bug_type: str = "unspecified"
    source: str = "imported"

    @field_validator("buggy_code", "solution")
    @classmethod
    def _code_parses(cls, code: str) -> str:
        try:
            ast.parse(code)
        except SyntaxError as exc:
            raise ValueError(f"does not parse: {exc.msg} (line {exc.lineno})") from None
        return code

    @field_validator("visible_tests", "hidden_tests")
    @classmethod
    def _tests_parse(cls, tests: list[str | TaskTestSpec]) -> list[str | TaskTestSpec]:
        for position, test in enumerate(tests, 1):
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
    """A test snippet with the name shown to the agent (visible tests only)."""

    __test__ = False  # not a pytest test class

    name: str
    code: str


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
    expected: tuple[dict[str, Any], ...] = ()
    buggy_visible_passed: int = 0
    buggy_all_passed: int = 0

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

    def __str__(self) -> str:
        who = f" [{self.task_id}]" if self.task_id else ""
        return f"{self.origin}{who}: {self.reason}"


class TaskSelectionError(ValueError):
    """Unknown task id or difficulty, or no task matching the filters."""


@dataclass
class TaskRegistry:
    """Validated tasks by id, plus the problems found while loading."""

    tasks: dict[str, Task] = field(default_factory=dict)
    problems: list[TaskProblem] = field(default_factory=list)

    def ids(self, difficulty: str | None = None) -> list[str]:
        return sorted(t for t, task in self.tasks.items() if difficulty in (None, task.difficulty))

    def get(self, task_id: str) -> Task:
        try:
            return self.tasks[task_id]
        except KeyError:
            raise TaskSelectionError(
                f"unknown task_id {task_id!r}; {len(self.tasks)} tasks are available "
                f"(GET /tasks lists them), e.g. {', '.join(self.ids()[:3])}"
            ) from None

    def select(
        self,
        seed: int | None = None,
        task_id: str | None = None,
        difficulty: str | None = None,
        rng: random.Random | None = None,
    ) -> Task:
        """Pick a task: by id, else deterministically from ``seed`` among the filtered ids."""
        if difficulty is not None and difficulty not in DIFFICULTIES:
            raise TaskSelectionError(
                f"unknown difficulty {difficulty!r}; use one of {', '.join(DIFFICULTIES)}"
            )
        if task_id is not None:
            task = self.get(task_id)
            if difficulty is not None and task.difficulty != difficulty:
                raise TaskSelectionError(f"task {task_id!r} is {task.difficulty}, not {difficulty}")
            return task
        candidates = self.ids(difficulty)
        if not candidates:
            raise TaskSelectionError(f"no tasks with difficulty {difficulty!r} are loaded")
        chooser = random.Random(seed) if seed is not None else (rng or random.Random())
        return self.tasks[chooser.choice(candidates)]


# ---------------------------------------------------------------------------
# Reading task files
# ---------------------------------------------------------------------------


def _task_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in TASK_FILE_SUFFIXES)
    return [path]


def _read_entries(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (origin, raw entry or exception) for every task entry in ``path``."""
    if not path.exists():
        yield str(path), FileNotFoundError("no such file or directory")
        return
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        yield str(path), exc
        return
    if path.suffix == ".toml":
        try:
            yield str(path), tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            yield str(path), ValueError(f"invalid TOML: {exc}")
    elif path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                origin = f"{path}:{number}"
                try:
                    yield origin, json.loads(line)
                except json.JSONDecodeError as exc:
                    yield origin, ValueError(f"invalid JSON: {exc.msg} (column {exc.colno})")
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            yield str(path), ValueError(f"invalid JSON: {exc.msg} (line {exc.lineno})")
            return
        items = data if isinstance(data, list) else [data]
        for number, item in enumerate(items):
            yield (f"{path}[{number}]" if isinstance(data, list) else str(path)), item
    else:
        yield (
            str(path),
            ValueError(
                f"unsupported file type {path.suffix!r}; use one of {', '.join(TASK_FILE_SUFFIXES)}"
            ),
        )


def _format_validation_error(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        parts.append(f"{where or 'entry'}: {error['msg']}")
    return "; ".join(parts)


def _tests(specs: Iterable[str | TaskTestSpec], prefix: str) -> tuple[TaskTest, ...]:
    tests = []
    for position, spec in enumerate(specs, 1):
        if isinstance(spec, TaskTestSpec):
            tests.append(TaskTest(spec.name, spec.code))
            continue
        source = spec.strip("\n")
        single = "\n" not in source.strip() and len(source.strip()) <= TEST_NAME_CHARS
        tests.append(TaskTest(source.strip() if single else f"{prefix}_{position}", source))
    return tuple(tests)


def _defines(code: str, name: str) -> bool:
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
    try:
        spec = TaskSpec.model_validate(raw)
    except ValidationError as exc:
        return TaskProblem(origin, _format_validation_error(exc), task_id)
    for label, code in (("solution", spec.solution), ("buggy_code", spec.buggy_code)):
        if not _defines(code, spec.entry_point):
            return TaskProblem(
                origin, f"{label} does not define entry_point {spec.entry_point!r}", task_id
            )
    if spec.buggy_code.strip() == spec.solution.strip():
        return TaskProblem(origin, "buggy_code is identical to solution", task_id)
    return Task(
        task_id=spec.task_id,
        difficulty=spec.difficulty,
        description=spec.description.strip(),
        entry_point=spec.entry_point,
        buggy_code=spec.buggy_code.strip("\n") + "\n",
        solution=spec.solution.strip("\n") + "\n",
        visible_tests=_tests(spec.visible_tests, "visible"),
        hidden_tests=_tests(spec.hidden_tests, "hidden"),
        bug_type=spec.bug_type,
        source=spec.source,
        origin=origin,
    )


# ---------------------------------------------------------------------------
# Oracle check
# ---------------------------------------------------------------------------


def evaluate(
    sandbox: SandboxBackend, code: str, tests: tuple[TaskTest, ...], **kw: Any
) -> EvalResult:
    """Run ``code`` against ``tests`` in the sandbox (returns the raw ``EvalResult``)."""
    return sandbox.run(EvalRequest(code=code, tests=tuple(t.code for t in tests), **kw))


def oracle_check(task: Task, sandbox: SandboxBackend) -> Task | TaskProblem:
    """Compute expected observations from the solution and check the buggy code fails."""
    tests = task.all_tests
    reference = evaluate(sandbox, task.solution, tests)
    records = {r.get("i"): r for r in reference.records}
    problems = []
    if reference.timed_out:
        problems.append("solution timed out")
    for index, test in enumerate(tests):
        record = records.get(index)
        kind = "visible" if index < len(task.visible_tests) else "hidden"
        if record is None:
            problems.append(f"solution produced no result for {kind} test {test.name!r}")
        elif record.get("e") in (TIMEOUT_EXCEPTION, "MemoryError", "RecursionError"):
            problems.append(f"solution hit {record['e']} on {kind} test {test.name!r}")
        elif "v" in record and _contains_unserializable(record["v"]):
            problems.append(
                f"{kind} test {test.name!r} returns data that is not builtin "
                f"({record['v']}); end the test with an expression of builtin types"
            )
    if problems:
        return TaskProblem(task.origin, "; ".join(problems), task.task_id)
    expected = tuple(expected_record(records[i]) for i in range(len(tests)))
    verdict: Verdict = judge(evaluate(sandbox, task.buggy_code, tests), expected)
    visible = len(task.visible_tests)
    visible_passed = sum(t.passed for t in verdict.tests[:visible])
    hidden_passed = sum(t.passed for t in verdict.tests[visible:])
    if visible_passed == visible:
        return TaskProblem(task.origin, "buggy code passes every visible test", task.task_id)
    if hidden_passed == len(task.hidden_tests):
        return TaskProblem(task.origin, "buggy code passes every hidden test", task.task_id)
    return Task(
        **{
            **task.__dict__,
            "expected": expected,
            "buggy_visible_passed": visible_passed,
            "buggy_all_passed": verdict.passed,
        }
    )


def _contains_unserializable(value: Any) -> bool:
    if type(value) is list:
        return any(_contains_unserializable(v) for v in value)
    if type(value) is dict:
        if value.get("t") == "unserializable":
            return True
        return _contains_unserializable(value.get("v"))
    return False


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def load_registry(
    extra: str | None = None,
    sandbox: SandboxBackend | None = None,
    builtin_dir: Path = BUILTIN_DIR,
) -> TaskRegistry:
    """Load built-in tasks plus ``extra`` (a file or folder), oracle-checking every task."""
    sandbox = sandbox or get_sandbox()
    sources = [builtin_dir] + ([Path(extra)] if extra else [])
    registry = TaskRegistry()
    parsed: list[Task] = []
    seen: set[str] = set()
    for source in sources:
        for path in _task_files(source):
            for origin, raw in _read_entries(path):
                item = parse_task(origin, raw)
                if isinstance(item, TaskProblem):
                    registry.problems.append(item)
                elif item.task_id in seen:
                    registry.problems.append(
                        TaskProblem(origin, "duplicate task_id (first one kept)", item.task_id)
                    )
                else:
                    seen.add(item.task_id)
                    parsed.append(item)
    workers = int(sandbox.describe().get("workers", 2))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="oracle") as pool:
        checked = list(pool.map(lambda t: oracle_check(t, sandbox), parsed))
    for item in checked:
        if isinstance(item, TaskProblem):
            registry.problems.append(item)
        else:
            registry.tasks[item.task_id] = item
    for problem in registry.problems:
        log.warning("task skipped: %s", problem)
    return registry


_registry: TaskRegistry | None = None
_registry_lock = threading.Lock()


def get_registry() -> TaskRegistry:
    """The process-wide registry (built-ins + ``TRACEFIX_TASKS``), loaded once."""
    global _registry
    with _registry_lock:
        if _registry is None:
            _registry = load_registry(os.environ.get(TASKS_ENV) or None)
            log.info("loaded %d tasks (%d skipped)", len(_registry.tasks), len(_registry.problems))
        return _registry


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["list", "validate"])
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    registry = load_registry(os.environ.get(TASKS_ENV) or None)
    if args.command == "list":
        rows = [
            {
                "task_id": t.task_id,
                "difficulty": t.difficulty,
                "bug_type": t.bug_type,
                "source": t.source,
            }
            for t in (registry.tasks[i] for i in registry.ids())
        ]
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for row in rows:
                print(
                    f"{row['task_id']:48} {row['difficulty']:7} {row['bug_type']:24} "
                    f"{row['source']}"
                )
        return 0
    invalid = [
        {"task_id": p.task_id, "source": p.origin, "reason": p.reason} for p in registry.problems
    ]
    if args.json:
        print(json.dumps({"valid": len(registry.tasks), "invalid": invalid}, indent=2))
    else:
        print(f"{len(registry.tasks)} valid, {len(invalid)} invalid")
        for problem in registry.problems:
            print(f"INVALID {problem}")
    return 1 if invalid else 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    sys.exit(_main())
