"""Imports public benchmarks and plays every imported task through a real server.

    uv run python bench/import_bench.py [--quixbugs DIR] [--humanevalpack FILE]

Defaults are the hand-written fixtures in ``tests/fixtures`` (the datasets are not in the
repository); point the options at a QuixBugs checkout and the HumanEvalPack Python JSONL to
measure the real ones. For each benchmark: the import command's wall time and its counts,
then, with the packs served by ``python -m tracefix_rl.server.app`` (``TRACEFIX_TASKS``),
every kept task is played over HTTP twice: its reference fix (REPLACE_LINES over the whole
program, then SUBMIT) must be solved, and the buggy program submitted unchanged must not be.
Results go to ``bench/results/import.json`` (``--label NAME``: ``import_NAME.json``, e.g.
``--label published`` for a run on the published datasets, which ``bench/report.py`` shows
next to the fixtures' run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from common import REPO, add_results_option, free_port, stop_process_group, write_result

FIXTURES = REPO / "tests" / "fixtures"
START_TIMEOUT_S = 300.0


def run_import(benchmark: str, source: Path, output: Path) -> dict[str, Any]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "tracefix_rl.tasks", "import", benchmark, str(source),
         "-o", str(output), "--json"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    report = json.loads(done.stdout)
    report["wall_s"] = round(time.monotonic() - started, 1)
    return report


def play(client: httpx.Client, entry: dict[str, Any], code: str) -> dict[str, Any]:
    """One episode: replace the whole program with ``code``, submit; the final observation."""
    client.post("/reset", json={"task_id": entry["task_id"]}).raise_for_status()
    lines = len(entry["buggy_code"].strip("\n").splitlines())
    edit = {"action_type": "REPLACE_LINES", "start_line": 1, "end_line": lines,
            "new_code_block": code.strip("\n")}  # fmt: skip
    if code != entry["buggy_code"]:
        client.post("/step", json={"action": edit}).raise_for_status()
    final = client.post("/step", json={"action": {"action_type": "SUBMIT"}})
    final.raise_for_status()
    return final.json()["observation"]


def serve_and_play(folder: Path, packs: dict[str, Path]) -> dict[str, Any]:
    port = free_port()
    env = {**os.environ, "TRACEFIX_TASKS": str(folder), "LOG_LEVEL": "WARNING"}
    command = [sys.executable, "-m", "tracefix_rl.server.app", "--port", str(port)]
    server = subprocess.Popen(
        [*command, "--host", "127.0.0.1"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                health = httpx.get(f"{url}/health", timeout=2).json()
                break
            except (httpx.HTTPError, ValueError):
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.5)
        results: dict[str, Any] = {"tasks_skipped_at_start": health["tasks_skipped"]}
        with httpx.Client(base_url=url, timeout=120) as client:
            for name, pack in packs.items():
                entries = [json.loads(line) for line in pack.read_text().splitlines()]
                fixed = buggy = 0
                unsolved = []
                for entry in entries:
                    if play(client, entry, entry["solution"])["solved"]:
                        fixed += 1
                    else:
                        unsolved.append(entry["task_id"])
                    buggy += bool(play(client, entry, entry["buggy_code"])["solved"])
                    print(f"{name}: {entry['task_id']} played", file=sys.stderr, flush=True)
                results[name] = {"tasks": len(entries), "solved_by_reference_fix": fixed,
                                 "unsolved": unsolved, "solved_by_buggy_code": buggy}  # fmt: skip
        return results
    finally:
        stop_process_group(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quixbugs", type=Path, default=FIXTURES / "quixbugs",
                        help="a QuixBugs checkout (default: the test fixture)")  # fmt: skip
    parser.add_argument("--humanevalpack", type=Path,
                        default=FIXTURES / "humanevalpack-python.jsonl",
                        help="HumanEvalPack Python JSONL (default: a test fixture)")  # fmt: skip
    parser.add_argument("--label", help="write import_LABEL.json (e.g. published)")
    add_results_option(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tracefix-import-bench-") as scratch:
        folder = Path(scratch)
        packs = {"quixbugs": folder / "quixbugs.jsonl",
                 "humanevalpack": folder / "humanevalfix.jsonl"}  # fmt: skip
        sources = {"quixbugs": args.quixbugs, "humanevalpack": args.humanevalpack}
        imports = {name: run_import(name, sources[name], packs[name]) for name in packs}
        for name, report in imports.items():
            print(f"{name}: {report['kept']} of {report['problems']} kept in {report['wall_s']}s",
                  file=sys.stderr)  # fmt: skip
        played = serve_and_play(folder, packs)
    summary = {
        "inputs": {"quixbugs": str(args.quixbugs), "humanevalpack": str(args.humanevalpack)},
        "import": {name: {k: r[k] for k in ("problems", "kept", "tests_kept", "tests_dropped",
                                            "by_tier", "skipped_without_cases", "wall_s")}
                   for name, r in imports.items()},
        "dropped": {name: {row["problem"]: row["reason"] for row in r["rows"] if not row["kept"]}
                    for name, r in imports.items()},
        "played": played,
    }  # fmt: skip
    write_result(f"import_{args.label}" if args.label else "import", summary, args.results)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
