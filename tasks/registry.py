"""The task registry: curated, imported and generated tasks; splits; deterministic selection."""

from __future__ import annotations

import hashlib
import logging
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tracefix_rl.sandbox import SandboxBackend, get_sandbox
from tracefix_rl.settings import Settings, environment_settings
from tracefix_rl.tasks.generate import read_corpus
from tracefix_rl.tasks.oracle import oracle_check, program_digest
from tracefix_rl.tasks.schema import SOURCE_GENERATED, Task, TaskProblem, parse_task
from tracefix_rl.tasks.sources import (
    BUILTIN_DIR,
    GENERATED_CORPUS,
    read_entries,
    task_files,
)
from tracefix_rl.tasks.vocabulary import DIFFICULTIES, SPLITS

log = logging.getLogger("tracefix_rl.tasks")

EVAL_SHARE = 5  # one program in five (by hash) is held out for evaluation


def split_of(program: str) -> str:
    """``train`` or ``eval``, from a hash of the program id: stable across versions."""
    bucket = int(hashlib.sha256(program.encode()).hexdigest()[:8], 16) % EVAL_SHARE
    return "eval" if bucket == 0 else "train"


class TaskSelectionError(ValueError):
    """Unknown task id, difficulty or split, or no task matching the filters."""


@dataclass
class TaskRegistry:
    """Validated tasks by id, plus the problems found while loading."""

    tasks: dict[str, Task] = field(default_factory=dict)
    problems: list[TaskProblem] = field(default_factory=list)

    def ids(self, difficulty: str | None = None, split: str | None = None,
            source: str | None = None) -> list[str]:  # fmt: skip
        return sorted(
            task_id for task_id, task in self.tasks.items()
            if difficulty in (None, task.difficulty) and split in (None, task.split)
            and source in (None, task.source)
        )  # fmt: skip

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
        split: str | None = None,
        index: int | None = None,
    ) -> Task:
        """Pick a task: by id; else the ``index``-th of the filtered ids (in ``ids`` order, as
        the Task API lists them); else deterministically from ``seed`` among them."""
        if difficulty is not None and difficulty not in DIFFICULTIES:
            raise TaskSelectionError(
                f"unknown difficulty {difficulty!r}; use one of {', '.join(DIFFICULTIES)}"
            )
        if split is not None and split not in SPLITS:
            raise TaskSelectionError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        if task_id is not None:
            task = self.get(task_id)
            for name, wanted, actual in (("difficulty", difficulty, task.difficulty),
                                         ("split", split, task.split)):  # fmt: skip
                if wanted is not None and actual != wanted:
                    raise TaskSelectionError(f"task {task_id!r} has {name} {actual}, not {wanted}")
            return task
        candidates = self.ids(difficulty, split)
        if not candidates:
            raise TaskSelectionError(
                f"no tasks with difficulty {difficulty!r} and split {split!r} are loaded"
            )
        if index is not None:
            if not 0 <= index < len(candidates):
                raise TaskSelectionError(
                    f"index {index} is outside 0..{len(candidates) - 1} (the tasks of "
                    f"split {split!r} and difficulty {difficulty!r})"
                )
            return self.tasks[candidates[index]]
        chooser = random.Random(seed) if seed is not None else (rng or random.Random())
        return self.tasks[chooser.choice(candidates)]

    # -- OpenEnv's Task API (discovery; an episode picks one with reset(split=, index=)) ---

    def task_specs(self, split: str, start: int | None = None,
                   stop: int | None = None) -> list[dict[str, object]]:  # fmt: skip
        """Specs of the tasks of ``split`` in ``ids`` order, ``start``..``stop`` like a slice
        of non-negative bounds (an unknown split has none)."""
        ids = self.ids(split=split) if split in SPLITS else []
        first = 0 if start is None else start
        last = len(ids) if stop is None else min(stop, len(ids))
        if first < 0 or last < 0:
            raise IndexError("task indices are non-negative")
        return [self.task_spec(ids[i], split, i) for i in range(first, max(first, last))]

    def task_spec(self, task_id: str, split: str, index: int) -> dict[str, object]:
        task = self.tasks[task_id]
        return {"id": task.task_id, "index": index, "split": split,
                "difficulty": task.difficulty, "source": task.source,
                "bug_type": task.bug_type, "description": task.description}  # fmt: skip

    def programs(self) -> dict[str, Task]:
        """One reference task per program (the first by id among non-generated tasks)."""
        found: dict[str, Task] = {}
        for task_id in self.ids():
            task = self.tasks[task_id]
            if task.source != SOURCE_GENERATED:
                found.setdefault(task.program, task)
        return found


def load_generated(registry: TaskRegistry, corpus: Path) -> None:
    """Add the generated corpus, trusting its validation while the programs are unchanged."""
    _, entries = read_corpus(corpus)
    programs = registry.programs()
    digests = {name: program_digest(task) for name, task in programs.items()}
    for line, entry in enumerate(entries, 2):
        origin = f"{corpus}:{line}"
        program = programs.get(entry["program"])
        if program is None or digests[entry["program"]] != entry["program_digest"]:
            why = "unknown program" if program is None else "its program changed"
            registry.problems.append(TaskProblem(
                origin, f"stale generated task ({why}); run `python -m tracefix_rl.tasks generate`",
                entry["task_id"], SOURCE_GENERATED,
            ))  # fmt: skip
            continue
        registry.tasks[entry["task_id"]] = replace(
            program,
            task_id=entry["task_id"],
            difficulty=entry["difficulty"],
            buggy_code=entry["buggy_code"],
            bug_type=entry["bug_type"],
            source=SOURCE_GENERATED,
            origin=origin,
            features=entry["features"],
            buggy_visible_passed=entry["visible_passed"],
            buggy_all_passed=entry["all_passed"],
            # per test, as generation measured it; a corpus without it: measured by the
            # first episode to need it (episode.state.Episode.buggy_outcomes)
            buggy_passing=tuple(c == "1" for c in entry.get("passing", "")),
        )


def load_registry(
    extra: str | Path | None = None,
    sandbox: SandboxBackend | None = None,
    builtin_dir: Path = BUILTIN_DIR,
    corpus: Path | None = GENERATED_CORPUS,
) -> TaskRegistry:
    """Load built-in tasks plus ``extra`` (a file or folder), oracle-checking every task, then
    the generated corpus (``corpus=None`` skips it)."""
    sandbox = sandbox or get_sandbox()
    sources = [builtin_dir] + ([Path(extra)] if extra else [])
    registry = TaskRegistry()
    parsed: list[Task] = []
    seen: set[str] = set()
    for source in sources:
        for path in task_files(source):
            for origin, raw in read_entries(path):
                item = parse_and_mark(origin, raw)
                if isinstance(item, TaskProblem):
                    registry.problems.append(item)
                elif item.task_id in seen:
                    registry.problems.append(TaskProblem(
                        origin, "duplicate task_id (first one kept)", item.task_id, item.source
                    ))  # fmt: skip
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
    if corpus is not None:
        load_generated(registry, corpus)
    for problem in registry.problems:
        log.warning("task skipped: %s", problem)
    return registry


def parse_and_mark(origin: str, raw: Any) -> Task | TaskProblem:
    """Parse one entry and assign its split."""
    item = parse_task(origin, raw)
    if isinstance(item, Task):
        item = replace(item, split=split_of(item.program))
    return item


_registry: TaskRegistry | None = None
_registry_lock = threading.Lock()


def get_registry(settings: Settings | None = None) -> TaskRegistry:
    """The process-wide registry (built-ins + ``settings.tracefix_tasks`` + generated), loaded
    on the first call, in the process-wide sandbox: with ``settings`` (a server passes its own,
    at start-up), else with ``settings.environment_settings()``. Later calls return it
    whatever they pass."""
    global _registry
    with _registry_lock:
        if _registry is None:
            settings = settings or environment_settings()
            _registry = load_registry(settings.tracefix_tasks, sandbox=get_sandbox(settings))
            log.info("loaded %d tasks (%d skipped)", len(_registry.tasks), len(_registry.problems))
        return _registry
