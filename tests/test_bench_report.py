"""bench/report.py: the table and plots come from the result files, verdicts included."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

import report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRACE_TARGET = "TRACE p50 ≤ 3× RUN_TESTS p50 of the same task"


def committed_results(tmp_path: Path) -> Path:
    results = tmp_path / "results"
    shutil.copytree(REPO / "bench" / "results", results, ignore=shutil.ignore_patterns("*.png"))
    return results


def verdicts(markdown: str) -> dict[str, str]:
    section = markdown.split("## Targets", 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| ")]
    return {row[0].lstrip("| "): row[-1].rstrip(" |") for row in rows[1:]}


def test_report_writes_table_and_plots_from_the_results(tmp_path):
    results = committed_results(tmp_path)
    target, drawn = report.write(results, tmp_path / "BENCHMARKS.md")
    assert sorted(p.name for p in drawn) == sorted(report.PLOTS)
    for png in drawn:
        assert png.read_bytes()[:8] == PNG_MAGIC
    text = target.read_text()
    sessions = json.loads((results / "sessions.json").read_text())
    for run in sessions["runs"]:
        assert f"| {run['transport']} | {run['sessions']} | {run['errors']} |" in text
    found = verdicts(text)
    assert len(found) >= 8 and set(found.values()) <= {"**met**", "**not met**"}
    trace = json.loads((results / "trace.json").read_text())
    assert "## TRACE (`bench/trace_bench.py`)" in text
    assert TRACE_TARGET in found
    for tier, row in trace["speed"]["tiers"].items():
        assert f"| {tier} | {row['tasks']} | {row['run_tests']['p50_ms']:.2f} / " in text
    overall = trace["helpfulness"]["overall"]
    assert (f"| **all** | {overall['n']} | {overall['static']['top1']} / "
            f"{overall['static']['top3']} | {overall['run_tests']['top1']} / "
            f"{overall['run_tests']['top3']} | {overall['trace']['top1']} / "
            f"{overall['trace']['top3']} |") in text  # fmt: skip


def test_a_failed_run_is_reported_as_not_met(tmp_path):
    results = committed_results(tmp_path)
    sessions = json.loads((results / "sessions.json").read_text())
    for run in sessions["runs"]:
        if run["transport"] == "ws" and run["sessions"] == report.TARGET_SESSIONS:
            run["errors"] = 3
            run["latency_ms"]["VIEW_CODE"]["p99"] = 2500.0
    (results / "sessions.json").write_text(json.dumps(sessions))
    cold = json.loads((results / "coldstart.json").read_text())
    cold["first_reset_200"]["median_s"] = 9.0
    (results / "coldstart.json").write_text(json.dumps(cold))
    trace = json.loads((results / "trace.json").read_text())
    for row in trace["speed"]["tasks"].values():
        row["ratio_p50"] = 1.0
    found = verdicts(report.markdown({"trace": trace}))
    assert found[TRACE_TARGET] == "**met**"
    next(iter(trace["speed"]["tasks"].values()))["ratio_p50"] = 3.5  # one task is enough
    (results / "trace.json").write_text(json.dumps(trace))
    found = verdicts(report.markdown(report.load(results)))
    assert found["512 concurrent WS sessions, 0 errors"] == "**not met**"
    assert found["P99 VIEW/REPLACE < 1 s at 512 sessions"] == "**not met**"
    assert found["cold start to first /reset 200 ≤ 2 s"] == "**not met**"
    assert found[TRACE_TARGET] == "**not met**"
