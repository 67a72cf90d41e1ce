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

The names below are imported on first use (``from tracefix_rl.tasks import Task``), so that
importing one module of the package, such as :mod:`.vocabulary`, imports nothing else.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "evaluate": "oracle", "oracle_check": "oracle", "program_digest": "oracle",
    "TaskRegistry": "registry", "TaskSelectionError": "registry", "get_registry": "registry",
    "load_registry": "registry", "split_of": "registry",
    "Task": "schema", "TaskProblem": "schema", "TaskSpec": "schema", "TaskTest": "schema",
    "parse_task": "schema",
    "BUILTIN_DIR": "sources", "GENERATED_CORPUS": "sources", "TASKS_ENV": "sources",
    "DIFFICULTIES": "vocabulary", "SPLITS": "vocabulary", "Difficulty": "vocabulary",
    "Split": "vocabulary",
}  # fmt: skip

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
