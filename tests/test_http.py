"""The HTTP contract of issue 10 over real connections: episode isolation (cookie fallback,
eviction, 503 + Retry-After), the request body limit, bodies that always encode and never a
5xx for any input, and /health's 503."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.conftest import ServerProcess
from tracefix_rl.server.episodes import EpisodeStoreFull, HttpEpisodes, UnknownEpisode
from tracefix_rl.server.responses import SafeJSONResponse, echo
from tracefix_rl.server.routes import EPISODE_COOKIE, register_http_routes

TASK = "sum_of_evens_wrong_modulus"
VIEW = {"action_type": "VIEW_CODE"}
JSON = {"content-type": "application/json"}
SURROGATE = re.compile("[\ud800-\udfff]")
MIB = 1024 * 1024
UPLOAD_BYTES = 100 * MIB
UPLOADS = 4
RSS_GROWTH_LIMIT_MIB = 10  # measured: +1 MiB (declared) and +4 MiB (chunked) for 4 x 100 MB
GRACE_S = 2.0


def strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def clean_json(response: httpx.Response) -> Any:
    """The body, after checking it is no 5xx, strict UTF-8 JSON, and free of lone surrogates."""
    assert response.status_code < 500, response.text
    data = json.loads(response.content.decode("utf-8"))  # strict: a lone surrogate fails here
    assert not [s for s in strings(data) if SURROGATE.search(s)]
    return data


@pytest.fixture(scope="module", autouse=True)
def log_start(server: ServerProcess) -> int:
    """Where the shared server's log stood when this module began."""
    return len(server.log())


# -- episode isolation --------------------------------------------------------------------------


def test_step_without_episode_id_reaches_only_this_clients_episode(server):
    with (
        httpx.Client(base_url=server.url, timeout=60) as alice,
        httpx.Client(base_url=server.url, timeout=60) as bob,
    ):
        a = alice.post("/reset", json={"task_id": TASK}).json()["observation"]["episode_id"]
        b = bob.post("/reset", json={"task_id": TASK}).json()["observation"]["episode_id"]
        assert uuid.UUID(a).version == uuid.UUID(b).version == 4 and a != b
        # bob reset last: the old fallback sent alice's step to bob's episode
        assert alice.post("/step", json={"action": VIEW}).json()["observation"]["episode_id"] == a
        assert bob.post("/step", json={"action": VIEW}).json()["observation"]["episode_id"] == b

        anonymous = httpx.post(f"{server.url}/step", json={"action": VIEW}, timeout=60)
        assert anonymous.status_code == 400 and "episode_id" in anonymous.json()["detail"]
        empty = httpx.get(f"{server.url}/state").json()
        assert empty["episode_id"] is None and empty["step_count"] == 0

        # an explicit id is the capability: it works from any client
        other = httpx.post(f"{server.url}/step", json={"action": VIEW, "episode_id": a}, timeout=60)
        assert other.status_code == 200 and other.json()["observation"]["step_count"] == 2
        state = alice.get("/state").json()
        assert state["episode_id"] == a and state["step_count"] == 2
        assert bob.get("/state").json()["step_count"] == 1


def test_reset_cookie_attributes_and_odd_ids_round_trip(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        reset = client.post("/reset", json={"task_id": TASK, "episode_id": 'a b;c,"d"\\'})
        cookie = reset.headers["set-cookie"]
        assert cookie.startswith(f"{EPISODE_COOKIE}=")
        assert {"httponly", "path=/", "samesite=lax"} <= {
            p.strip().lower() for p in cookie.split(";")
        }
        for episode_id in ('a b;c,"d"\\', "épisode ✓", "x" * 255, "\ud800"):
            body = json.dumps({"task_id": TASK, "episode_id": episode_id})  # \ud800 as JSON escape
            sent = clean_json(client.post("/reset", content=body, headers=JSON))
            expected = sent["observation"]["episode_id"]
            stepped = clean_json(client.post("/step", json={"action": VIEW}))
            assert stepped["observation"]["episode_id"] == expected
            assert clean_json(client.get("/state"))["episode_id"] == expected
        assert expected == "\\ud800"  # escaped once, the same way on /reset and /step
        raw_id = json.dumps({"action": VIEW, "episode_id": "\ud800"})
        explicit = client.post("/step", content=raw_id, headers=JSON)
        assert clean_json(explicit)["observation"]["step_count"] == 2


def test_full_store_evicts_finished_then_idle_episodes_else_503_with_retry_after(start_server):
    proc = start_server(extra_env={"HTTP_MAX_EPISODES": "2", "HTTP_EPISODE_GRACE_S": str(GRACE_S)})
    with httpx.Client(base_url=proc.url, timeout=60) as http:

        def reset(name: str) -> httpx.Response:
            return http.post("/reset", json={"task_id": TASK, "episode_id": name})

        def step(name: str, action: dict = VIEW) -> httpx.Response:
            return http.post("/step", json={"action": action, "episode_id": name})

        # a finished episode goes first, even the most recently stepped one
        reset("old"), reset("done")
        assert step("done", {"action_type": "SUBMIT"}).json()["done"] is True
        assert reset("new").status_code == 200
        assert step("done").status_code == 404 and step("old").status_code == 200
        old_stepped = time.monotonic()

        # "old" and "new" were used within the grace: refused, with an honest Retry-After
        full = reset("third")
        assert full.status_code == 503, full.text
        assert "HTTP_MAX_EPISODES" in full.json()["detail"]
        retry_after = int(full.headers["retry-after"])
        assert 1 <= retry_after <= GRACE_S
        step("new")  # "new" is now the most recently stepped; "old" the least
        # keep-alive reads of both episodes do not keep them alive
        deadline = max(time.monotonic() + retry_after, old_stepped + GRACE_S) + 0.3
        while time.monotonic() < deadline:
            assert http.get("/state", params={"episode_id": "old"}).status_code == 200
            assert http.get("/state", params={"episode_id": "new"}).status_code == 200
            time.sleep(0.2)
        after_wait = reset("third")
        assert after_wait.status_code == 200, after_wait.text
        assert step("old").status_code == 404  # the least recently stepped went
        assert step("new").status_code == 200 and step("third").status_code == 200


class FakeEnv:
    def __init__(self, episode_id: str, done: bool = False):
        from tracefix_rl.models import TraceFixState

        self.state = TraceFixState(episode_id=episode_id, done=done)
        self.closed = False

    def close(self):
        self.closed = True


def test_http_store_bounds_and_expiry(monkeypatch):

    clock = [1e9]
    monkeypatch.setattr("tracefix_rl.server.episodes.time.monotonic", lambda: clock[0])
    store = HttpEpisodes(capacity=2, ttl_s=100, grace_s=50)
    finished, live = FakeEnv("a", done=True), FakeEnv("b")
    store.add(finished)
    store.add(live)
    store.add(FakeEnv("c"))  # evicts the finished episode
    assert finished.closed and len(store) == 2
    with pytest.raises(EpisodeStoreFull, match="stepped in the last 50s"):
        store.add(FakeEnv("d"))
    assert store.get("c").env.state.episode_id == "c"
    store.get("b")
    clock[0] += 101
    with pytest.raises(UnknownEpisode, match="unknown or expired episode_id 'b'"):
        store.get("b")
    assert live.closed
    store.add(FakeEnv("d"))
    assert len(store) == 1


def test_store_unit_order_in_flight_and_expiry(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("tracefix_rl.server.episodes.time.monotonic", lambda: clock[0])
    with pytest.raises(ValueError):
        HttpEpisodes(capacity=2, ttl_s=10, grace_s=11)
    store = HttpEpisodes(capacity=2, ttl_s=100, grace_s=10)
    busy = store.add(FakeEnv("busy"))
    clock[0] += 1
    idle = store.add(FakeEnv("idle"))
    busy.in_flight = 1  # a /step holds or awaits its lock: never evicted, never expired
    clock[0] += 5
    with pytest.raises(EpisodeStoreFull) as full:
        store.make_room()
    assert full.value.retry_after_s == 5  # "idle" (stepped at 1001) is evictable after 1011
    clock[0] += 5.5
    store.add(FakeEnv("late"))  # "busy" is older but in flight: "idle" goes
    assert idle.env.closed and not busy.env.closed and idle.dropped
    clock[0] += 200
    store.get("busy")  # in flight: outlives the TTL
    busy.in_flight = 0
    with pytest.raises(UnknownEpisode):
        store.get("busy")
    assert busy.env.closed and len(store) == 0


# -- request body limit ---------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_body_limit_refuses_big_uploads_unread(server):
    pid = server.proc.pid
    small = {"action": {"action_type": "REPLACE_LINES", "start_line": 1, "end_line": 0,
                        "new_code_block": "#" * (MIB - 200)}}  # fmt: skip
    assert MIB - 1024 < len(json.dumps(small)) <= MIB  # just under the default limit
    assert httpx.post(f"{server.url}/step", json=small, timeout=60).status_code == 400  # read
    warm = httpx.post(f"{server.url}/reset", content=b" " * (MIB + 1), headers=JSON)
    assert warm.status_code == 413 and "MAX_REQUEST_BYTES" in warm.json()["detail"]

    upload = b"x" * UPLOAD_BYTES

    async def declared(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post("/reset", content=upload, headers=JSON)

    sent = [0] * UPLOADS

    async def chunked(client: httpx.AsyncClient, index: int) -> int | str:
        async def body() -> AsyncIterator[bytes]:
            block = b"x" * MIB
            for _ in range(UPLOAD_BYTES // MIB):
                sent[index] += len(block)
                yield block

        try:
            return (await client.post("/step", content=body(), headers=JSON)).status_code
        except httpx.TransportError as exc:  # the server closed the connection: it stopped
            return type(exc).__name__

    async def flood() -> tuple[list[httpx.Response], list[int | str]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            first = await asyncio.gather(*(declared(client) for _ in range(UPLOADS)))
            second = await asyncio.gather(*(chunked(client, i) for i in range(UPLOADS)))
        return first, second

    before = rss_mib(pid)
    answers, outcomes = asyncio.run(flood())
    grown = rss_mib(pid) - before
    assert [a.status_code for a in answers] == [413] * UPLOADS
    assert all("larger than the limit of 1048576 bytes" in a.json()["detail"] for a in answers)
    assert all(o in (413, "ReadError", "WriteError", "RemoteProtocolError") for o in outcomes)
    assert max(sent) < UPLOAD_BYTES // 4, sent  # reading stopped: each upload was cut short
    assert grown < RSS_GROWTH_LIMIT_MIB, f"RSS grew by {grown:.1f} MiB"
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_unread_chunked_body_closes_the_connection(server):
    sent = [0]

    def body() -> Iterator[bytes]:
        for _ in range(UPLOAD_BYTES // MIB):
            sent[0] += MIB
            yield b"x" * MIB

    try:
        answer = httpx.request("GET", f"{server.url}/health", content=body(), timeout=60)
        assert answer.status_code == 200 and answer.headers["connection"] == "close"
    except httpx.TransportError:
        pass
    assert sent[0] < UPLOAD_BYTES // 4


# -- every answer encodes; never a 5xx ------------------------------------------------------


def test_surrogates_from_agent_code_keep_the_episode_and_its_score(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        clean_json(http.post("/reset", json={"task_id": TASK}))
        raising = 'raise ValueError("bad \\udcff")'  # the agent's code makes the surrogate
        edit = {"action_type": "REPLACE_LINES", "start_line": 1, "end_line": 0,
                "new_code_block": raising}  # fmt: skip
        assert clean_json(http.post("/step", json={"action": edit}))["observation"][
            "last_action_error"] is None  # fmt: skip
        run = clean_json(http.post("/step", json={"action": {"action_type": "RUN_TESTS"}}))
        assert "bad \\udcff" in run["observation"]["test_results"][0]["error_message"]
        clean_json(http.post("/step", json={"action": VIEW}))
        assert clean_json(http.get("/state"))["step_count"] == 3
        final = clean_json(http.post("/step", json={"action": {"action_type": "SUBMIT"}}))
        assert final["done"] is True
        assert final["observation"]["score"] is not None
        assert final["observation"]["solved"] is False


def test_surrogate_in_new_code_block_keeps_view_code(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        clean_json(http.post("/reset", json={"task_id": TASK}))
        edit = '{"action": {"action_type": "REPLACE_LINES", "start_line": 1, "end_line": 1, ' \
               '"new_code_block": "x = \'\\ud800\'", "thought": "\\udcff"}}'  # fmt: skip
        replaced = clean_json(http.post("/step", content=edit, headers=JSON))
        assert replaced["observation"]["code_dict"]["1"] == "x = '\\ud800'"
        viewed = clean_json(http.post("/step", json={"action": VIEW}))
        assert "x = '\\ud800'" in viewed["observation"]["localized_context"]


DEEP = 900  # nesting under the JSON decoder's limit, deep enough to exhaust a naive echo
RESET_BODIES = [
    (b"{nope", 422, "json_invalid"),
    (b'{"seed": \xff}', 422, "json_invalid"),  # not UTF-8
    (b'{"seed": ' + b"9" * 5000 + b"}", 422, "json_invalid"),  # past CPython's 4,300 digits
    (b"[" * 100_000 + b"]" * 100_000, 422, "json_invalid"),  # too deep to decode
    (b'{"seed": ' + b"[" * DEEP + b"]" * DEEP + b"}", 422, "int_type"),  # echoed, bounded
    (b'{"rows": ' + b"[" * DEEP + b"]" * DEEP + b"}", 200, None),  # an ignored extra key
    (b'{"seed": 1e999}', 422, "int_type"),  # parses to inf
    (b'{"seed": false}', 422, "int_type"),
    (b'{"seed": "7"}', 422, "int_type"),
    (b'{"seed": 7.0}', 200, None),  # a JSON Schema integer
    (b'{"seed": 1e300}', 200, None),
    (b'{"task_id": ["a"]}', 422, "string_type"),
    (b'{"task_id": "nope"}', 400, None),
    (b'{"difficulty": " Hard "}', 200, None),
    (b'{"difficulty": "\\u001chard"}', 422, "literal_error"),
    (b'{"max_steps": true}', 422, "int_type"),
    (b'{"episode_id": "\\ud800"}', 200, None),
    # 255 characters, but 1,530 once escaped: refused by env.reset's second validation
    (b'{"episode_id": "' + b"\\ud800" * 255 + b'"}', 422, None),
    (b'{"\\ud800": 1}', 422, "string_unicode"),  # a key cannot be made a str for pydantic
    (b'{"self": 1, "kwargs": 2}', 200, None),  # extra keys never reach env.reset
    (b'"\\ud800"', 422, "model_attributes_type"),
    (b"null", 422, "model_attributes_type"),
    (b"[]", 422, "model_attributes_type"),
]


@pytest.mark.parametrize(("body", "status", "kind"), RESET_BODIES)
def test_reset_answers_every_body_without_5xx(server, body, status, kind):
    data = clean_json(httpx.post(f"{server.url}/reset", content=body, headers=JSON, timeout=60))
    answered = 200 if "observation" in data else None
    if status == 200:
        assert answered == 200, data
    elif status == 422:
        assert kind is None or data["detail"][0]["type"] == kind, data
        assert data["detail"][0]["loc"][0] == "body"
        assert len(json.dumps(data)) < 4000  # the echo of the input is bounded
    else:
        assert isinstance(data["detail"], str)


def test_non_json_content_types_are_422(server):
    bodies = {
        "text/plain": b"\xff\xfe{",
        "application/x-www-form-urlencoded": b"seed=1",
        "multipart/form-data; boundary=x": b"--x--\r\n",
    }
    for content_type, body in bodies.items():
        answer = httpx.post(
            f"{server.url}/reset", content=body, headers={"content-type": content_type}
        )
        assert answer.status_code == 422 and clean_json(answer)["detail"][0]["loc"] == ["body"]


STEP_ACTIONS = [
    ({"action_type": "VIEW_CODE", "start_line": True}, 422),
    ({"action_type": "VIEW_CODE", "start_line": "1"}, 422),
    ({"action_type": "VIEW_CODE", "start_line": 1.0}, 200),
    ({"action_type": "VIEW_CODE", "start_line": 10**30}, 200),  # rejected in the observation
    ({"action_type": "VIEW_CODE", "unknown": 1}, 422),
    ({"action_type": "VIEW_CODE", "metadata": {"k": ["\u0000" * 3]}}, 200),
    (
        {
            "action_type": "REPLACE_LINES",
            "start_line": 1,
            "end_line": 1,
            "new_code_block": "\u0000\udfff\n\t",
        },
        200,
    ),  # fmt: skip
]


@pytest.mark.parametrize(("action", "status"), STEP_ACTIONS)
def test_step_answers_every_action_without_5xx(server, action, status):
    with httpx.Client(base_url=server.url, timeout=60, headers=JSON) as http:
        http.post("/reset", json={"task_id": TASK})
        answer = http.post("/step", content=json.dumps({"action": action}))
        clean_json(answer)
        assert answer.status_code == status, answer.text


def test_queries_cookies_and_other_routes_never_5xx(server):
    url = server.url
    answers = {
        "state bad utf-8 query": httpx.get(f"{url}/state?episode_id=%ED%A0%80"),
        "state long query": httpx.get(f"{url}/state", params={"episode_id": "x" * 256}),
        "state latin-1 cookie": httpx.get(f"{url}/state",
                                          headers={"cookie": b"tracefix_episode=\xe9\xff"}),
        "state encoded surrogate cookie": httpx.get(
            f"{url}/state", headers={"cookie": b"tracefix_episode=%ED%A0%80"}),
        "step unknown cookie": httpx.post(f"{url}/step", json={"action": VIEW},
                                          headers={"cookie": "tracefix_episode=gone"}),
        "tasks huge limit": httpx.get(f"{url}/tasks?limit=" + "9" * 40),
        "tasks bad utf-8 difficulty": httpx.get(f"{url}/tasks?difficulty=%FF"),
        "reset by GET": httpx.get(f"{url}/reset"),
        "unknown route": httpx.post(f"{url}/nope"),
    }  # fmt: skip
    statuses = {name: a.status_code for name, a in answers.items()}
    for answer in answers.values():
        clean_json(answer)
    assert statuses == {
        "state bad utf-8 query": 404, "state long query": 422, "state latin-1 cookie": 404,
        "state encoded surrogate cookie": 404, "step unknown cookie": 404,
        "tasks huge limit": 422, "tasks bad utf-8 difficulty": 422, "reset by GET": 405,
        "unknown route": 404,
    }  # fmt: skip
    assert answers["reset by GET"].headers["allow"] == "POST"


MCP_BODIES = [
    (b"{}", -32600),  # what `openenv validate` sends: a JSON-RPC error, HTTP 200
    (b"\xff", -32700),
    (b"[" * 100_000, -32700),
    (b'{"jsonrpc": "2.0", "method": "\\ud800", "id": "\\udcff"}', -32601),
    (b'{"jsonrpc": "2.0", "method": "tools/call", "params": {"session_id": ["x"]}}', -32602),
    (
        b'{"jsonrpc": "2.0", "method": "openenv/session/close", "params": {"session_id": {}}}',
        -32602,
    ),  # fmt: skip
    (b'{"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "submit"}, "id": 1}',
     -32602),  # no session: a tools/call needs one
    (b'{"jsonrpc": "2.0", "method": "tools/call", "params": {"name": 7}, "id": 1}', -32602),
    (b'{"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "submit", '
     b'"session_id": "nope"}, "id": 1}', -32602),
    (b'{"jsonrpc": "2.0", "method": "openenv/session/close", "params": {"session_id": "x"}}',
     -32602),
    (b'{"jsonrpc": "2.0", "method": "resources/list", "id": 1}', -32601),
    (b'{"jsonrpc": "2.0", "method": "tools/list", "id": [1]}', -32600),
]  # fmt: skip


@pytest.mark.parametrize(("body", "code"), MCP_BODIES)
def test_mcp_answers_json_rpc_errors_not_5xx(server, body, code):
    answer = httpx.post(f"{server.url}/mcp", content=body, headers=JSON)
    data = clean_json(answer)
    assert answer.status_code == 200 and data["jsonrpc"] == "2.0"
    assert data["error"]["code"] == code


def test_no_request_above_left_a_traceback(server, log_start):
    """Runs after the tests above (file order): none of their requests raised in the app."""
    logged = server.log()[log_start:]
    assert "Traceback" not in logged and "Exception in ASGI" not in logged, logged[-3000:]


def test_safe_response_and_echo_units():
    content = {"a\udcff": [float("nan"), float("inf"), "x\ud800"], "n": 1}
    assert json.loads(SafeJSONResponse(content).body.decode()) == {
        "a\\udcff": ["nan", "inf", "x\\ud800"], "n": 1}  # fmt: skip
    deep: Any = []
    for _ in range(5000):
        deep = [deep]
    assert json.dumps(echo(deep)) == '[[[["<array of 1 items>"]]]]'
    assert echo("y" * 10_000).endswith("[9800 more characters]")
    assert echo(b"\xff\xfe") == "\ufffd\ufffd" and echo(10**400) == "<integer of 1329 bits>"


# -- /health ------------------------------------------------------------------------------------


class FakeSandbox:
    def __init__(self, problem: str | None):
        self.problem = problem

    def health_problem(self) -> str | None:
        return self.problem

    def describe(self) -> dict[str, Any]:
        return {"backend": "fake", "workers": 2, "workers_alive": 1 if self.problem else 2}


class FakeRegistry:
    tasks = [object()] * 3
    problems = [object()]


@pytest.mark.parametrize("problem", [None, "1 of 2 sandbox workers are alive"])
def test_health_is_503_with_a_reason_when_the_sandbox_is_short(monkeypatch, problem):
    monkeypatch.setattr("tracefix_rl.server.routes.get_sandbox", lambda: FakeSandbox(problem))
    monkeypatch.setattr("tracefix_rl.server.routes.get_registry", lambda: FakeRegistry())
    app = FastAPI()
    app.post("/mcp")(lambda: {})  # openenv's /mcp: register_http_routes removes it
    register_http_routes(app, HttpEpisodes(capacity=1, ttl_s=10, grace_s=1))
    answer = TestClient(app).get("/health")
    body = answer.json()
    assert {"tasks", "tasks_skipped", "http_episodes", "server", "sandbox"} <= set(body)
    assert body["tasks"] == 3 and body["tasks_skipped"] == 1
    if problem is None:
        assert answer.status_code == 200 and body["status"] == "healthy" and "reason" not in body
    else:
        assert answer.status_code == 503 and body["status"] == "unhealthy"
        assert body["reason"] == problem and body["sandbox"]["workers_alive"] == 1
