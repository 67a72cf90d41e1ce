"""The MCP tools (``server/mcp.py``, ``server/mcp_sessions.py``): the tools are the action
registry plus ``start_episode``; a task is solved through each client (fastmcp's ``Client``
over streamable HTTP, openenv's ``MCPToolClient`` over HTTP and over WebSocket, bare
JSON-RPC over WebSocket ``/mcp`` and ``{"type": "mcp"}`` frames on ``/ws``); MCP sessions
have a limit of their own, unused ones are reaped, and they never take ``/ws`` slots."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import websockets
from openenv.core.env_server.mcp_types import (
    RESERVED_TOOL_NAMES,
    CallToolAction,
    JsonRpcRequest,
    ListToolsAction,
)
from openenv.core.mcp_client import MCPToolClient
from websockets.exceptions import ConnectionClosed

from tests.conftest import REPO, ServerProcess, run_in_package_copy
from tracefix_rl.actions import ACTIONS
from tracefix_rl.models import TestResult, TraceFixAction, TraceFixObservation
from tracefix_rl.server import mcp
from tracefix_rl.settings import Settings

TASK = "sum_of_evens_wrong_modulus"  # line 5 is the bug (n % 2 == 1)
FIX = {"start_line": 5, "end_line": 5, "new_code_block": "if n % 2 == 0:"}
WAIT_S = 30.0
JSON = {"content-type": "application/json"}


def rpc(method: str, params: dict[str, Any] | None = None, request_id: Any = 1) -> dict:
    body: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": params or {}}
    if request_id is not None:
        body["id"] = request_id
    return body


def ws_base(server: ServerProcess) -> str:
    return server.url.replace("http://", "ws://", 1)


@pytest.fixture(scope="module")
def mcp_server() -> Iterator[ServerProcess]:
    proc = ServerProcess()
    yield proc
    logged = proc.log()
    proc.stop()
    assert "Traceback" not in logged, logged[-3000:]


# -- the tools are the registry ---------------------------------------------------------------


def test_tools_are_the_action_registry_plus_start_episode():
    listed = asyncio.run(mcp.dispatch(JsonRpcRequest(**rpc("tools/list")), None,
                                      mcp.Transport.OPENENV_HTTP)).result["tools"]  # fmt: skip
    assert [t["name"] for t in listed] == ["start_episode"] + [a.name.lower() for a in ACTIONS]
    for tool, action in zip(listed[1:], ACTIONS, strict=True):
        assert tool == {"name": action.name.lower(), "description": action.description,
                        "inputSchema": action.tool_schema()}  # fmt: skip
    assert not {t["name"] for t in listed} & RESERVED_TOOL_NAMES
    start = listed[0]["inputSchema"]
    assert list(start["properties"]) == list(mcp.START_FIELDS) and "required" not in start
    assert start["properties"]["difficulty"]["enum"] == ["easy", "medium", "hard"]
    seed = start["properties"]["seed"]
    assert seed == {"type": "integer", "minimum": 0, "description": seed["description"]}


NEW_ACTION = '''
"""COUNT_LINES: say how long the file is (a test's action)."""

from tracefix_rl.actions.base import Action


class CountLines(Action):
    name = "COUNT_LINES"
    order = 15
    description = "Say how many lines the file has."

    def apply(self, episode, params):
        episode.output = f"{len(episode.editor)} lines"
        return 0.0
'''

NEW_ACTION_PROBE = """
import asyncio, sys
from pathlib import Path
import tracefix_rl
from tracefix_rl.actions import get_action
from tracefix_rl.environment import TraceFixEnvironment
from tracefix_rl.sandbox import close_sandbox
from tracefix_rl.server import mcp
from tracefix_rl.tasks.registry import load_registry

assert Path(tracefix_rl.__file__).parent == Path(sys.argv[1])  # the copy, not the checkout
tool = mcp.TOOLS_BY_NAME["count_lines"]
action = get_action("COUNT_LINES")
assert tool.listing() == {"name": "count_lines", "description": action.description,
                          "inputSchema": action.tool_schema()}
assert [t.name for t in mcp.TOOLS][:3] == ["start_episode", "view_code", "count_lines"]
env = TraceFixEnvironment(registry=load_registry(
    builtin_dir=Path(sys.argv[1]) / "task_data" / "curated", corpus=None))

class Context:
    session_id, env, protocol_version = "s", env, None
    async def run_call(self, function):
        return function()

async def call(name, arguments):
    request = mcp.JsonRpcRequest(jsonrpc="2.0", method="tools/call", id=1,
                                 params={"name": name, "arguments": arguments})
    return (await mcp.dispatch(request, Context(), mcp.Transport.OPENENV_HTTP)).result

try:
    asyncio.run(call("start_episode", {"task_id": sys.argv[2]}))
    result = asyncio.run(call("count_lines", {}))
    assert result["data"]["last_execution_output"] == "7 lines", result
    assert result["data"]["step_count"] == 1 and not result["isError"]
finally:
    env.close()
    close_sandbox()
print("count_lines works")
"""


def test_a_new_action_module_is_a_new_tool(tmp_path):
    """One more module in actions/ (a copy of the package) is one more tool, listed and
    callable, with no other change."""
    probe = run_in_package_copy(tmp_path, {"actions/count_lines.py": NEW_ACTION}, TASK,
                                NEW_ACTION_PROBE)  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "count_lines works"


def test_the_docs_list_the_tools_and_the_settings_are_documented():
    page = (REPO / "docs" / "mcp.md").read_text()
    assert mcp.tool_table() in page
    readme = (REPO / "README.md").read_text()
    assert "(docs/mcp.md)" in readme.split("\n## Use as MCP tools\n", 1)[1].split("\n## ", 1)[0]
    contents = readme.split("\n## Contents\n", 1)[1].split("\n## ", 1)[0]
    order = [line for line in contents.splitlines() if line.startswith("- [")]
    protocol = order.index("- [Protocol: HTTP and WebSocket](#protocol-http-and-websocket)")
    assert order[protocol + 1] == "- [Use as MCP tools](#use-as-mcp-tools)"
    assert readme.index("\n## Protocol: HTTP and WebSocket\n") < readme.index(
        "\n## Use as MCP tools\n") < readme.index("\n## Baseline agent")  # fmt: skip
    for name in ("mcp_max_sessions", "mcp_idle_timeout_s"):
        assert name.upper() in page and Settings.model_fields[name].description


def test_the_documented_examples_solve_the_task(mcp_server):
    """The MCPToolClient and fastmcp examples of docs/mcp.md, pasted as they are (but the URL)."""
    page = (REPO / "docs" / "mcp.md").read_text()
    examples = re.findall(r"```python\n(.*?)```", page, re.S)
    assert len(examples) == 2
    for example in examples:
        code = example.replace("http://127.0.0.1:8000", mcp_server.url)
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=120, cwd=REPO)  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert run.stdout.splitlines()[-1].endswith("True"), run.stdout  # solved


def test_the_text_says_what_the_observation_says():
    obs = TraceFixObservation(
        done=True, reward=1.25, task_id="t", difficulty="easy", description="Do it.",
        episode_id="ep", code_dict={1: "x = 1"}, localized_context=">>    1 | x = 1",
        last_execution_output="Submitted: 3/3 tests pass.", tests_passed=2, tests_total=2,
        test_results=[TestResult(test_name="a", passed=True)] * 2, step_count=4,
        steps_remaining=46, last_action_error=None, score=1.0, solved=True, truncated=False,
    )  # fmt: skip
    text = mcp.observation_text(obs, started=True)
    for part in ("Episode ep: task t (easy)", "Do it.", "Submitted: 3/3 tests pass.",
                 ">>    1 | x = 1", "the file has 1 lines", "passing: 2/2", "Step 4, 46 left",
                 "reward 1.25", "done: true", "score 1.000, solved: true"):  # fmt: skip
        assert part in text, (part, text)
    rejected = obs.model_copy(update={"last_action_error": "no", "done": False, "score": None,
                                      "test_results": []})  # fmt: skip
    text = mcp.observation_text(rejected)
    assert text.startswith("Error: no") and "not run yet" in text and "score" not in text
    result = mcp.call_result(mcp.Outcome(rejected), structured=True, data=True)
    assert result["isError"] and result["structuredContent"] == result["data"]
    assert result["data"]["code_dict"] == {"1": "x = 1"} and result["data"]["reward"] == 1.25


# -- a task solved through each client ----------------------------------------------------------


def test_fastmcp_client_solves_a_task_over_streamable_http(mcp_server):
    from fastmcp import Client
    from fastmcp.exceptions import ToolError

    async def scenario() -> str:
        async with Client(f"{mcp_server.url}/mcp") as client:
            info = client.initialize_result
            assert info.serverInfo.name == "tracefix_rl" and info.capabilities.tools
            assert "start_episode" in (info.instructions or "")
            names = [tool.name for tool in await client.list_tools()]
            assert names == [t.name for t in mcp.TOOLS]
            started = await client.call_tool("start_episode", {"task_id": TASK})
            assert started.data["task_id"] == TASK and "n % 2 == 1" in started.content[0].text
            with pytest.raises(ToolError, match="start_line"):
                await client.call_tool("replace_lines", {"start_line": "five"})
            failing = await client.call_tool("run_tests", {})
            assert failing.data["tests_passed"] < failing.data["tests_total"] == 4
            await client.call_tool("replace_lines", FIX)
            done = await client.call_tool("submit", {})
            assert done.data["done"] and done.data["solved"] and done.data["score"] == 1.0
            assert done.structured_content == done.data and done.data["reward"] > 0
            assert "solved: true" in done.content[0].text
            return client.transport.get_session_id()

    session_id = asyncio.run(scenario())
    # the client closed its session (DELETE /mcp) on the way out
    gone = httpx.post(f"{mcp_server.url}/mcp", json=rpc("tools/list"),
                      headers={"mcp-session-id": session_id})  # fmt: skip
    assert gone.status_code == 404 and gone.json()["error"]["code"] == -32600


def test_mcp_tool_client_solves_a_task_over_http(mcp_server):
    async def scenario() -> None:
        async with MCPToolClient(base_url=mcp_server.url) as env:
            assert [t.name for t in await env.list_tools()] == [t.name for t in mcp.TOOLS]
            started = await env.call_tool("start_episode", task_id=TASK)
            assert started["task_id"] == TASK and started["step_count"] == 0
            rejected = await env.call_tool("view_code", start_line=99)
            assert "outside the file" in rejected["last_action_error"]
            await env.call_tool("replace_lines", **FIX)
            done = await env.call_tool("submit")
            assert done["done"] and done["solved"] and done["step_count"] == 3

    asyncio.run(scenario())


def test_mcp_tool_client_solves_a_task_over_websocket(mcp_server):
    """``MCPToolClient`` plays over ``/ws?session_id=``: reset and OpenEnv's MCP step actions
    with rewards, on the environment its HTTP tool calls share."""

    async def scenario() -> None:
        async with MCPToolClient(base_url=mcp_server.url) as env:
            reset = await env.reset(task_id=TASK)
            assert reset.observation.task_id == TASK and not reset.done
            listed = await env.step(ListToolsAction())
            assert [t.name for t in listed.observation.tools] == [t.name for t in mcp.TOOLS]
            fixed = await env.step(CallToolAction(tool_name="replace_lines", arguments=FIX))
            assert fixed.observation.error is None and fixed.reward < 0 and not fixed.done
            assert fixed.observation.result["data"]["step_count"] == 1
            shared = await env.call_tool("run_tests")  # over HTTP, the same environment
            assert shared["step_count"] == 2 and shared["tests_passed"] == 4
            done = await env.step(CallToolAction(tool_name="submit"))
            assert done.done and done.reward > 0 and done.observation.result["data"]["solved"]
            unknown = await env.step(CallToolAction(tool_name="nope"))
            assert unknown.observation.error.error_type.value == "tool_not_found"
            assert (await env.state()).step_count == 3

    asyncio.run(scenario())


def test_bare_json_rpc_over_websocket_mcp_and_ws_frames_solves_a_task(mcp_server):
    async def solve(url: str, wrap: bool) -> dict:
        async with websockets.connect(url) as sock:

            async def call(name: str, arguments: dict | None = None) -> dict:
                body = rpc("tools/call", {"name": name, "arguments": arguments or {}})
                await sock.send(json.dumps({"type": "mcp", "data": body} if wrap else body))
                answer = json.loads(await asyncio.wait_for(sock.recv(), WAIT_S))
                return answer["data"]["result"] if wrap else answer["result"]

            assert (await call("view_code"))["content"][0]["text"].startswith("Error: no episode")
            assert (await call("start_episode", {"task_id": TASK}))["data"]["task_id"] == TASK
            await call("replace_lines", FIX)
            done = await call("submit")
            again = await call("submit")
            assert again["isError"] and "start_episode" in again["content"][0]["text"]
            return done

    for url, wrap in ((ws_base(mcp_server) + "/mcp", False), (ws_base(mcp_server) + "/ws", True)):
        done = asyncio.run(solve(url, wrap))
        assert done["data"]["solved"] and done["structuredContent"]["solved"], url


# -- the streamable HTTP transport ---------------------------------------------------------------


def test_streamable_http_sessions_headers_and_statuses(mcp_server):
    url = f"{mcp_server.url}/mcp"
    init = {"protocolVersion": "1999-01-01", "capabilities": {},
            "clientInfo": {"name": "t", "version": "0"}}  # fmt: skip
    opened = httpx.post(url, json=rpc("initialize", init))
    session = opened.headers["mcp-session-id"]
    assert opened.status_code == 200 and opened.json()["result"]["protocolVersion"] == "2025-11-25"
    header = {"mcp-session-id": session}
    notified = httpx.post(url, json=rpc("notifications/initialized", request_id=None),
                          headers=header)  # fmt: skip
    assert notified.status_code == 202 and notified.content == b""
    assert httpx.post(url, json=rpc("ping"), headers=header).json()["result"] == {}
    old = httpx.post(url, json=rpc("initialize", {**init, "protocolVersion": "2025-03-26"}),
                     headers=header).json()  # fmt: skip
    assert old["result"]["protocolVersion"] == "2025-03-26"
    started = httpx.post(url, json=rpc("tools/call", {"name": "start_episode"}), headers=header)
    result = started.json()["result"]
    assert "structuredContent" not in result and "data" not in result  # 2025-03-26 has neither
    assert "Episode " in result["content"][0]["text"]
    # the same session through OpenEnv's JSON-RPC: the id is the capability
    shared = httpx.post(url, json=rpc("tools/call", {"name": "view_code", "session_id": session}))
    assert shared.json()["result"]["data"]["step_count"] == 1
    no_stream = httpx.get(url)  # this server sends no server-to-client stream
    assert no_stream.status_code == 405 and no_stream.headers["allow"] == "DELETE, POST"
    assert httpx.delete(url, headers=header).status_code == 204
    assert httpx.delete(url, headers=header).status_code == 404
    assert httpx.post(url, json=rpc("ping"), headers=header).status_code == 404
    assert httpx.delete(url).status_code == 400
    assert httpx.post(url, json={}).json()["jsonrpc"] == "2.0"  # what `openenv validate` checks


# -- no capacity abuse ----------------------------------------------------------------------------


def test_mcp_sessions_have_their_own_limit_and_unused_ones_go_quickly(start_server):
    """The old abuse (session creations taking ``/ws`` slots on a small server): every kind of
    MCP session counts against MCP_MAX_SESSIONS; beyond it each is refused with a JSON-RPC
    error that says so, while ``/ws`` and HTTP episodes still play; unused sessions are gone
    after MCP_IDLE_TIMEOUT_S, and one with an episode stays."""
    from fastmcp import Client
    from mcp.shared.exceptions import McpError

    proc = start_server(extra_env={"MAX_CONCURRENT_ENVS": "2", "HTTP_MAX_EPISODES": "1",
                                   "MCP_MAX_SESSIONS": "2", "MCP_IDLE_TIMEOUT_S": "2"})  # fmt: skip
    url = f"{proc.url}/mcp"

    def create() -> dict:
        answer = httpx.post(url, json=rpc("openenv/session/create"))
        assert answer.status_code == 200
        return answer.json()

    def call(session_id: str, name: str, arguments: dict | None = None) -> dict:
        params = {"name": name, "arguments": arguments or {}, "session_id": session_id}
        return httpx.post(url, json=rpc("tools/call", params)).json()

    created = [create() for _ in range(6)]
    ids = [c["result"]["session_id"] for c in created[:2]]
    for session_id in ids:  # an episode keeps a session for SESSION_TIMEOUT_S (600 s)
        assert call(session_id, "start_episode", {"task_id": TASK})["result"]["data"]["task_id"]
    for refused in created[2:]:
        error = refused["error"]
        assert error["code"] == -32000 and "MCP_MAX_SESSIONS" in error["message"]
        assert "2 of 2 MCP sessions" in error["message"]
        assert error["data"] == {"active_sessions": 2, "max_sessions": 2}
    initialized = httpx.post(url, json=rpc("initialize", {"protocolVersion": "2025-06-18"}))
    assert initialized.status_code == 200 and "mcp-session-id" not in initialized.headers
    assert "MCP_MAX_SESSIONS" in initialized.json()["error"]["message"]

    async def refusals_and_ws_episodes() -> None:
        async with websockets.connect(ws_base(proc) + "/mcp") as sock:
            answer = json.loads(await asyncio.wait_for(sock.recv(), WAIT_S))
            assert answer["error"]["code"] == -32000 and "MCP_MAX_SESSIONS" in answer["error"][
                "message"]  # fmt: skip
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(sock.recv(), WAIT_S)
            assert closed.value.rcvd.code == 1013
        with pytest.raises(RuntimeError, match="MCP_MAX_SESSIONS"):
            async with MCPToolClient(base_url=proc.url):
                pass
        with pytest.raises(McpError, match="MCP_MAX_SESSIONS"):
            async with Client(url):
                pass
        # both /ws slots are free: two episodes play while MCP is full
        socks = [await websockets.connect(ws_base(proc) + "/ws") for _ in range(2)]
        for sock in socks:
            await sock.send(json.dumps({"type": "reset", "data": {"task_id": TASK}}))
            assert json.loads(await sock.recv())["type"] == "observation"
            await sock.send(json.dumps({"type": "step", "data": {"action_type": "VIEW_CODE"}}))
            reply = json.loads(await sock.recv())
            assert reply["data"]["observation"]["step_count"] == 1
        for sock in socks:
            await sock.close()

    asyncio.run(refusals_and_ws_episodes())
    assert httpx.post(f"{proc.url}/reset", json={"task_id": TASK}).status_code == 200

    # closing frees a slot; a session nobody starts an episode in is reaped after
    # MCP_IDLE_TIMEOUT_S, one with an episode is kept
    closed = httpx.post(url, json=rpc("openenv/session/close", {"session_id": ids[1]})).json()
    assert closed["result"] == {"session_id": ids[1], "closed": True}
    unused = create()["result"]["session_id"]
    time.sleep(3.5)
    assert call(ids[0], "view_code")["result"]["data"]["step_count"] == 1
    reaped = httpx.post(url, json=rpc("tools/list", {"session_id": unused}))
    assert reaped.json()["error"]["message"] == f"Unknown session_id: {unused}"
    assert "result" in create()  # the reaped session's slot is free again
    assert "Traceback" not in proc.log()


def test_a_socket_attached_to_a_session_takes_no_ws_slot(start_server):
    """``/ws?session_id=`` plays an MCP session without a ``/ws`` slot (one socket per
    session); HTTP use keeps it open; an MCP socket without an episode is reaped after
    MCP_IDLE_TIMEOUT_S."""
    proc = start_server(extra_env={"MAX_CONCURRENT_ENVS": "1", "MCP_MAX_SESSIONS": "2",
                                   "MCP_IDLE_TIMEOUT_S": "2"})  # fmt: skip

    async def scenario() -> None:
        holder = await websockets.connect(ws_base(proc) + "/ws")  # the only /ws slot
        await holder.send(json.dumps({"type": "reset", "data": {"task_id": TASK}}))
        assert json.loads(await holder.recv())["type"] == "observation"
        async with MCPToolClient(base_url=proc.url) as env:  # attaches: no slot needed
            for _ in range(6):  # 3 s of HTTP requests and no episode: the socket stays
                await asyncio.sleep(0.5)
                await env.list_tools(use_cache=False)
            result = await env.step(CallToolAction(tool_name="start_episode",
                                                   arguments={"task_id": TASK}))  # fmt: skip
            assert result.observation.result["data"]["task_id"] == TASK
            session = env._production_session_id
            second = await refusal(f"?session_id={session}")  # one socket per session
            assert second == f"Session {session} already has an attached WebSocket"
        assert await refusal("?session_id=nope") == "Unknown session_id: nope"
        async with websockets.connect(ws_base(proc) + "/mcp") as idle:
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(idle.recv(), WAIT_S)
            assert closed.value.rcvd.code == 4408
            assert "MCP_IDLE_TIMEOUT_S" in closed.value.rcvd.reason
        await holder.send(json.dumps({"type": "step", "data": {"action_type": "VIEW_CODE"}}))
        assert json.loads(await holder.recv())["data"]["observation"]["step_count"] == 1
        await holder.close()

    async def refusal(query: str) -> str:
        async with websockets.connect(f"{ws_base(proc)}/ws{query}") as sock:
            frame = json.loads(await asyncio.wait_for(sock.recv(), WAIT_S))
            assert frame["type"] == "error" and frame["data"]["code"] == "SESSION_ERROR"
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(sock.recv(), WAIT_S)
            assert closed.value.rcvd.code == 1008
            return frame["data"]["message"]

    asyncio.run(scenario())


def test_wire_types_match_the_environment():
    """A tool call builds the same action the wire would (strict integers, no extras)."""
    call = mcp.TOOLS_BY_NAME["replace_lines"].prepare(FIX)
    assert call.args[0] == TraceFixAction(action_type="REPLACE_LINES", **FIX)
    with pytest.raises(mcp.ToolArgumentsError, match="unknown argument"):
        mcp.TOOLS_BY_NAME["submit"].prepare({"now": True})
    with pytest.raises(mcp.ToolArgumentsError, match="seed"):
        mcp.TOOLS_BY_NAME["start_episode"].prepare({"seed": -1})
