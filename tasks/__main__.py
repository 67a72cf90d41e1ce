"""``python -m tracefix_rl.tasks list|stats|validate|export|generate|import`` (honours
``TRACEFIX_TASKS`` and the ``SANDBOX_*`` settings, read by ``tracefix_rl.settings``).

``import quixbugs DIR -o PACK.jsonl`` / ``import humanevalpack FILE -o PACK.jsonl`` convert a
public benchmark into a task pack and write a report of what was kept and dropped beside it
(``PACK.report.txt``; ``--json`` prints it)."""

from tracefix_rl import models  # noqa: F401  (first: keeps gradio out)

# isort: split

import argparse
import json
import logging
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tracefix_rl.sandbox import get_sandbox
from tracefix_rl.settings import SettingsError, load_settings
from tracefix_rl.tasks.generate import (
    DEFAULT_PER_PROGRAM,
    DEFAULT_SEED,
    VALIDATION_LIMITS,
    generate,
    write_corpus,
)
from tracefix_rl.tasks.importers import IMPORTERS, finish
from tracefix_rl.tasks.oracle import buggy_verdict, check_buggy
from tracefix_rl.tasks.registry import TaskRegistry, load_registry
from tracefix_rl.tasks.schema import SOURCE_GENERATED, Task, TaskProblem
from tracefix_rl.tasks.sources import GENERATED_CORPUS


def _row(task: Task) -> dict[str, Any]:
    return {"task_id": task.task_id, "difficulty": task.difficulty, "split": task.split,
            "source": task.source, "bug_type": task.bug_type, "program": task.program}  # fmt: skip


def _export_entry(task: Task) -> dict[str, Any]:
    """A task in the pack schema, re-importable through ``TRACEFIX_TASKS``."""

    def tests(items):
        return [{"name": t.name, "code": t.code, **({"observe": "list"} if t.observe_list else {})}
                for t in items]  # fmt: skip

    tolerance = {"float_tolerance": task.float_tolerance} if task.float_tolerance else {}
    return {"task_id": task.task_id, "difficulty": task.difficulty,
            "description": task.description, "entry_point": task.entry_point,
            "buggy_code": task.buggy_code, "solution": task.solution,
            "visible_tests": tests(task.visible_tests), "hidden_tests": tests(task.hidden_tests),
            "bug_type": task.bug_type, "source": task.source, "program": task.program,
            **tolerance}  # fmt: skip


def stats(registry: TaskRegistry) -> dict[str, Any]:
    tasks = list(registry.tasks.values())

    def count(key: str) -> dict[str, int]:
        return dict(sorted(Counter(getattr(t, key) for t in tasks).items()))

    by_source_tier: dict[str, dict[str, int]] = {}
    for task in sorted(tasks, key=lambda t: (t.source, t.difficulty)):
        tiers = by_source_tier.setdefault(task.source, {})
        tiers[task.difficulty] = tiers.get(task.difficulty, 0) + 1
    return {"total": len(tasks), "by_tier": count("difficulty"), "by_split": count("split"),
            "by_source": count("source"), "by_source_tier": by_source_tier,
            "by_bug_type": count("bug_type"), "programs": len(registry.programs())}  # fmt: skip


def revalidate_generated(registry: TaskRegistry) -> None:
    """Re-run every generated task in the sandbox (the server trusts the corpus)."""
    sandbox = get_sandbox()
    generated = [registry.tasks[i] for i in registry.ids(source=SOURCE_GENERATED)]
    print(f"re-validating {len(generated)} generated tasks...", file=sys.stderr)
    with ThreadPoolExecutor(max_workers=int(sandbox.describe().get("workers", 2))) as pool:
        verdicts = list(pool.map(
            lambda t: buggy_verdict(t, t.buggy_code, sandbox, VALIDATION_LIMITS), generated
        ))  # fmt: skip
    for task, verdict in zip(generated, verdicts, strict=True):
        problem = check_buggy(task, verdict)
        measured = tuple(t.passed for t in verdict.tests)
        if problem is None and task.buggy_passing and measured != task.buggy_passing:
            problem = "the corpus's per-test outcomes of the buggy code differ from a new run"
        if problem:
            del registry.tasks[task.task_id]
            registry.problems.append(TaskProblem(task.origin, problem, task.task_id, task.source))


def run_import(benchmark: str, path: Path, output: Path, as_json: bool) -> int:
    """Convert ``path`` with the ``benchmark`` importer into ``output``; exit status 1 when
    the input cannot be read as that benchmark."""
    started = time.monotonic()
    try:
        drafts, skipped = IMPORTERS[benchmark](path)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        print(f"import {benchmark}: {exc}", file=sys.stderr)
        return 1
    print(f"checking {len(drafts)} {benchmark} problems in the sandbox...", file=sys.stderr)
    rows = finish(drafts, get_sandbox(), output,
                  progress=lambda line: print(line, file=sys.stderr, flush=True))  # fmt: skip
    elapsed = time.monotonic() - started
    kept = [row for row in rows if row["kept"]]
    summary = {"benchmark": benchmark, "problems": len(rows), "kept": len(kept),
               "tests_kept": sum(row.get("tests", 0) for row in kept),
               "tests_dropped": sum(row.get("tests_dropped", 0) for row in rows),
               "by_tier": dict(sorted(Counter(row["difficulty"] for row in kept).items())),
               "skipped_without_cases": skipped, "seconds": round(elapsed, 1),
               "output": str(output), "report": str(report_path(output))}  # fmt: skip
    report_path(output).write_text(render_report(summary, rows), encoding="utf-8")
    if as_json:
        print(json.dumps({**summary, "rows": rows}, indent=2))
    else:
        print(f"{benchmark}: {len(kept)} of {len(rows)} problems kept as tasks "
              f"({summary['tests_kept']} tests; {summary['tests_dropped']} dropped) in "
              f"{elapsed:.1f}s -> {output}; report: {report_path(output)}")  # fmt: skip
    return 0


def report_path(output: Path) -> Path:
    """Where the import report goes: beside the pack, with a suffix the loader ignores."""
    return output.with_name(output.name.removesuffix(output.suffix) + ".report.txt")


def render_report(summary: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [f"{summary['benchmark']}: {summary['kept']} of {summary['problems']} problems kept "
             f"({summary['tests_kept']} tests kept, {summary['tests_dropped']} dropped); "
             f"tiers {summary['by_tier']}; {summary['seconds']}s", ""]  # fmt: skip
    if summary["skipped_without_cases"]:
        lines += ["skipped (no JSON test cases): " + ", ".join(summary["skipped_without_cases"]),
                  ""]  # fmt: skip
    for row in rows:
        if row["kept"]:
            head = (f"KEPT    {row['problem']} -> {row['task_id']} ({row['difficulty']}; "
                    f"{row['tests']} tests, {row['visible']} visible, "
                    f"{row['buggy_visible_failing']} failing on the buggy code)")  # fmt: skip
        else:
            head = f"DROPPED {row['problem']}: {row['reason']}"
        lines.append(head)
        lines += [f"        {note}" for note in row["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tracefix_rl.tasks", description=__doc__)
    parser.add_argument(
        "command", choices=["list", "stats", "validate", "export", "generate", "import"]
    )
    parser.add_argument(
        "benchmark",
        nargs="?",
        choices=sorted(IMPORTERS),
        help="import: which benchmark's layout PATH has",
    )
    parser.add_argument(
        "path",
        nargs="?",
        type=Path,
        help="import: a QuixBugs checkout, or the HumanEvalPack Python JSONL",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--difficulty", help="list/export: only this tier")
    parser.add_argument("--split", help="list/export: only this split")
    parser.add_argument("--source", help="list/export: only this source")
    parser.add_argument("-o", "--output", type=Path, help="export/generate/import: write here")
    parser.add_argument("--corpus", default=str(GENERATED_CORPUS),
                        help="generated corpus to load ('none' to skip it)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="generate: seed")
    parser.add_argument("--per-program", type=int, default=DEFAULT_PER_PROGRAM,
                        help="generate: tasks kept per reference program")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        raise SystemExit(f"tracefix_rl: invalid configuration:\n{exc}") from None
    extra = settings.tracefix_tasks
    if args.command == "import":
        if args.benchmark is None or args.path is None or args.output is None:
            parser.error("import needs BENCHMARK PATH -o PACK.jsonl")
        get_sandbox(settings)
        return run_import(args.benchmark, args.path, args.output, args.json)
    get_sandbox(settings)  # the process-wide sandbox every step below uses

    if args.command == "generate":
        started = time.monotonic()
        registry = load_registry(extra, corpus=None)
        programs = list(registry.programs().values())
        print(f"generating from {len(programs)} reference programs...", file=sys.stderr)
        corpus = generate(
            programs,
            get_sandbox(),
            args.seed,
            args.per_program,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
        )
        output = args.output or GENERATED_CORPUS
        write_corpus(output, corpus, args.seed, args.per_program)
        elapsed = time.monotonic() - started
        summary = {"generated": len(corpus), "programs": len(programs),
                   "seconds": round(elapsed, 1), "output": str(output)}  # fmt: skip
        print(
            json.dumps(summary)
            if args.json
            else f"{len(corpus)} tasks from {len(programs)} programs in {elapsed:.1f}s -> {output}"
        )
        return 0

    corpus = None if args.corpus == "none" else Path(args.corpus)
    registry = load_registry(extra, corpus=corpus)
    if args.command == "validate":
        revalidate_generated(registry)
        invalid = [{"task_id": p.task_id, "source": p.origin, "reason": p.reason}
                   for p in registry.problems]  # fmt: skip
        if args.json:
            print(json.dumps({"valid": len(registry.tasks), "invalid": invalid}, indent=2))
        else:
            print(f"{len(registry.tasks)} valid, {len(invalid)} invalid")
            for problem in registry.problems:
                print(f"INVALID {problem}")
        return 1 if invalid else 0
    if args.command == "stats":
        facts = stats(registry)
        if args.json:
            print(json.dumps(facts, indent=2))
        else:
            for key, value in facts.items():
                print(f"{key}: {value}")
        return 0
    selected = [registry.tasks[i] for i in registry.ids(args.difficulty, args.split, args.source)]
    if args.command == "list":
        rows = [_row(t) for t in selected]
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for row in rows:
                print(f"{row['task_id']:56} {row['difficulty']:7} {row['split']:6} "
                      f"{row['source']:10} {row['bug_type']}")  # fmt: skip
        return 0
    lines = "".join(json.dumps(_export_entry(t)) + "\n" for t in selected)
    if args.output:
        args.output.write_text(lines)
        print(f"exported {len(selected)} tasks to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(lines)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    sys.exit(main())
