"""The app factory (``server/app.py``, ``server/loader.py``): importing or building the app
starts nothing; its lifespan starts the sandbox workers and loads the tasks before it serves,
and closes the sandbox at shutdown; the settings reach the app."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

TASK = "sum_of_evens_wrong_modulus"
PROBE = f"""
import json, os, sys

from tracefix_rl.procs import children_of

TASK = {TASK!r}

def children():
    return children_of(os.getpid())

def facts():
    sandbox = sys.modules["tracefix_rl.sandbox"]
    registry = sys.modules.get("tracefix_rl.tasks.registry")
    return {{"children": len(children()), "sandbox": sandbox._default is not None,
            "registry": registry is not None and registry._registry is not None,
            "tasks_imported": registry is not None}}

report = {{}}
import tracefix_rl.server.app as server_app
report["imported"] = facts()
report["light"] = {{name: name in sys.modules for name in ("openenv", "fastapi", "uvicorn")}}
app = server_app.app
report["built"] = facts()
from fastapi.testclient import TestClient
with TestClient(app) as client:
    report["serving"] = facts()
    reset = client.post("/reset", json={{"task_id": TASK}})
    report["steps_remaining"] = reset.json()["observation"]["steps_remaining"]
    report["body_limit"] = client.post("/reset", content=b"x" * 5000).status_code
report["stopped"] = facts()
print(json.dumps(report))
"""


def run_probe(extra_env: dict[str, str]) -> dict:
    env = {**os.environ, "LOG_LEVEL": "WARNING", **extra_env}
    env.pop("ENABLE_WEB_INTERFACE", None)
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_import_and_build_start_nothing_and_the_lifespan_starts_and_stops_everything(
    tmp_path: Path,
):
    report = run_probe({"SANDBOX_WORKERS": "2", "SANDBOX_ROOT": str(tmp_path),
                        "MAX_STEPS": "7", "MAX_REQUEST_BYTES": "4096"})  # fmt: skip
    nothing = {"children": 0, "sandbox": False, "registry": False}
    assert {k: report["imported"][k] for k in nothing} == nothing
    assert report["imported"]["tasks_imported"] is False
    assert report["light"] == {"openenv": False, "fastapi": False, "uvicorn": False}
    assert {k: report["built"][k] for k in nothing} == nothing
    serving = report["serving"]
    # two workers, each holding one pre-forked child (a grandchild: not counted here)
    assert serving["children"] == 2 and serving["sandbox"] and serving["registry"]
    assert report["steps_remaining"] == 7  # MAX_STEPS reached the episodes
    assert report["body_limit"] == 413  # MAX_REQUEST_BYTES reached the middleware
    assert report["stopped"]["children"] == 0 and report["stopped"]["sandbox"] is False
    assert list(tmp_path.iterdir()) == []  # the sandbox root was removed at shutdown
