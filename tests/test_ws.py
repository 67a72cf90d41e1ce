"""The WebSocket session layer (``server/ws.py``) over real connections to server
subprocesses on 127.0.0.1: the session cap, idle reaping, cancellation on disconnect, the
message bound, frames that stay encodable, pipelining, and parity with openenv's ``/ws``."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import websockets
from fastapi.testclient import TestClient
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from tests.conftest import ServerProcess
from tracefix_rl import client
from tracefix_rl.client import CapacityError, SessionClosed, SessionExpired, TraceFixEnv
from tracefix_rl.models import TraceFixAction
from tracefix_rl.server import mcp, ws

TASK = "sum_of_evens_wrong_modulus"  # line 5 is the bug; the buggy code passes 1 of 4
FIX = {"action_type": "REPLACE_LINES", "start_line": 5, "end_line": 5,
       "new_code_block": "if n % 2 == 0:"}  # fmt: skip
SLEEP_S = 60  # agent code that sleeps this long per test holds a sandbox worker
SLOW = {"action_type": "REPLACE_LINES", "start_line": 1, "end_line": 0,
        "new_code_block": f"import time\ntime.sleep({SLEEP_S})"}  # fmt: skip
WAIT_S = 30.0  # upper bound on waiting for a condition; never the thing measured


def ws_url(server: ServerProcess) -> str:
    return server.url.replace("http://", "ws://", 1) + "/ws"


def frame(kind: str, data: Any = None, **extra: Any) -> str:
    """A client frame as JSON (``ensure_ascii``, so lone surrogates travel as escapes)."""
    message = {"type": kind, **extra}
    if data is not None:
        message["data"] = data
    return json.dumps(message)


def utf8(text: str) -> str:
    """The same JSON with non-ASCII characters as themselves (3000 of "\u20ac" are 3000
    characters but 9000 bytes on the wire)."""
    return json.dumps(json.loads(text), ensure_ascii=False)


async def call(sock: Any, text: str | bytes) -> dict[str, Any]:
    await sock.send(text)
    return json.loads(await asyncio.wait_for(sock.recv(), WAIT_S))


async def close_code(sock: Any) -> tuple[int | None, str]:
    """The server's close code and reason, once the server has closed ``sock``."""
    try:
        while True:
            await asyncio.wait_for(sock.recv(), WAIT_S)
    except ConnectionClosed as exc:
        return (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (None, "")


def eventually(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def ws_server() -> Iterator[ServerProcess]:
    proc = ServerProcess(extra_env={"MAX_REQUEST_BYTES": "8192"})
    yield proc
    proc.stop()


# -- the wire contract ------------------------------------------------------------------------


def test_client_and_server_agree_on_close_codes():
    assert client.CLOSE_TRY_AGAIN == ws.CLOSE_TRY_AGAIN == 1013
    assert client.CLOSE_IDLE == ws.CLOSE_IDLE
    assert ws.WSErrorCode.CAPACITY_REACHED.value == client.CAPACITY_REACHED


def test_mcp_and_protocol_errors_match_openenv(ws_server):
    """Frames openenv's own ``/ws`` answered get the same answers (unknown types, bad JSON,
    JSON-RPC errors), but for the tools, which openenv's app (no MCP tools) does not have:
    ``tools/list`` lists them and an unknown tool is an invalid-params error naming them;
    validation errors get the same code."""
    from openenv.core.env_server.http_server import create_app

    from tracefix_rl.environment import TraceFixEnvironment
    from tracefix_rl.models import TraceFixObservation

    def rpc(method: str, params: dict | None = None, request_id: Any = 1) -> str:
        body: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": request_id}
        if params is not None:
            body["params"] = params
        return frame("mcp", body)

    frames = [
        rpc("tools/list"),
        rpc("tools/call", {"name": "x", "arguments": {}}, "abc"),
        rpc("tools/call"),
        rpc("resources/list", request_id=None),
        rpc("openenv/session/close", {}),
        rpc("openenv/session/close", {"session_id": "nope"}),
        frame("mcp", {"jsonrpc": "1.0", "method": "x"}),
        frame("mcp", {"jsonrpc": "2.0", "method": "x", "params": [1]}),
        frame("fly"),
        json.dumps({"data": {}}),
        "{not json",
    ]
    mcp_frames = [json.loads(text)["data"] for text in frames[:6]]
    mcp_frames = [json.dumps(body) for body in mcp_frames] + ["{bad", '{"jsonrpc": "2.0"}']
    upstream = create_app(TraceFixEnvironment, TraceFixAction, TraceFixObservation,
                          max_concurrent_envs=2)  # fmt: skip
    expected = {}
    with TestClient(upstream) as test_client:
        for path, texts in (("/ws", frames), ("/mcp", mcp_frames)):
            with test_client.websocket_connect(path) as sock:
                expected[path] = []
                for text in texts:
                    sock.send_text(text)
                    expected[path].append(sock.receive_json())

    async def ours(path: str, texts: list[str]) -> list[dict]:
        url = ws_url(ws_server).replace("/ws", path)
        async with websockets.connect(url) as sock:
            return [await call(sock, text) for text in texts]

    on_ws, on_mcp = asyncio.run(ours("/ws", frames)), asyncio.run(ours("/mcp", mcp_frames))
    assert on_ws[2:] == expected["/ws"][2:] and on_mcp[2:] == expected["/mcp"][2:]
    assert expected["/ws"][0]["data"]["error"]["message"] == "Environment does not support MCP"
    tools = [tool.listing() for tool in mcp.TOOLS]
    unknown = f"Unknown tool: x; the tools are {', '.join(mcp.TOOLS_BY_NAME)}"
    assert on_ws[0]["type"] == on_ws[1]["type"] == "mcp"
    for listed, called in ((on_ws[0]["data"], on_ws[1]["data"]), (on_mcp[0], on_mcp[1])):
        assert listed == {"jsonrpc": "2.0", "id": 1, "result": {"tools": tools}}
        assert called == {"jsonrpc": "2.0", "id": "abc",
                          "error": {"code": -32602, "message": unknown, "data": None}}  # fmt: skip
    assert expected["/mcp"][6]["error"]["code"] == -32700  # parse error

    async def session_ids() -> tuple[dict, dict, dict]:
        async with websockets.connect(ws_url(ws_server)) as sock:
            created = await call(sock, rpc("openenv/session/create"))
            own = created["data"]["result"]["session_id"]
            closing = await call(sock, rpc("openenv/session/close", {"session_id": own}))
            invalid = await call(sock, frame("mcp", {"no": "data"}, extra=1))
            return created, closing, invalid

    created, closing, invalid = asyncio.run(session_ids())
    assert created["type"] == "mcp" and isinstance(created["data"]["result"]["session_id"], str)
    assert closing["data"]["error"]["message"] == (
        "Cannot close active WebSocket-managed session via MCP method"
    )
    assert invalid["data"]["code"] == "VALIDATION_ERROR" and invalid["data"]["errors"]


# -- the session cap and idle reaping ---------------------------------------------------------


def test_cap_holds_for_concurrent_and_reaped_sessions(start_server):
    """cap + 3 connections at once get exactly cap working sessions, the rest a
    CAPACITY_REACHED frame and close 1013; idle sessions are closed with 4408, a reaped
    socket cannot step, and after reaping the cap holds again."""
    cap = 2
    proc = start_server(extra_env={"MAX_CONCURRENT_ENVS": str(cap), "SESSION_TIMEOUT_S": "2"})
    reset = frame("reset", {"task_id": TASK})

    async def attempt(sock: Any) -> dict[str, Any]:
        with_error = None
        try:
            await sock.send(reset)
        except ConnectionClosed as exc:
            with_error = exc  # the refusal can arrive before the reset is sent
        reply = json.loads(await asyncio.wait_for(sock.recv(), WAIT_S))
        assert with_error is None or reply["type"] == "error"
        return reply

    async def round_of(count: int) -> tuple[list[Any], list[Any]]:
        socks = await asyncio.gather(*(websockets.connect(ws_url(proc)) for _ in range(count)))
        replies = await asyncio.gather(*(attempt(s) for s in socks))
        working = [s for s, r in zip(socks, replies, strict=True) if r["type"] == "observation"]
        refused = [(s, r) for s, r in zip(socks, replies, strict=True) if r["type"] == "error"]
        assert len(working) == cap and len(refused) == count - cap
        for sock, reply in refused:
            assert reply["data"]["code"] == "CAPACITY_REACHED"
            assert f"{cap} of {cap}" in reply["data"]["message"]
            assert reply["data"]["max_sessions"] == cap
            code, reason = await close_code(sock)
            assert code == 1013 and "capacity" in reason
        return working, refused

    async def scenario() -> None:
        working, _ = await round_of(cap + 3)
        for sock in working:  # nobody speaks: both are reaped
            code, reason = await close_code(sock)
            assert code == ws.CLOSE_IDLE and "idle" in reason and "SESSION_TIMEOUT_S" in reason
            with pytest.raises(ConnectionClosed):
                await sock.send(frame("step", {"action_type": "VIEW_CODE"}))
        working, _ = await round_of(cap + 3)  # the reaped slots are free again, and only they
        for sock in working:
            reply = await call(sock, frame("step", {"action_type": "VIEW_CODE"}))
            assert (
                reply["type"] == "observation" and reply["data"]["observation"]["step_count"] == 1
            )
            await sock.close()

    asyncio.run(scenario())


def test_typed_client_raises_capacity_and_expiry_errors(start_server):
    proc = start_server(extra_env={"MAX_CONCURRENT_ENVS": "1", "SESSION_TIMEOUT_S": "2"})

    async def scenario() -> None:
        holder = TraceFixEnv(base_url=proc.url)
        await holder.reset(task_id=TASK)
        refused = TraceFixEnv(base_url=proc.url)
        with pytest.raises(CapacityError, match="capacity"):
            await refused.reset()
        mcp_url = proc.url.replace("http://", "ws://", 1) + "/mcp"  # MCP has its own cap
        async with websockets.connect(mcp_url) as sock:
            await sock.send(json.dumps({"jsonrpc": "2.0", "method": "tools/list", "id": 1}))
            answer = json.loads(await asyncio.wait_for(sock.recv(), WAIT_S))
            assert answer["result"]["tools"][0]["name"] == mcp.EPISODE_TOOL
        await refused.connect()  # now wait until the server has closed it: send fails
        await refused._ws.wait_closed()
        with pytest.raises(CapacityError) as error:
            await refused.reset()
        assert isinstance(error.value, ConnectionError) and error.value.code == 1013
        await refused.close()

        await holder._ws.wait_closed()  # idle: reaped
        with pytest.raises(SessionExpired) as expired:
            await holder.step(TraceFixAction(action_type="VIEW_CODE"))
        assert expired.value.code == ws.CLOSE_IDLE and "SESSION_TIMEOUT_S" in str(expired.value)
        result = await holder.reset(task_id=TASK)  # the next call opens a new session
        assert result.observation.task_id == TASK
        await holder.close()

    asyncio.run(scenario())


def test_typed_client_reads_the_capacity_frame():
    """The refusal frame itself (read before the close) raises CapacityError."""

    class Connection:
        state = State.OPEN

        def __init__(self, replies: list[dict]) -> None:
            self.replies = [json.dumps(r) for r in replies]

        async def send(self, text: str) -> None:
            pass

        async def recv(self) -> str:
            return self.replies.pop(0)

        async def close(self) -> None:
            pass

    env = TraceFixEnv(base_url="http://127.0.0.1:9")
    refusal = {"message": "server at capacity: 2 of 2 WebSocket sessions are in use",
               "code": "CAPACITY_REACHED"}  # fmt: skip

    async def reset_over(connection: Connection) -> None:
        env._ws, env._ws_loop = connection, asyncio.get_running_loop()
        await env.reset()

    with pytest.raises(CapacityError, match="2 of 2"):
        asyncio.run(reset_over(Connection([{"type": "error", "data": refusal}])))
    assert env._ws is None  # the next call connects anew
    invalid = Connection([{"type": "error", "data": {"message": "x", "code": "INVALID_JSON"}}])
    with pytest.raises(RuntimeError, match="INVALID_JSON") as other:
        asyncio.run(reset_over(invalid))
    assert not isinstance(other.value, SessionClosed)


def test_a_peer_that_reads_nothing_loses_its_slot(make_env):
    """In process: a peer whose socket takes no data is dropped after the send timeout, so
    it cannot hold a slot (cap 1 here) forever; the next connection gets the slot."""
    sessions = ws.WebSocketSessions(capacity=1, idle_timeout_s=WAIT_S, max_message_bytes=4096,
                                    env_factory=make_env, send_timeout_s=0.2)  # fmt: skip

    async def connection(frames: list[str], stalls: bool) -> list[dict]:
        inbound: asyncio.Queue[dict] = asyncio.Queue()
        for event in [{"type": "websocket.connect"}] + [
            {"type": "websocket.receive", "text": text} for text in frames
        ]:
            inbound.put_nowait(event)
        sent: list[dict] = []
        replied = asyncio.Event()

        async def receive() -> dict:
            if inbound.empty() and not stalls:
                await replied.wait()  # then hang up
                return {"type": "websocket.disconnect", "code": 1000}
            return await inbound.get()

        async def send(message: dict) -> None:
            sent.append(message)
            if message["type"] == "websocket.send":
                replied.set()
                if stalls:
                    await asyncio.Event().wait()  # the data never leaves

        await asyncio.wait_for(sessions.serve(ws._Session, receive, send), WAIT_S)
        return sent

    async def scenario() -> None:
        stalled = await connection([frame("reset", {"task_id": TASK})], stalls=True)
        assert [m["type"] for m in stalled] == ["websocket.accept", "websocket.send"]
        assert len(sessions) == 0
        served = await connection([frame("reset", {"task_id": TASK})], stalls=False)
        assert json.loads(served[1]["text"])["type"] == "observation"

    asyncio.run(scenario())


# -- cancellation when the client goes away ---------------------------------------------------


def test_leaving_clients_free_the_sandbox_worker(start_server):
    """With one sandbox worker: a client that disconnects while its slow RUN_TESTS runs, and
    one that sends ``close`` while its slow RUN_TESTS waits in the queue, both have their
    evaluations cancelled, so another session's RUN_TESTS runs at once instead of finding
    the sandbox busy. A client flooding frames while a step runs is closed with 1008."""
    proc = start_server(extra_env={
        "SANDBOX_WORKERS": "1", "SANDBOX_WALL_TIMEOUT_S": str(4 * SLEEP_S),
        "SANDBOX_TEST_TIMEOUT_S": str(2 * SLEEP_S), "SANDBOX_CPU_S": str(4 * SLEEP_S),
        "SANDBOX_QUEUE_TIMEOUT_S": "10",
    })  # fmt: skip

    def sandbox() -> dict[str, Any]:
        return httpx.get(f"{proc.url}/health", timeout=WAIT_S).json()["sandbox"]

    async def slow_session() -> Any:
        sock = await websockets.connect(ws_url(proc))
        await call(sock, frame("reset", {"task_id": TASK}))
        assert (await call(sock, frame("step", SLOW)))["data"]["observation"][
            "last_action_error"
        ] is None
        await sock.send(frame("step", {"action_type": "RUN_TESTS"}))
        return sock

    async def run_tests_elsewhere() -> dict[str, Any]:
        async with websockets.connect(ws_url(proc)) as sock:
            await call(sock, frame("reset", {"task_id": TASK}))
            return (await call(sock, frame("step", {"action_type": "RUN_TESTS"})))["data"]

    async def scenario() -> None:
        running = await slow_session()
        await asyncio.to_thread(eventually, lambda: sandbox()["in_flight"] == 1, "running")
        queued = await slow_session()
        await asyncio.to_thread(eventually, lambda: sandbox()["queued"] == 1, "queued")
        await queued.send(frame("close"))  # close frame while the step waits in the queue
        assert (await close_code(queued))[0] == 1000
        running.transport.abort()  # disconnect (no close frame) while the step runs
        result = await run_tests_elsewhere()
        assert result["observation"]["last_action_error"] is None, result
        assert result["observation"]["tests_passed"] == 1
        # Had either evaluation not been cancelled, the worker would still be asleep.

        flooding = await slow_session()
        await asyncio.to_thread(eventually, lambda: sandbox()["in_flight"] == 1, "running")
        for _ in range(ws.PENDING_FRAMES + 1):
            await flooding.send(frame("state"))
        code, reason = await close_code(flooding)
        assert code == 1008 and "without waiting for replies" in reason
        result = await run_tests_elsewhere()
        assert result["observation"]["last_action_error"] is None, result

    asyncio.run(scenario())


# -- message size, encodability, ordering ----------------------------------------------------


def test_oversize_messages_get_an_error_and_the_session_goes_on(ws_server):
    limit = 8192

    async def scenario() -> None:
        async with websockets.connect(ws_url(ws_server)) as sock:
            await call(sock, frame("reset", {"task_id": TASK}))
            view = {"action_type": "VIEW_CODE"}
            for too_big in (
                frame("step", {**view, "thought": "x" * limit}),
                frame("step", {**view, "thought": "y" * limit}).encode(),  # a binary message
                utf8(frame("step", {**view, "thought": "\u20ac" * 3000})),  # 9000 bytes
            ):
                reply = await call(sock, too_big)
                assert reply["type"] == "error" and reply["data"]["code"] == "MESSAGE_TOO_LARGE"
                assert str(limit) in reply["data"]["message"]
            reply = await call(sock, utf8(frame("step", {**view, "thought": "\u00e9" * 3000})))
            assert reply["type"] == "observation"
            assert reply["data"]["observation"]["step_count"] == 1  # refused ones never ran
        async with websockets.connect(ws_url(ws_server)) as sock:  # past the hard cap: 1009
            await sock.send(frame("state", pad="y" * (2 * limit + 1)))
            assert (await close_code(sock))[0] == 1009

    asyncio.run(scenario())


SURROGATE_FRAMES = [
    frame("reset", {"task_id": TASK, "episode_id": "\ud800", "\udfff": "\udcff"}),
    frame("state"),
    frame("reset", {"task_id": "\udcff"}),
    frame("reset", {"difficulty": "\ud800", "seed": "\ud800", "split": "\udfff"}),
    frame("step", {"action_type": "\ud800"}),
    frame("step", {"action_type": "VIEW_CODE", "\ud800": 1}),
    frame(
        "step",
        {
            "action_type": "REPLACE_LINES",
            "start_line": 1,
            "end_line": 0,
            "new_code_block": "# \ud800",
            "thought": "\udfff",
        },
    ),  # fmt: skip
    frame("step", {"action_type": "VIEW_CODE", "start_line": "\ud800"}),
    frame("\ud800"),
    frame("state", extra="\ud800"),
    frame("mcp", {"jsonrpc": "2.0", "method": "\ud800", "id": "\udcff"}),
    frame("mcp", {"jsonrpc": "\ud800", "method": "x"}),
    frame(
        "mcp",
        {"jsonrpc": "2.0", "method": "openenv/session/close", "params": {"session_id": "\ud800"}},
    ),  # fmt: skip
    json.dumps({"\ud800": "\udfff"}),
    '"\\ud800"',
    "\ud800".encode("utf-8", "surrogatepass"),  # invalid UTF-8 in a binary message
    # other input that openenv's endpoint (or a naive one) turned into a dropped session:
    '{"type": "step", "data": {"action_type": "VIEW_CODE", "start_line": NaN, "x": [Infinity]}}',
    "[" * 8000,  # nesting deeper than the JSON decoder's recursion limit
    '{"type": "step", "data": {"action_type": "VIEW_CODE", "start_line": 1%s}}' % ("0" * 5000),
    '{"type": "reset", "data": null}',
    '{"type": ["reset"]}',
]


def strict_json(raw: str) -> dict[str, Any]:
    """Parse a reply as standard JSON (NaN and Infinity are not JSON)."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} in a reply")

    return json.loads(raw, parse_constant=refuse)


def test_lone_surrogates_never_drop_the_session_and_the_score_arrives(ws_server):
    async def scenario() -> None:
        async with websockets.connect(ws_url(ws_server)) as sock:
            for text in SURROGATE_FRAMES:
                await sock.send(text)
                reply = strict_json(await asyncio.wait_for(sock.recv(), WAIT_S))
                assert reply["type"] in ("observation", "state", "error", "mcp"), reply
                json.dumps(reply, ensure_ascii=False).encode()  # no lone surrogate in it
            state = await call(sock, frame("state"))
            assert state["data"]["episode_id"] == "\\ud800" and state["data"]["step_count"] == 1
            raising = "raise ValueError('bad \\udcff ' + chr(0xdcff))"
            await call(sock, frame("reset", {"task_id": TASK, "episode_id": "s\udcff"}))
            edit = await call(sock, frame("step", {**FIX, "new_code_block": FIX["new_code_block"]
                                                   + f"\n    {raising}"}))  # fmt: skip
            assert edit["data"]["observation"]["last_action_error"] is None
            run = await call(sock, frame("step", {"action_type": "RUN_TESTS"}))
            assert "ValueError" in json.dumps(run["data"]["observation"]["test_results"])
            submit = await call(sock, frame("step", {"action_type": "SUBMIT"}))
            assert submit["data"]["done"] is True and submit["data"]["observation"]["score"] < 1
            assert submit["data"]["observation"]["episode_id"] == "s\\udcff"

    asyncio.run(scenario())


def test_pipelined_frames_are_answered_in_order(ws_server):
    async def scenario() -> None:
        async with websockets.connect(ws_url(ws_server)) as sock:
            frames = [frame("reset", {"task_id": TASK, "episode_id": "pipe"}),
                      frame("step", {"action_type": "VIEW_CODE"}), "{bad",
                      frame("step", {"action_type": "RUN_TESTS"}), frame("state")]  # fmt: skip
            for text in frames:
                await sock.send(text)
            replies = [json.loads(await asyncio.wait_for(sock.recv(), WAIT_S)) for _ in frames]
        assert [r["type"] for r in replies] == ["observation", "observation", "error",
                                                 "observation", "state"]  # fmt: skip
        assert replies[3]["data"]["observation"]["tests_passed"] == 1
        assert replies[4]["data"]["episode_id"] == "pipe" and replies[4]["data"]["step_count"] == 2

    asyncio.run(scenario())
