"""Start-up work kept off the critical path (server/startup.py)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO, run_refused_server

PROBE = """
import sys
from tracefix_rl.server.app import app  # builds the app, as a server start does
print("fastmcp loaded at start:", "fastmcp" in sys.modules)
print("pydantic.v1 loaded at start:", "pydantic.v1" in sys.modules)
import openenv.core.env_server as env_server
print("package export:", env_server.MCPEnvironment)
from openenv.core.env_server import mcp_environment
print("tools:", mcp_environment.get_server_tools(object()))
from openenv.core.env_server.mcp_environment import MCPEnvironment
print("on demand:", MCPEnvironment.__name__, "fastmcp" in sys.modules)
"""


def test_server_start_defers_the_mcp_runtime_until_something_asks():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "fastmcp loaded at start: False",
        "pydantic.v1 loaded at start: False",
        "package export: None",
        "tools: {}",
        "on demand: MCPEnvironment True",
    ]


def test_pydantic_v1_is_declined_only_inside_the_block():
    probe = (
        "import sys\n"
        "from tracefix_rl.server import startup\n"
        "with startup.no_pydantic_v1():\n"
        "    try:\n"
        "        import pydantic.v1\n"
        "    except ImportError:\n"
        "        print('declined')\n"
        "import pydantic.v1\n"
        "print('after:', pydantic.v1.BaseModel.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["declined", "after: BaseModel"]


def test_server_refuses_to_start_when_the_sandbox_cannot_isolate():
    out = run_refused_server({"SANDBOX_DISABLE_SECCOMP": "1", "SANDBOX_ALLOW_DEGRADED": None})
    assert out.returncode != 0
    assert "SANDBOX_ALLOW_DEGRADED=1" in out.stderr
    assert "Uvicorn running" not in out.stderr  # it never accepted connections
