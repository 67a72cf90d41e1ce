"""The OpenAPI schema is the contract: schemathesis (every check) finds no failure against a
live server, and each route documents every status it can answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import REPO

ST = Path(sys.executable).parent / "st"
CONFIG = REPO / "tests" / "schemathesis.toml"
# Examples per operation and phase: about 1,500 requests in 13-20 s on 2 cores; a fixed
# seed keeps CI reproducible (explore with `st run --seed N -n 300` by hand).
MAX_EXAMPLES = 100
SEED = 7
MIN_TEST_CASES = 1000  # a run that generated fewer tested too little to count


def test_schemathesis_finds_no_contract_failure(start_server, tmp_path):
    # Enough HTTP episode slots that /reset never sheds load during the run: a 503 is a
    # documented answer, but `not_a_server_error` (rightly) counts every 5xx as a failure.
    proc = start_server(extra_env={"HTTP_MAX_EPISODES": "4096"})
    report = tmp_path / "report.json"
    run = subprocess.run(
        [str(ST), "--config-file", str(CONFIG), "run", f"{proc.url}/openapi.json",
         "--checks", "all", "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED),
         "--report", "json", "--report-json-path", str(report)],
        cwd=tmp_path,  # schemathesis writes its working files to the current directory
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_COLOR": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
    summary = json.loads(report.read_text())
    assert summary["failures"] == [] and summary["errors"] == []
    assert summary["operations"]["tested"] == summary["operations"]["total"] >= 8
    assert summary["test_cases"]["generated"] >= MIN_TEST_CASES
    assert {p: s["status"] for p, s in summary["phases"].items()} == {
        "examples": "success", "coverage": "success", "fuzzing": "success",
        "stateful": "success",
    }  # fmt: skip
    assert "Traceback" not in proc.log()


def test_openapi_documents_every_status(server):
    schema = httpx.get(f"{server.url}/openapi.json").json()
    statuses = {
        (path, method): set(operation["responses"])
        for path, item in schema["paths"].items()
        for method, operation in item.items()
    }
    # 413 (the body limit) and 503 (shutdown, server.serve) can answer on every route
    assert statuses == {
        ("/reset", "post"): {"200", "400", "413", "422", "503"},
        ("/step", "post"): {"200", "400", "404", "413", "422", "503"},
        ("/state", "get"): {"200", "404", "413", "422", "503"},
        ("/health", "get"): {"200", "413", "503"},
        ("/tasks", "get"): {"200", "413", "422", "503"},
        ("/schema", "get"): {"200", "413", "503"},
        ("/metadata", "get"): {"200", "413", "503"},
        ("/mcp", "post"): {"200", "202", "404", "413", "503"},
        ("/mcp", "delete"): {"204", "400", "404", "413", "503"},
        # openenv 0.10's Task API
        ("/list_environments", "get"): {"200", "413", "503"},
        ("/{env_name}/splits", "get"): {"200", "400", "404", "413", "422", "503"},
        ("/{env_name}/tasks", "post"): {"200", "400", "404", "413", "422", "503"},
        ("/{env_name}/num_tasks", "post"): {"200", "400", "404", "413", "422", "503"},
        ("/{env_name}/task", "post"): {"200", "400", "404", "413", "422", "503"},
        ("/{env_name}/task_range", "post"): {"200", "400", "404", "413", "422", "503"},
    }
    reset = schema["paths"]["/reset"]["post"]["responses"]
    assert reset["503"]["headers"]["Retry-After"]["schema"] == {"type": "integer", "minimum": 1}
    assert set(reset["200"]["links"]) == {"StepEpisode", "ReadState"}
    # /step's body is the real action model: unknown action keys are refused, as documented
    components = schema["components"]["schemas"]
    step_body = components["EpisodeStepRequest"]
    assert step_body["properties"]["action"]["$ref"] == "#/components/schemas/TraceFixAction"
    assert components["TraceFixAction"]["additionalProperties"] is False
    assert step_body.get("additionalProperties") is True  # openenv's StepRequest keys pass
    seed = components["ResetArgs"]["properties"]["seed"]["anyOf"][0]
    assert seed == {"type": "integer", "minimum": 0}
