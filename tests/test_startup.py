"""Start-up work kept off the critical path: the MCP runtime is deferred in the server."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

PROBE = """
import sys
import server.app
print("fastmcp loaded at start:", "fastmcp" in sys.modules)
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
        "package export: None",
        "tools: {}",
        "on demand: MCPEnvironment True",
    ]
