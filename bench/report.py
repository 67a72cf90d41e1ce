"""Turn ``bench/results/*.json`` into PNG plots and ``BENCHMARKS.md``.

    uv run python bench/report.py [--results DIR] [--target FILE]

Reads the results the benchmarks wrote (``--results``, default ``bench/results``), draws
``latency_vs_sessions.png``, ``throughput.png`` and ``sandbox_latency.png`` into the same
folder (matplotlib, headless), and writes the table (``--target``, default ``BENCHMARKS.md``):
machine, date, targets met or not, absolute numbers beside ratios.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import REPO, RESULTS

BENCHMARKS_MD = REPO / "BENCHMARKS.md"
TIERS = ("easy", "medium", "hard")
PLOTTED_ACTIONS = ("VIEW_CODE", "REPLACE_LINES", "RUN_TESTS")
PLOTS = ("latency_vs_sessions.png", "throughput.png", "sandbox_latency.png")
TARGET_RATIO_TO_FLOOR = 2.5
TARGET_RATIO_TO_BASELINE = 0.5
TARGET_EVALUATIONS_PER_S = 250
TARGET_SESSIONS = 512
TARGET_EDIT_P99_MS = 1000
TARGET_RSS_PER_SESSION_KB = 200
TARGET_TESTS_HALF_SESSIONS = 256
TARGET_TESTS_HALF_P99_MS = 1000
TARGET_TRACE_RATIO = 3.0
LOCATOR_ARMS = (("static", "static (no run)"), ("run_tests", "RUN_TESTS"), ("trace", "TRACE"))


def load(results: Path) -> dict[str, dict[str, Any]]:
    """Every ``<name>.json`` in ``results`` keyed by name; missing ones are absent."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(results.glob("*.json"))}


def runs_of(
    sessions: dict[str, Any], transport: str = "ws", mix: str = "mixed"
) -> list[dict[str, Any]]:
    """The sessions runs over ``transport`` with step ``mix``, fewest sessions first."""
    return sorted(
        (
            r
            for r in sessions.get("runs", [])
            if r.get("transport", "ws") == transport and r.get("mix", "mixed") == mix
        ),
        key=lambda r: r["sessions"],
    )


def _yes(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def targets(data: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) rows for the issue's targets that have results."""
    rows: list[tuple[str, str, str]] = []
    sandbox = data.get("sandbox")
    if sandbox:
        floor = sandbox["ratio_p50_to_fork_floor"]
        rows.append((
            f"sandboxed RUN_TESTS p50 ≤ {TARGET_RATIO_TO_FLOOR}× the fork floor",
            " / ".join(f"{t} {floor[t]}×" for t in TIERS),
            _yes(all(floor[t] <= TARGET_RATIO_TO_FLOOR for t in TIERS)),
        ))  # fmt: skip
        base = sandbox.get("ratio_p50_to_tracefix_baseline")
        if base:
            rows.append((
                f"sandboxed RUN_TESTS p50 ≤ {TARGET_RATIO_TO_BASELINE}× the TraceFix-style "
                "baseline",
                " / ".join(f"{t} {base[t]}×" for t in TIERS),
                _yes(all(base[t] <= TARGET_RATIO_TO_BASELINE for t in TIERS)),
            ))  # fmt: skip
        plain = sandbox.get("ratio_p50_to_multiprocessing_small")
        if plain:
            rows.append((
                "sandboxed RUN_TESTS p50 ≤ a plain `multiprocessing` fork per run (no "
                "isolation, small process), every layer on",
                " / ".join(
                    f"{t} {sandbox['run_tests'][t]['p50_ms']:.2f} vs "
                    f"{sandbox['multiprocessing_small'][t]['p50_ms']:.2f} ms ({plain[t]}×)"
                    for t in TIERS
                ),
                _yes(all(plain[t] <= 1.0 for t in TIERS)),
            ))  # fmt: skip
        best = max(sandbox["throughput"], key=lambda r: r["per_second"])
        rows.append((
            f"≥ {TARGET_EVALUATIONS_PER_S} sandboxed evaluations/s",
            f"{best['per_second']:.0f}/s (concurrency {best['concurrency']})",
            _yes(best["per_second"] >= TARGET_EVALUATIONS_PER_S),
        ))  # fmt: skip
    big = [r for r in runs_of(data.get("sessions", {})) if r["sessions"] == TARGET_SESSIONS]
    if big:
        run = big[0]
        lat = run["latency_ms"]
        edit_p99 = max(lat["VIEW_CODE"]["p99"], lat["REPLACE_LINES"]["p99"])
        rows += [
            (f"{TARGET_SESSIONS} concurrent WS sessions, 0 errors",
             f"{run['errors']} errors, {run['completed']}/{run['sessions']} completed, "
             f"{run['server_error_lines']} ERROR lines in the server log",
             _yes(run["errors"] == 0 and run["completed"] == run["sessions"])),
            (f"P99 VIEW/REPLACE < {TARGET_EDIT_P99_MS / 1000:.0f} s at {TARGET_SESSIONS} "
             "sessions",
             f"VIEW {lat['VIEW_CODE']['p99']:.0f} ms, REPLACE {lat['REPLACE_LINES']['p99']:.0f} "
             "ms", _yes(edit_p99 < TARGET_EDIT_P99_MS)),
            ("RUN_TESTS bounded by queueing, no timeouts",
             f"P50 {lat['RUN_TESTS']['p50'] / 1000:.2f} s, P99 "
             f"{lat['RUN_TESTS']['p99'] / 1000:.2f} s, {run['errors']} errors",
             _yes(run["errors"] == 0)),
            (f"≤ {TARGET_RSS_PER_SESSION_KB} KB server RSS per idle session",
             f"{run['server_rss_kb_per_idle_session']:.0f} KB",
             _yes(run["server_rss_kb_per_idle_session"] <= TARGET_RSS_PER_SESSION_KB)),
        ]  # fmt: skip
    half = [r for r in runs_of(data.get("sessions", {}), "ws", "tests-half")
            if r["sessions"] == TARGET_TESTS_HALF_SESSIONS]  # fmt: skip
    if half:
        run = half[0]
        rows.append((
            f"{TARGET_TESTS_HALF_SESSIONS} WS sessions started at once, "
            f"{run['steps_per_session']} steps each (half RUN_TESTS): 0 errors, step P99 < "
            f"{TARGET_TESTS_HALF_P99_MS / 1000:.0f} s",
            f"{run['errors']} errors, {run['completed']}/{run['sessions']} completed, step P99 "
            f"{run['step_p99_ms']:.0f} ms",
            _yes(run["errors"] == 0 and run["step_p99_ms"] < TARGET_TESTS_HALF_P99_MS),
        ))  # fmt: skip
    soak = data.get("soak")
    if soak:
        rows.append((
            f"{soak['episodes']:,}-episode WS soak: flat RSS (≤ {soak_flat_growth(soak)} MiB after "
            f"warm-up, ≤ {soak_flat_slope(soak)} MiB per 1,000 episodes), 0 errors, 0 orphans, "
            "0 leftover directories",
            f"{soak['errors']} errors; RSS +{soak['rss_growth_after_warm_up_mib']} MiB after "
            f"warm-up ({soak['rss_slope_mib_per_1000_episodes']} MiB per 1,000 episodes); "
            f"{soak['orphans']} orphans; {soak['leftover_entries']} leftover entries",
            _yes(soak["errors"] == 0 and soak["rss_flat"] and soak["orphans"] == 0
                 and soak["leftover_entries"] == 0 and not soak["left_behind_after_stop"]),
        ))  # fmt: skip
    trace = data.get("trace")
    if trace:
        speed = trace["speed"]
        pooled = speed["tiers"]
        worst = max(speed["tasks"], key=lambda t: speed["tasks"][t]["ratio_p50"])
        ratio = speed["tasks"][worst]["ratio_p50"]
        events = speed["tasks"][worst].get("traced_line_events")
        why = f", a traced run of {events:,} line events" if events else ""
        rows.append((
            f"TRACE p50 ≤ {speed.get('target_ratio', TARGET_TRACE_RATIO):g}× RUN_TESTS p50 "
            "of the same task",
            " / ".join(f"{t} {pooled[t]['ratio_p50']}×" for t in TIERS if t in pooled)
            + f" (tier p50s); worst of {len(speed['tasks'])} tasks {ratio}× ({worst}{why})",
            _yes(ratio <= speed.get("target_ratio", TARGET_TRACE_RATIO)),
        ))  # fmt: skip
    cold = data.get("coldstart")
    if cold:
        median = cold["first_reset_200"]["median_s"]
        rows.append((
            f"cold start to first /reset 200 ≤ {cold['target_s']:.0f} s",
            f"median {median:.2f} s of {cold['first_reset_200']['runs']} "
            f"(max {cold['first_reset_200']['max_s']:.2f} s)",
            _yes(median <= cold["target_s"]),
        ))  # fmt: skip
    gen = data.get("generate")
    if gen:
        rows.append((
            f"generate and validate the corpus ≤ {gen['target_s']:.0f} s",
            f"{gen['generation_and_validation_s']} s for {gen['generated']} tasks "
            f"({gen['tasks_per_second']} tasks/s)",
            _yes(gen["generation_and_validation_s"] <= gen["target_s"]),
        ))  # fmt: skip
    return rows


def soak_flat_growth(soak: dict[str, Any]) -> float:
    return soak.get("flat_growth_mib", 16.0)


def soak_flat_slope(soak: dict[str, Any]) -> float:
    return soak.get("flat_slope_mib_per_1000", 2.0)


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def sandbox_section(sandbox: dict[str, Any]) -> str:
    base = sandbox.get("tracefix_baseline", {})
    plain = sandbox.get("multiprocessing_small", {})
    rows = []
    for tier in TIERS:
        ours, floor = sandbox["run_tests"][tier], sandbox["fork_floor"][tier]
        row = [tier, f"{ours['p50_ms']:.2f}", f"{ours['p99_ms']:.2f}", f"{floor['p50_ms']:.2f}",
               f"{sandbox['ratio_p50_to_fork_floor'][tier]}×"]  # fmt: skip
        if tier in plain:
            row += [f"{plain[tier]['p50_ms']:.2f}",
                    f"{sandbox['ratio_p50_to_multiprocessing_small'][tier]}×"]  # fmt: skip
        if tier in base:
            row += [f"{base[tier]['p50_ms']:.2f}",
                    f"{sandbox['ratio_p50_to_tracefix_baseline'][tier]}×"]  # fmt: skip
        rows.append(row)
    header = ["tier", "RUN_TESTS p50 ms", "p99 ms", "fork floor p50 ms", "ratio"]
    if plain:
        header += ["plain multiprocessing p50 ms", "ratio"]
    if base:
        header += ["TraceFix-style p50 ms", "ratio"]
    rates = [[r["concurrency"], f"{r['per_second']:.0f}"] for r in sandbox["throughput"]]
    workers = sandbox["sandbox"]["workers"]
    by_conc = table([f"client threads ({workers} workers)", "evaluations/s"], rates)
    parts = [
        "## Sandbox (`bench/sandbox_bench.py`)",
        f"Layers: {', '.join(sandbox['sandbox']['layers'])}. RUN_TESTS is a full environment "
        "step (sandbox, judge, observation) on each tier's visible tests. The fork floor is "
        "fork plus the same tests with no isolation layers, in a small interpreter; a bare "
        f"fork+exit+wait took {sandbox['bare_fork']['p50_ms']:.2f} ms p50 in the same run. "
        "The plain multiprocessing baseline forks a `multiprocessing.Process` per run from a "
        "small interpreter that loaded only `multiprocessing`, with no isolation at all; the "
        "TraceFix-style baseline does the same from the benchmark process "
        f"({base.get('parent_rss_mib', '?')} MiB RSS, like a server). Both exec the code and "
        "the tests in one namespace and return results through a Queue.",
        table(header, rows),
        by_conc,
    ]
    if sandbox.get("throughput_by_workers"):
        parts.append(table(["sandbox workers (8 client threads)", "evaluations/s"],
                           [[r["workers"], f"{r['per_second']:.0f}"]
                            for r in sandbox["throughput_by_workers"]]))  # fmt: skip
    parts.append("![throughput](bench/results/throughput.png)\n"
                 "![sandbox latency](bench/results/sandbox_latency.png)")  # fmt: skip
    return "\n\n".join(parts)


def sessions_section(sessions: dict[str, Any]) -> str:
    rows = []
    for transport in ("ws", "http"):
        for run in runs_of(sessions, transport):
            lat = run["latency_ms"]
            rows.append([
                transport, run["sessions"], run["errors"], run["completed"],
                *(f"{lat[a]['p50']:.0f} / {lat[a]['p99']:.0f}" for a in PLOTTED_ACTIONS),
                f"{lat['SUBMIT']['p50']:.0f} / {lat['SUBMIT']['p99']:.0f}",
                run["steps_per_s"], f"{run['server_rss_kb_idle_sessions'] / 1024:.0f}",
                f"{run['server_rss_kb_per_idle_session']:.0f}",
                run["server_cpu_utilisation"], run["client_cpu_utilisation"],
            ])  # fmt: skip
    header = ["transport", "sessions", "errors", "completed", "VIEW p50/p99 ms",
              "REPLACE p50/p99 ms", "RUN_TESTS p50/p99 ms", "SUBMIT p50/p99 ms", "steps/s",
              "server RSS MiB", "KB per idle session", "server CPU", "client CPU"]  # fmt: skip
    half = runs_of(sessions, "ws", "tests-half")
    half_rows = [
        [run["sessions"], run["steps_per_session"], run["errors"], run["completed"],
         *(f"{run['latency_ms'][a]['p50']:.0f} / {run['latency_ms'][a]['p99']:.0f}"
           for a in ("REPLACE_LINES", "UNDO_EDIT", "RUN_TESTS", "SUBMIT")),
         f"{run['step_p99_ms']:.0f}", run["steps_per_s"], run["server_cpu_utilisation"]]
        for run in half
    ]  # fmt: skip
    half_header = ["WS sessions", "steps", "errors", "completed", "REPLACE p50/p99 ms",
                   "UNDO p50/p99 ms", "RUN_TESTS p50/p99 ms", "SUBMIT p50/p99 ms",
                   "step P99 ms", "steps/s", "server CPU"]  # fmt: skip
    extra = []
    if half:
        extra = [
            "Every session started at once, then RUN_TESTS on every other step (each on "
            "code that changed since the last run, so each is a real evaluation), a harmless "
            "edit or its undo in between, SUBMIT last:",
            table(half_header, half_rows),
        ]
    return "\n\n".join([
        "## Sessions (`bench/sessions_bench.py`)",
        f"Each session resets, then plays {sessions.get('steps_per_session', 20)} mixed steps "
        "(VIEW_CODE, REPLACE_LINES, RUN_TESTS, UNDO_EDIT, SUBMIT last); `ws` goes through "
        "openenv's typed client over `/ws`, `http` through stateful HTTP episodes with "
        "`episode_id`. The client runs on the same 2 cores. CPU is the share of the whole "
        "machine used during play; server CPU includes the sandbox workers and their "
        "children. RUN_TESTS and SUBMIT queue for the sandbox workers, so their latency "
        "grows with the number of sessions while VIEW and REPLACE stay short.",
        table(header, rows),
        *extra,
        "![latency vs sessions](bench/results/latency_vs_sessions.png)",
    ])  # fmt: skip


def soak_section(soak: dict[str, Any]) -> str:
    every = max(1, len(soak["samples"]) // 12)
    samples = [
        [s["episodes"], s["server_rss_mib"], s.get("server_threads", "?"), s["workers_rss_mib"],
         s["server_fds"], s["orphans"], s["leftover_entries"]]
        for s in soak["samples"][::every]
    ]  # fmt: skip
    text = (
        f"{soak['episodes']:,} WebSocket episodes, {soak['concurrency']} clients at once, "
        f"a new session every {soak['episodes_per_session']} episodes; each episode resets, "
        "views, edits, runs the tests and submits, and one in "
        f"{round(1 / soak['hostile_share'])} runs a hostile program instead (infinite loop, "
        "memory bomb, output flood, `os._exit`, deep recursion, filesystem writes, fork, "
        f"unencodable text). {soak['wall_s']} s, {soak['episodes_per_s']} episodes/s; "
        f"{soak['errors']} errors; sandbox faults {soak['sandbox_faults']}, respawns "
        f"{soak['sandbox_respawns']}; {soak['server_tracebacks']} tracebacks in the server "
        f"log. Server RSS grew {soak['rss_growth_after_warm_up_mib']} MiB after warm-up, "
        f"{soak['rss_slope_mib_per_1000_episodes']} MiB per 1,000 episodes (least squares); "
        f"after the server stopped: {soak['processes_after_stop']} processes and "
        f"{len(soak['left_behind_after_stop'])} entries left under its sandbox root."
    )
    header = ["episodes", "server RSS MiB", "server threads", "workers RSS MiB", "server fds",
              "orphans", "leftover entries"]  # fmt: skip
    return "\n\n".join(["## Soak (`bench/soak_bench.py`)", text, table(header, samples)])


def trace_section(trace: dict[str, Any]) -> str:
    speed, found = trace["speed"], trace["helpfulness"]
    tiers = speed["tiers"]
    speed_rows = [
        [tier, row["tasks"],
         f"{row['run_tests']['p50_ms']:.2f} / {row['run_tests']['p99_ms']:.2f}",
         f"{row['trace']['p50_ms']:.2f} / {row['trace']['p99_ms']:.2f}",
         f"{row['ratio_p50']}×",
         f"{row['ratio_p50_per_task_median']}× / {row['worst_task_ratio_p50']}×"]
        for tier, row in ((t, tiers[t]) for t in TIERS if t in tiers)
    ]  # fmt: skip
    speed_header = ["tier", "tasks", "RUN_TESTS p50 / p99 ms", "TRACE p50 / p99 ms",
                    "ratio of p50s", "per-task ratio median / worst"]  # fmt: skip

    def cells(tally: dict[str, Any]) -> list[Any]:
        row: list[Any] = [tally["n"]]
        row += [f"{tally[arm]['top1']} / {tally[arm]['top3']}" for arm, _ in LOCATOR_ARMS]
        ties = tally["trace"]
        row += [f"{ties['top1_random_ties']:g} / {ties['top3_random_ties']:g}",
                f"{ties['mean_steps']:g}"]  # fmt: skip
        return row

    located = [[tier, *cells(found["tiers"][tier])] for tier in TIERS if tier in found["tiers"]]
    located.append(["**all**", *cells(found["overall"])])
    located_header = ["tier", "tasks",
                      *(f"{name} top-1 / top-3" for _, name in LOCATOR_ARMS),
                      "TRACE, ties at random", "TRACE steps (RUN_TESTS: 1)"]  # fmt: skip
    quick = " (quick run: one task per tier)" if trace.get("quick") else ""
    return "\n\n".join([
        "## TRACE (`bench/trace_bench.py`)",
        f"Speed{quick}: in-process environment steps with the real sandbox, "
        f"{speed['rounds_per_task']} of each kind per task: RUN_TESTS (every visible test) "
        "against TRACE of the task's first failing visible test (the test run once as "
        "RUN_TESTS runs it, then once more under `sys.settrace`). Every measured step "
        "follows the same untimed toggle edit (a comment line appended, or undone), so "
        "RUN_TESTS never reuses its cached verdict and both kinds reach the sandbox every "
        "time; the kinds alternate. p50 and p99 pool the samples of the tier's tasks; the "
        "target holds per task.",
        table(speed_header, speed_rows),
        "Helpfulness: scripted fault locators name the buggy line of each curated task from "
        "observations only (never the solution); a hit is a line where `buggy_code` differs "
        "from `solution` (for an inserted fix, the buggy lines beside the insertion). "
        "*static*: statement lines in file order; *RUN_TESTS*: the lines where failing "
        "tests raised (one RUN_TESTS step), then static; *TRACE*: Ochiai over the executed "
        "lines of passing and failing tests (one TRACE per visible test), ties broken by the "
        "line a failing test raised at, then file order. Counts of tasks whose first 1 or 3 "
        "ranked lines hold a buggy line; \"ties at random\" is TRACE's expected count had "
        "its tied lines been ordered at random instead of by file order.",
        table(located_header, located),
    ])  # fmt: skip


def startup_section(cold: dict[str, Any] | None, gen: dict[str, Any] | None) -> str:
    parts = ["## Start-up and task generation"]
    if cold:
        first, bare = cold["first_reset_200"], cold["bare_python_start"]
        parts.append(
            f"`bench/coldstart_bench.py`: `{cold['command']}` from process spawn to the first "
            f"`POST /reset` answered 200, {first['runs']} runs: median {first['median_s']:.2f} "
            f"s (min {first['min_s']:.2f}, max {first['max_s']:.2f}); a bare `python -c pass` "
            f"takes {bare['median_s']:.3f} s (the server takes {cold['ratio_to_bare_python']}× as "
            "long)."
        )
    if gen:
        parts.append(
            f"`bench/generate_bench.py`: {gen['generated']} tasks from {gen['programs']} "
            f"programs generated and validated in the sandbox in "
            f"{gen['generation_and_validation_s']} s ({gen['tasks_per_second']} tasks/s); "
            f"loading the registry with the committed corpus takes "
            f"{gen['registry_load_with_corpus_s']} s ({gen['registry_tasks']} tasks)."
        )
    return "\n\n".join(parts)


def replicas_section(run: dict[str, Any]) -> str:
    """``bench/replicas.py``: replicas behind HAProxy sharing HTTP episodes through Redis."""
    parts = ["## Replicas behind HAProxy (`bench/replicas.py`)"]
    config = run.get("config", {})
    parts.append(
        f"{run.get('mode', '?')} run, {config.get('replicas', '?')} replicas on loopback "
        "behind Debian's HAProxy with `deploy/haproxy.cfg`, HTTP episodes in Debian's Redis "
        f"(`EPISODE_STORE`), {run.get('wall_s', '?')} s in all. Client, HAProxy, Redis and "
        "every replica share the machine's cores."
    )
    eq = run.get("equivalence", {})
    if eq:
        paths = {"direct": "directly, in turn", "haproxy": "through HAProxy"}
        rows = [[label, eq[name].get("bodies"), _yes(bool(eq[name].get("identical"))),
                 eq[name].get("replica_switches")]
                for name, label in paths.items() if name in eq]  # fmt: skip
        parts.append(
            f"**Equivalence.** {eq.get('episodes')} scripted HTTP episodes "
            f"({eq.get('steps_per_episode')} steps each, correct and wrong fixes) replayed "
            "on one in-process server, then with their steps alternating across replicas; "
            "every response body compared byte for byte:"
        )
        parts.append(table(["steps sent to the replicas", "bodies", "identical to one server",
                            "share of steps that changed replica"], rows))  # fmt: skip
    kill = run.get("kill", {})
    if kill:
        ws, http = kill.get("ws", {}), kill.get("http", {})
        timeline = kill.get("timeline_s", {})
        restart = kill.get("restart", {})
        parts.append(
            f"**Killing a replica mid-run** (SIGTERM to {kill.get('victim')} while "
            f"{ws.get('clients')} WebSocket clients and {http.get('episodes')} HTTP episodes "
            f"play): WebSocket close codes seen {ws.get('close_codes')}; the victim's "
            f"{ws.get('on_victim')} clients reconnected through HAProxy and finished: "
            f"{_yes(bool(ws.get('victim_clients_reconnected_and_finished')))}; the others "
            f"undisturbed: {_yes(bool(ws.get('others_undisturbed')))}. HTTP episodes: "
            f"{http.get('finished')} of {http.get('episodes')} finished, identical to one "
            f"server (nothing lost, nothing applied twice): "
            f"{_yes(bool(http.get('identical')))}, with {http.get('retries_total')} client "
            f"retries ({http.get('retries')}). The victim exited "
            f"{timeline.get('exit_after')} s after the signal; restarted, it was healthy "
            f"after {restart.get('healthy_after_s')} s and served "
            f"{restart.get('requests_served_by_victim')} of {restart.get('requests')} "
            "requests of a new run."
        )
    scaling = run.get("scaling", {})
    if scaling.get("points"):
        rows = []
        for point in scaling["points"]:
            cpu = point.get("cpu_cores", {})
            tests = point.get("latency_ms_by_action", {}).get("RUN_TESTS", {})
            rows.append([point["replicas"], point["steps_per_s"], point.get("ratio_to_1"),
                         point["latency_ms"]["p50"], point["latency_ms"]["p99"],
                         tests.get("p50"), point.get("errors"), cpu.get("replicas"),
                         cpu.get("haproxy"), cpu.get("redis"), cpu.get("client"),
                         point.get("machine_busy")])  # fmt: skip
        parts.append(
            f"**Throughput.** {scaling.get('sessions')} WebSocket sessions through HAProxy, "
            f"{scaling.get('duration_s')} s after a {scaling.get('warmup_s')} s warm-up; CPU "
            f"in cores used (the machine has {scaling.get('cpus')}):"
        )
        parts.append(table(["replicas", "steps/s", "× 1 replica", "p50 ms", "p99 ms",
                            "RUN_TESTS p50 ms", "errors", "CPU replicas", "CPU HAProxy",
                            "CPU Redis", "CPU client", "machine busy"], rows))  # fmt: skip
        parts.append(
            "Where it flattens, and why: with one replica, its sandbox workers "
            "(`SANDBOX_WORKERS`) are the limit, RUN_TESTS waiting in their queue while the "
            "cores still have room; a second replica brings more workers and fills the "
            "cores (machine busy near 1); past that, every replica, HAProxy and the client "
            "share the same cores, so more replicas add nothing here. Replicas on their own "
            "machines add their cores."
        )
    latency = run.get("redis_latency", {})
    if latency.get("difference_ms"):
        rows = []
        for action, diff in latency["difference_ms"].items():
            memory, shared = latency["memory"][action], latency["redis"][action]
            rows.append([action, memory["p50"], shared["p50"], diff["p50"], memory["p99"],
                         shared["p99"], diff["p99"]])  # fmt: skip
        parts.append(
            f"**What Redis costs an HTTP step** (one replica, sequential requests, "
            f"{latency.get('cycles')} interleaved cycles; Redis PING p50 "
            f"{latency.get('redis_ping_ms', {}).get('p50')} ms; "
            f"{latency.get('redis_commands_per_step')} Redis commands per step):"
        )
        parts.append(table(["action", "memory p50 ms", "Redis p50 ms", "+ p50", "memory p99 ms",
                            "Redis p99 ms", "+ p99"], rows))  # fmt: skip
    return "\n\n".join(parts)


def import_section(runs: list[tuple[str, dict[str, Any]]]) -> str:
    """``bench/import_bench.py``'s runs: the fixtures' (``import.json``) and any labelled run
    on the published datasets (``import_LABEL.json``)."""
    rows = []
    for label, run in runs:
        for name, counts in run["import"].items():
            played = run["played"].get(name, {})
            dropped = run["dropped"].get(name, {})
            reasons = Counter(re.sub(r"\S+\.py\b", "a program file", reason.split(";")[0])
                              for reason in dropped.values())  # fmt: skip
            rows.append([
                f"{label}: `{Path(run['inputs'][name]).name}`", name, counts["problems"],
                counts["kept"], counts["tests_kept"], counts["tests_dropped"],
                f"{counts['wall_s']} s",
                f"{played.get('solved_by_reference_fix')} of {played.get('tasks')}",
                played.get("solved_by_buggy_code"),
                "; ".join(f"{n}× {r}" for r, n in reasons.most_common()) or "none",
            ])  # fmt: skip
    header = ["input", "importer", "problems", "kept", "tests kept", "tests dropped", "import",
              "solved by the reference fix", "solved by the buggy code",
              "dropped because"]  # fmt: skip
    return "\n\n".join([
        "## Imported benchmarks",
        "`bench/import_bench.py`: each importer's wall time and counts, then every kept task "
        "played through a real server (its reference fix submitted; its buggy code submitted "
        "unchanged). The fixtures are in `tests/fixtures/`; the published datasets are not in "
        "the repository (the run on them is labelled).",
        table(header, rows),
    ])  # fmt: skip


def markdown(data: dict[str, dict[str, Any]]) -> str:
    """The whole ``BENCHMARKS.md`` text."""
    stamps = [d for d in data.values() if "machine" in d]
    machine = stamps[0]["machine"] if stamps else {}
    dates = sorted(d["date"] for d in stamps)
    parts = [
        "# Benchmarks",
        "Generated by `uv run python bench/run_all.py` (this file and the plots come from "
        "`bench/report.py`; raw numbers are in `bench/results/*.json`). "
        f"Machine: {machine.get('cpus')} CPUs, {machine.get('memory_gib')} GiB, "
        f"{machine.get('platform')}, Python {machine.get('python')}. "
        f"Run: {dates[0] if dates else '?'} to {dates[-1] if dates else '?'} (UTC). "
        "The machine is a shared VM whose timings are noisy: read ratios measured within "
        "one run before absolute numbers, and expect a few percent of drift between runs.",
        "## Targets",
        table(["target (2 cores)", "measured", "verdict"], [list(r) for r in targets(data)]),
    ]
    if "sandbox" in data:
        parts.append(sandbox_section(data["sandbox"]))
    if "sessions" in data:
        parts.append(sessions_section(data["sessions"]))
    if "soak" in data:
        parts.append(soak_section(data["soak"]))
    if "trace" in data:
        parts.append(trace_section(data["trace"]))
    if "replicas" in data:
        parts.append(replicas_section(data["replicas"]))
    imports = [(("fixtures" if name == "import" else name.removeprefix("import_")), run)
               for name, run in sorted(data.items()) if name.startswith("import")]  # fmt: skip
    if imports:
        parts.append(import_section(imports))
    parts.append(startup_section(data.get("coldstart"), data.get("generate")))
    return "\n\n".join(parts) + "\n"


def plot(data: dict[str, dict[str, Any]], out: Path) -> list[Path]:
    """Draw the PNGs that have data; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = []

    def figure(name: str, draw: Callable[[Any], None]) -> None:
        fig, axis = plt.subplots(figsize=(7, 4.2), dpi=110)
        draw(axis)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        drawn.append(out / name)

    sessions = data.get("sessions")
    if sessions and sessions.get("runs"):

        def latency(axis: Any) -> None:
            for transport, style in (("ws", "-"), ("http", "--")):
                runs = runs_of(sessions, transport)
                if not runs:
                    continue
                xs = [r["sessions"] for r in runs]
                for action in PLOTTED_ACTIONS:
                    ys = [r["latency_ms"][action]["p99"] / 1000 for r in runs]
                    axis.plot(xs, ys, style, marker="o", label=f"{transport} {action} P99")
            axis.axhline(TARGET_EDIT_P99_MS / 1000, color="grey", linewidth=0.8)
            axis.set_xscale("log", base=2)
            axis.set_xlabel("concurrent sessions")
            axis.set_ylabel("step latency P99 (s)")
            axis.set_title("Step latency vs concurrency (2 cores)")

        figure(PLOTS[0], latency)
    sandbox = data.get("sandbox")
    if sandbox:

        def throughput(axis: Any) -> None:
            conc = sandbox["throughput"]
            workers_used = sandbox["sandbox"]["workers"]
            axis.plot([r["concurrency"] for r in conc], [r["per_second"] for r in conc],
                      marker="o", label=f"vs client threads ({workers_used} workers)")  # fmt: skip
            workers = sandbox.get("throughput_by_workers") or []
            if workers:
                axis.plot([r["workers"] for r in workers], [r["per_second"] for r in workers],
                          marker="s", label="vs sandbox workers (8 threads)")  # fmt: skip
            axis.axhline(TARGET_EVALUATIONS_PER_S, color="grey", linewidth=0.8)
            axis.set_xlabel("client threads / sandbox workers")
            axis.set_ylabel("sandboxed evaluations/s")
            axis.set_title("Sandbox throughput (2 cores)")

        def tiers(axis: Any) -> None:
            series = [("ours (RUN_TESTS step)", sandbox["run_tests"]),
                      ("fork floor", sandbox["fork_floor"])]  # fmt: skip
            if sandbox.get("multiprocessing_small"):
                series.append(("plain multiprocessing", sandbox["multiprocessing_small"]))
            if sandbox.get("tracefix_baseline"):
                series.append(("TraceFix-style Process", sandbox["tracefix_baseline"]))
            width = 0.8 / len(series)
            for index, (label, stats) in enumerate(series):
                axis.bar([t + index * width for t in range(len(TIERS))],
                         [stats[tier]["p50_ms"] for tier in TIERS], width, label=label)  # fmt: skip
            axis.set_xticks([t + width * (len(series) - 1) / 2 for t in range(len(TIERS))])
            axis.set_xticklabels(TIERS)
            axis.set_ylabel("p50 latency (ms)")
            axis.set_title("RUN_TESTS latency by tier")

        figure(PLOTS[1], throughput)
        figure(PLOTS[2], tiers)
    return drawn


def write(results: Path = RESULTS, target: Path = BENCHMARKS_MD) -> tuple[Path, list[Path]]:
    """Plot into ``results`` and write the table to ``target``, from the results in
    ``results``."""
    data = load(results)
    drawn = plot(data, results)
    target.write_text(markdown(data))
    return target, drawn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="folder of the result JSON; the plots go there too")  # fmt: skip
    parser.add_argument("--target", type=Path, default=BENCHMARKS_MD,
                        help="the Markdown table to write (default: BENCHMARKS.md)")  # fmt: skip
    args = parser.parse_args()
    target, drawn = write(args.results, args.target)
    print(f"wrote {target} and {', '.join(str(p) for p in drawn)}")


if __name__ == "__main__":
    main()
