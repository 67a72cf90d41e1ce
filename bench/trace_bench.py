"""TRACE benchmark: what a TRACE step costs beside RUN_TESTS, and whether its report helps a
scripted fault locator name the buggy line of the curated tasks.

    uv run python bench/trace_bench.py [--quick] [--results DIR]

Writes ``bench/results/trace.json`` (or into ``--results DIR``) and prints two tables;
progress goes to stderr.

**Speed.** Each curated task is played in an in-process ``TraceFixEnvironment`` with the
real sandbox (as ``bench/sandbox_bench.py`` measures RUN_TESTS). Every measured step is
timed around ``env.step`` (sandbox, judge, report, observation): a RUN_TESTS step, and a
TRACE step of the task's first visible test that fails on the buggy code. RUN_TESTS
remembers the verdict of the last code it measured (``Episode.measure_visible``) and TRACE
remembers nothing, so to make both do their sandbox work every time, *each* measured step
of either kind is preceded by the same untimed toggle: a REPLACE_LINES that appends the
comment line ``# bench`` to the file, or the UNDO_EDIT that removes it again. The code
therefore alternates between the buggy file and the buggy file plus one comment, both
kinds run on the same two versions, and RUN_TESTS never sees the code it measured last. A
counting wrapper around the sandbox checks that every measured step reached the sandbox
exactly once. The two kinds alternate within a round (their order swaps every round), so
the machine's noise falls on both alike. Reported per task and per tier (all samples of
the tier's tasks pooled): p50 and p99, and the ratio TRACE p50 / RUN_TESTS p50. The target
is that ratio ≤ 3 for every task. ``--quick`` measures one task per tier, fewer samples.

**Helpfulness.** Three scripted locators rank the lines of each curated task's buggy
file, most suspicious first, from observations only (the file as ``code_dict`` shows it,
the test results, the reports in ``last_execution_output``; never the solution):

* *static* (the floor: what the code alone gives): the first line of every statement, in
  file order (docstrings left out; ``def`` and ``class`` lines included);
* *RUN_TESTS* (one step): the lines where failing tests raised (the ``(line N)`` of their
  error messages, in test order), then the static order;
* *TRACE* (one TRACE step per visible test): the Ochiai suspiciousness
  ef / sqrt(F (ef + ep)) of each line from the executed lines of the failing and passing
  tests (parsed from each report's "Executed lines" and "Result"); ties broken by "a
  failing test raised there" (the report's "Raised ... at line", else the ``(line N)`` of
  its Result, which RecursionErrors need), then by file order; lines no failing test
  executed follow in static order.

Ground truth, used only for scoring: the lines where ``buggy_code`` differs from
``solution`` (``difflib`` over lines); where the fix only inserts lines, the nearest
non-blank buggy line on each side of the insertion point. Top-k hits when one of the first
k ranked lines is a buggy line; reported per tier and overall, with the steps each arm
spent. Ties decide much with a handful of tests, so the result also gives each arm's
expected top-k hits had ties been broken at random instead of in file order. The study
is cheap and runs whole with ``--quick`` too.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import math
import re
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common import RESULTS, add_results_option, write_result
from sandbox_bench import TIER_TASKS, summarize

from tracefix_rl import models  # noqa: F401  (before openenv: keeps gradio out)

# isort: split

from tracefix_rl.environment import TraceFixEnvironment
from tracefix_rl.models import TraceFixAction, TraceFixObservation
from tracefix_rl.sandbox import EvalRequest, EvalResult, SandboxBackend, get_sandbox
from tracefix_rl.tasks import Task, get_registry

TIERS = ("easy", "medium", "hard")
TARGET_RATIO = 3.0  # TRACE p50 ≤ 3× RUN_TESTS p50 of the same task
MAX_STEPS = 1000
WARM_UP_ROUNDS = 3
TOP_K = (1, 3)
ARMS = {
    "static": "statement lines in file order (no run at all)",
    "run_tests": "lines where failing tests raised (RUN_TESTS' error messages), then static",
    "trace": "Ochiai over TRACE's executed lines of passing vs failing tests; ties: a "
    "failing test raised there first, then file order; then static",
}
_RAISE_LINE = re.compile(r"\(line (\d+)\)$")
_EXECUTED = re.compile(r"^Executed lines \((?:the first )?(\d+) line events[^)]*\): (.*)$")
_RAISED = re.compile(r"^Raised \S+ at line (\d+);")
_TOKEN = re.compile(r"\[([\d ]+)\]×\d+|(\d+)×\d+|(\d+)")
_MORE = " ... ("
_TRUNCATED = "\n... [report truncated at"
_CAPTURED = "\n--- captured output"


def log(message: str) -> None:
    print(f"[trace] {message}", file=sys.stderr, flush=True)


def curated() -> list[Task]:
    """The curated tasks, by task id."""
    tasks = get_registry().tasks.values()
    return sorted((t for t in tasks if t.source == "curated"), key=lambda t: t.task_id)


# -- speed -----------------------------------------------------------------------------------


class CountingSandbox:
    """The real sandbox, counting the evaluations that reach it."""

    def __init__(self, inner: SandboxBackend) -> None:
        self.inner = inner
        self.name = inner.name
        self.runs = 0

    def run(self, request: EvalRequest, cancel: threading.Event | None = None) -> EvalResult:
        self.runs += 1
        return self.inner.run(request, cancel=cancel)

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()

    def health_problem(self) -> str | None:
        return self.inner.health_problem()

    def close(self) -> None:
        self.inner.close()


def first_failing_test(obs: TraceFixObservation) -> int:
    """The 1-based number of the first failing visible test of a RUN_TESTS observation."""
    for number, result in enumerate(obs.test_results, 1):
        if not result.passed:
            return number
    raise AssertionError(f"{obs.task_id}: no visible test fails on the buggy code")


def line_events(report: str) -> int:
    """The line events a TRACE report counted (0 if it has none)."""
    found = (_EXECUTED.match(row) for row in report.split("\n"))
    return next((int(match.group(1)) for match in found if match), 0)


def step_latency(task: Task, sandbox: CountingSandbox, rounds: int) -> dict[str, Any]:
    """``rounds`` timed RUN_TESTS steps and as many TRACE steps of one failing visible test,
    alternating, each after the untimed toggle edit (see the module docstring)."""
    env = TraceFixEnvironment(sandbox=sandbox)
    obs = env.reset(task_id=task.task_id, max_steps=MAX_STEPS)
    lines = len(obs.code_dict)
    traced = first_failing_test(env.step(TraceFixAction(action_type="RUN_TESTS")))
    actions = {
        "run_tests": TraceFixAction(action_type="RUN_TESTS"),
        "trace": TraceFixAction(action_type="TRACE", test=traced),
    }
    edit = TraceFixAction(action_type="REPLACE_LINES", start_line=lines + 1, end_line=lines,
                          new_code_block="# bench")  # fmt: skip
    undo = TraceFixAction(action_type="UNDO_EDIT")
    edited = False
    events = 0
    samples: dict[str, list[float]] = {kind: [] for kind in actions}
    for round_ in range(WARM_UP_ROUNDS + rounds):
        order = list(actions) if round_ % 2 == 0 else list(reversed(actions))
        for kind in order:
            if env.state.step_count > MAX_STEPS - 4:
                env.reset(task_id=task.task_id, max_steps=MAX_STEPS)
                edited = False
            toggled = env.step(undo if edited else edit)
            assert toggled.last_action_error is None, toggled.last_action_error
            edited = not edited
            before = sandbox.runs
            start = time.perf_counter()
            obs = env.step(actions[kind])
            took = (time.perf_counter() - start) * 1000
            assert obs.last_action_error is None, obs.last_action_error
            assert sandbox.runs == before + 1, f"{kind} did not reach the sandbox"
            if kind == "trace":
                events = line_events(obs.last_execution_output or "")
            if round_ >= WARM_UP_ROUNDS:
                samples[kind].append(took)
    env.close()
    run_tests, trace = summarize(samples["run_tests"]), summarize(samples["trace"])
    return {
        "tier": task.difficulty,
        "visible_tests": len(task.visible_tests),
        "traced_test": traced,
        "traced_line_events": events,
        "run_tests": run_tests,
        "trace": trace,
        "ratio_p50": round(trace["p50_ms"] / run_tests["p50_ms"], 2),
        "samples_ms": samples,
    }


def speed(tasks: list[Task], rounds: int) -> dict[str, Any]:
    """Per-task and per-tier latencies of TRACE and RUN_TESTS steps, and their ratios."""
    sandbox = CountingSandbox(get_sandbox())
    per_task: dict[str, dict[str, Any]] = {}
    for number, task in enumerate(tasks, 1):
        per_task[task.task_id] = step_latency(task, sandbox, rounds)
        found = per_task[task.task_id]
        log(f"speed {number}/{len(tasks)} {task.task_id}: RUN_TESTS p50 "
            f"{found['run_tests']['p50_ms']} ms, TRACE p50 {found['trace']['p50_ms']} ms "
            f"({found['ratio_p50']}x)")  # fmt: skip
    tiers: dict[str, dict[str, Any]] = {}
    for tier in TIERS:
        found = {k: v for k, v in per_task.items() if v["tier"] == tier}
        if not found:
            continue
        pooled = {kind: summarize([s for v in found.values() for s in v["samples_ms"][kind]])
                  for kind in ("run_tests", "trace")}  # fmt: skip
        worst = max(found, key=lambda k: found[k]["ratio_p50"])
        tiers[tier] = {
            "tasks": len(found),
            **pooled,
            "ratio_p50": round(pooled["trace"]["p50_ms"] / pooled["run_tests"]["p50_ms"], 2),
            "ratio_p50_per_task_median": round(
                statistics.median(v["ratio_p50"] for v in found.values()), 2),
            "worst_task": worst,
            "worst_task_ratio_p50": found[worst]["ratio_p50"],
        }  # fmt: skip
    for found in per_task.values():
        del found["samples_ms"]
    return {
        "rounds_per_task": rounds,
        "method": "each measured step (RUN_TESTS or TRACE of the first failing visible test) "
        "follows an untimed toggle edit (append '# bench' / UNDO_EDIT), so neither reuses "
        "a cached verdict; every measured step reached the sandbox once; kinds alternate",
        "target_ratio": TARGET_RATIO,
        "met": all(v["ratio_p50"] <= TARGET_RATIO for v in per_task.values()),
        "tiers": tiers,
        "tasks": per_task,
    }


# -- helpfulness: the locators (observations only) -------------------------------------------


def statement_lines(code_dict: dict[int, str]) -> list[int]:
    """The first line of every statement of the file, in file order (docstrings left out);
    every non-blank line if the file does not parse."""
    source = "\n".join(code_dict[number] for number in sorted(code_dict))
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return [n for n in sorted(code_dict) if code_dict[n].strip()]
    found = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.stmt):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) \
                and isinstance(node.value.value, str):  # fmt: skip
            continue
        found.add(node.lineno)
    return sorted(found)


Groups = list[list[int]]
"""A ranking: groups of lines, most suspicious first; the lines of one group tie (they are
listed in file order, the deterministic tie-break)."""


def chain(*rankings: Groups) -> Groups:
    """The groups of each ranking in turn, each line kept at its first place."""
    seen: set[int] = set()
    out: Groups = []
    for ranking in rankings:
        for group in ranking:
            kept = sorted(set(group) - seen)
            if kept:
                out.append(kept)
                seen.update(kept)
    return out


def singles(lines: list[int]) -> Groups:
    return [[line] for line in lines]


def locate_static(start: TraceFixObservation) -> Groups:
    return singles(statement_lines(start.code_dict))


def locate_run_tests(start: TraceFixObservation, run: TraceFixObservation) -> Groups:
    """Lines where failing tests raised (from RUN_TESTS' error messages), then static."""
    raised = []
    for result in run.test_results:
        match = _RAISE_LINE.search(result.error_message or "")
        if not result.passed and match:
            raised.append(int(match.group(1)))
    return chain(singles(raised), locate_static(start))


def parse_trace(report: str) -> dict[str, Any]:
    """What the locator reads from one TRACE report: pass or fail, the set of executed
    lines (None when the report has none), the line it raised at, and whether the shown
    path was incomplete (events beyond the child's path limit, or the report cut)."""
    head = report.split(_CAPTURED, 1)[0]  # not what the program printed
    rows = head.split("\n")
    passed = any(row == "Result: PASS" for row in rows)
    executed: set[int] | None = None
    raised = None
    partial = False
    truncated = _TRUNCATED in head
    for index, row in enumerate(rows):
        match = _EXECUTED.match(row)
        if match:
            shown = match.group(2)
            if _MORE in shown:
                shown, partial = shown.split(_MORE, 1)[0], True
            tokens = list(_TOKEN.finditer(shown))
            if truncated and index + 1 < len(rows) and rows[index + 1].startswith("... [report"):
                tokens, partial = tokens[:-1], True  # the last token may be cut
            executed = set()
            for token in tokens:
                block, repeated, single = token.groups()
                executed.update(int(n) for n in (block or repeated or single).split())
        match = _RAISED.match(row)
        if match:
            raised = int(match.group(1))
    result = next((row for row in rows if row.startswith("Result: FAIL")), "")
    match = _RAISE_LINE.search(result)
    if raised is None and match:  # the untraced run's line (a RecursionError kills the tracer)
        raised = int(match.group(1))
    return {"passed": passed, "executed": executed, "raised": raised,
            "partial": partial, "truncated": truncated}  # fmt: skip


def ochiai(traces: list[dict[str, Any]]) -> dict[int, float]:
    """Ochiai suspiciousness ef / sqrt(F (ef + ep)) of every line a failing test executed."""
    usable = [t for t in traces if t["executed"] is not None]
    failing = [t for t in usable if not t["passed"]]
    lines = set().union(*(t["executed"] for t in failing)) if failing else set()
    scores = {}
    for line in lines:
        ef = sum(line in t["executed"] for t in failing)
        ep = sum(line in t["executed"] for t in usable if t["passed"])
        scores[line] = ef / math.sqrt(len(failing) * (ef + ep))
    return scores


def locate_trace(start: TraceFixObservation, reports: list[str]) -> Groups:
    """Ochiai over the reports' executed lines (ties: a failing test raised there first,
    then file order), then static."""
    traces = [parse_trace(report) for report in reports]
    raised = list(dict.fromkeys(t["raised"] for t in traces
                                if not t["passed"] and t["raised"] is not None))  # fmt: skip
    scores = ochiai(traces)
    keyed: dict[tuple[float, bool], list[int]] = {}
    for line, score in scores.items():
        keyed.setdefault((-round(score, 9), line not in raised), []).append(line)
    return chain([keyed[key] for key in sorted(keyed)], locate_static(start))


def top(groups: Groups, k: int) -> list[int]:
    """The first ``k`` lines of a ranking (ties in file order)."""
    return [line for group in groups for line in group][:k]


def expected_hit(groups: Groups, truth: set[int], k: int) -> float:
    """The chance that the first ``k`` lines hold a buggy line when each group's ties are
    broken at random instead of in file order."""
    missed, placed = 1.0, 0
    for group in groups:
        if placed >= k:
            break
        size, taken = len(group), min(len(group), k - placed)
        clean = size - len(truth.intersection(group))
        missed *= math.comb(clean, taken) / math.comb(size, taken)
        placed += size
    return 1.0 - missed


# -- helpfulness: the study -----------------------------------------------------------------


def buggy_lines(task: Task) -> list[int]:
    """Ground truth (scoring only): the 1-based buggy lines that differ from the solution;
    for an insertion, the nearest non-blank buggy line on each side."""
    buggy, fixed = task.buggy_code.splitlines(), task.solution.splitlines()
    found: set[int] = set()
    matcher = difflib.SequenceMatcher(None, buggy, fixed, autojunk=False)
    for op, i1, i2, _, _ in matcher.get_opcodes():
        if op in ("replace", "delete"):
            found.update(range(i1 + 1, i2 + 1))
        elif op == "insert":
            before = next((i for i in range(i1, 0, -1) if buggy[i - 1].strip()), None)
            after = next((i for i in range(i1 + 1, len(buggy) + 1) if buggy[i - 1].strip()),
                         None)  # fmt: skip
            found.update(i for i in (before, after) if i is not None)
    return sorted(found)


def play(env: TraceFixEnvironment, task: Task, actions: list[TraceFixAction]
         ) -> list[TraceFixObservation]:  # fmt: skip
    """Reset to ``task`` and play ``actions``: the reset observation, then each step's."""
    seen = [env.reset(task_id=task.task_id, max_steps=MAX_STEPS)]
    for action in actions:
        obs = env.step(action)
        assert obs.last_action_error is None, obs.last_action_error
        seen.append(obs)
    return seen


def study_task(env: TraceFixEnvironment, task: Task) -> dict[str, Any]:
    """Every arm's ranking of ``task``'s lines, and its top-k hits."""
    start, run = play(env, task, [TraceFixAction(action_type="RUN_TESTS")])
    tests = range(1, start.tests_total + 1)
    traced = play(env, task, [TraceFixAction(action_type="TRACE", test=i) for i in tests])[1:]
    reports = [obs.last_execution_output or "" for obs in traced]
    rankings = {"static": locate_static(start), "run_tests": locate_run_tests(start, run),
                "trace": locate_trace(start, reports)}  # fmt: skip
    truth = set(buggy_lines(task))
    parsed = [parse_trace(report) for report in reports]
    failing = [r for r in run.test_results if not r.passed]
    hits, expected = {}, {}
    for arm, groups in rankings.items():
        hits[arm] = {f"top{k}": bool(truth & set(top(groups, k))) for k in TOP_K}
        expected[arm] = {f"top{k}": round(expected_hit(groups, truth, k), 4) for k in TOP_K}
    return {
        "task_id": task.task_id,
        "tier": task.difficulty,
        "lines": len(start.code_dict),
        "buggy_lines": sorted(truth),
        "failing_visible": len(failing),
        "visible": start.tests_total,
        "steps": {"static": 0, "run_tests": 1, "trace": len(reports)},
        "raise_line_seen": any(_RAISE_LINE.search(r.error_message or "") for r in failing),
        "traces_without_lines": sum(p["executed"] is None for p in parsed),
        "traces_partial": sum(p["partial"] for p in parsed),
        "reports_truncated": sum(p["truncated"] for p in parsed),
        "top3": {arm: top(groups, 3) for arm, groups in rankings.items()},
        "top_tie": {arm: len(groups[0]) if groups else 0 for arm, groups in rankings.items()},
        "hits": hits,
        "expected_hits": expected,
    }


def tally(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Top-k hit counts and rates of each arm over ``rows``."""
    out: dict[str, Any] = {"n": len(rows)}
    for arm in ARMS:
        out[arm] = {}
        for k in TOP_K:
            hits = sum(row["hits"][arm][f"top{k}"] for row in rows)
            out[arm][f"top{k}"] = hits
            out[arm][f"top{k}_rate"] = round(hits / len(rows), 3) if rows else 0.0
            expected = sum(row["expected_hits"][arm][f"top{k}"] for row in rows)
            out[arm][f"top{k}_random_ties"] = round(expected, 2)
        out[arm]["mean_steps"] = round(sum(r["steps"][arm] for r in rows) / len(rows), 2)
    return out


def helpfulness(tasks: list[Task]) -> dict[str, Any]:
    env = TraceFixEnvironment()
    rows = []
    for number, task in enumerate(tasks, 1):
        rows.append(study_task(env, task))
        hits = rows[-1]["hits"]
        log(f"locate {number}/{len(tasks)} {task.task_id}: buggy {rows[-1]['buggy_lines']}; "
            + ", ".join(f"{arm} {rows[-1]['top3'][arm]}{'*' if hits[arm]['top1'] else ''}"
                        for arm in ARMS))  # fmt: skip
    env.close()
    return {
        "arms": ARMS,
        "ground_truth": "lines where buggy_code differs from solution (difflib over lines); "
        "for an insertion, the nearest non-blank buggy line on each side",
        "tiers": {tier: tally([r for r in rows if r["tier"] == tier]) for tier in TIERS},
        "overall": tally(rows),
        "tasks": rows,
    }


# -- the run ---------------------------------------------------------------------------------


def run(quick: bool = False, results: Path = RESULTS) -> dict[str, Any]:
    """Measure everything; write and return the report."""
    tasks = curated()
    timed = [get_registry().tasks[TIER_TASKS[tier]] for tier in TIERS] if quick else tasks
    rounds = 30 if quick else 200
    log(f"speed: {len(timed)} tasks, {rounds} rounds each")
    started = time.monotonic()
    timing = speed(timed, rounds)
    log(f"speed done in {time.monotonic() - started:.0f} s; helpfulness: {len(tasks)} tasks")
    located = helpfulness(tasks)
    report = write_result("trace", {"quick": quick, "speed": timing, "helpfulness": located},
                          results)  # fmt: skip
    print_tables(report)
    get_sandbox().close()
    return report


def print_tables(report: dict[str, Any]) -> None:
    timing, located = report["speed"], report["helpfulness"]
    for tier, row in timing["tiers"].items():
        print(f"{tier:6} ({row['tasks']} tasks): RUN_TESTS p50 {row['run_tests']['p50_ms']} ms "
              f"p99 {row['run_tests']['p99_ms']} ms; TRACE p50 {row['trace']['p50_ms']} ms "
              f"p99 {row['trace']['p99_ms']} ms; ratio {row['ratio_p50']}x (worst task "
              f"{row['worst_task_ratio_p50']}x, {row['worst_task']})")  # fmt: skip
    print(f"TRACE p50 <= {timing['target_ratio']}x RUN_TESTS p50 on every task: "
          f"{'met' if timing['met'] else 'NOT met'}")  # fmt: skip
    for name, t in [*located["tiers"].items(), ("overall", located["overall"])]:
        cells = ", ".join(
            f"{arm} {t[arm]['top1']}/{t[arm]['top3']} (random ties "
            f"{t[arm]['top1_random_ties']}/{t[arm]['top3_random_ties']})"
            for arm in ARMS
        )
        print(f"{name:8} n={t['n']:2}: top-1/top-3 {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="one task per tier and fewer samples for the speed part")  # fmt: skip
    add_results_option(parser)
    args = parser.parse_args()
    run(args.quick, args.results)


if __name__ == "__main__":
    main()
