"""Task registry: task files are data, validated on load and oracle-checked in the sandbox.

Sources: built-in curated tasks (``task_data/curated/*.toml``), ``TRACEFIX_TASKS`` packs (a
``.jsonl``/``.json``/``.toml`` file or a folder of them), and the generated corpus
(``task_data/generated/corpus.jsonl``, produced by ``python -m tracefix_rl.tasks generate``). Every
curated or imported task goes through the same checks:

1. schema (pydantic): required fields, difficulty, code and tests that parse;
2. oracle: the solution runs through the sandbox to produce the expected observation of
   every test (it must not time out, crash or return non-builtin data, and must agree with
   outputs the task gives), and the buggy code must fail at least one visible and at least
   one hidden test.

A task that fails a check is reported (file, line, reason) and skipped. Generated tasks were
validated when generated; they are loaded while their program is unchanged.
Command line: ``python -m tracefix_rl.tasks list|stats|validate|export|generate``.
"""

from tracefix_rl.tasks.oracle import evaluate, oracle_check, program_digest
from tracefix_rl.tasks.registry import (
    SPLITS,
    TaskRegistry,
    TaskSelectionError,
    get_registry,
    load_registry,
    split_of,
)
from tracefix_rl.tasks.schema import Task, TaskProblem, TaskSpec, TaskTest, parse_task
from tracefix_rl.tasks.sources import BUILTIN_DIR, GENERATED_CORPUS, TASKS_ENV

__all__ = [
    "BUILTIN_DIR", "GENERATED_CORPUS", "SPLITS", "TASKS_ENV", "Task", "TaskProblem",
    "TaskRegistry", "TaskSelectionError", "TaskSpec", "TaskTest", "evaluate", "get_registry",
    "load_registry", "oracle_check", "parse_task", "program_digest", "split_of",
]  # fmt: skip
