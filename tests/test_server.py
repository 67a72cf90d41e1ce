"""The server over real HTTP and WebSocket connections (server subprocesses on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import websockets
from openenv.core.generic_client import GenericEnvClient
from openenv.validation.types import ProviderCapability

from tests.conftest import FAKE_SECRET, REPO
from tests.test_tasks import GOOD_TASK
from tracefix_rl.client import TraceFixEnv
from tracefix_rl.models import TraceFixAction

BIN = Path(sys.executable).parent
TASK = "sum_of_evens_wrong_modulus"
FIX = {
    "action_type": "REPLACE_LINES",
    "start_line": 5,
    "end_line": 5,
    "new_code_block": "if n % 2 == 0:",
}


def post(server, path: str, body=None, **kw) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60, **kw)


# -- stateful HTTP --------------------------------------------------------------------------


def test_http_episode_with_plain_httpx(server):
    client = httpx.Client(base_url=server.url, timeout=60)  # keeps the cookie /reset sets
    reset = client.post("/reset", json={"task_id": TASK, "seed": 1})
    assert reset.status_code == 200
    body = reset.json()
    assert set(body) == {"observation", "reward", "done"}
    episode_id = body["observation"]["episode_id"]
    assert body["observation"]["task_id"] == TASK and body["reward"] == 0.0

    step = client.post("/step", json={"action": {"action_type": "RUN_TESTS"}})  # its episode
    assert step.status_code == 200 and step.json()["observation"]["tests_passed"] == 1
    step = post(server, "/step", {"action": FIX, "episode_id": episode_id})
    assert step.json()["observation"]["step_count"] == 2
    state = httpx.get(f"{server.url}/state", params={"episode_id": episode_id}).json()
    assert state["episode_id"] == episode_id and state["step_count"] == 2
    assert state["task_id"] == TASK and state["max_steps"] == 50 and state["done"] is False
    final = post(server, "/step", {"action": {"action_type": "SUBMIT"}, "episode_id": episode_id})
    observation = final.json()["observation"]
    assert final.json()["done"] is True
    assert observation["solved"] is True and observation["score"] == 1.0
    assert client.get("/state").json()["done"] is True
    client.close()


def test_interleaved_http_episodes_do_not_interfere(server):
    ids = []
    for name, task in (("ep-A", TASK), ("ep-B", "lru_cache_get_does_not_promote")):
        body = post(server, "/reset", {"task_id": task, "episode_id": name}).json()
        ids.append(body["observation"]["episode_id"])
    assert ids == ["ep-A", "ep-B"]
    post(server, "/step", {"action": FIX, "episode_id": "ep-A"})
    post(server, "/step", {"action": {"action_type": "VIEW_CODE"}, "episode_id": "ep-B"})
    post(server, "/step", {"action": {"action_type": "VIEW_CODE"}, "episode_id": "ep-B"})
    a = post(server, "/step", {"action": {"action_type": "RUN_TESTS"}, "episode_id": "ep-A"})
    b = post(server, "/step", {"action": {"action_type": "RUN_TESTS"}, "episode_id": "ep-B"})
    assert a.json()["observation"]["tests_passed"] == 4
    assert a.json()["observation"]["step_count"] == 2
    assert b.json()["observation"]["task_id"] == "lru_cache_get_does_not_promote"
    assert b.json()["observation"]["step_count"] == 3


def test_http_errors_are_4xx_with_reasons(server):
    assert post(server, "/reset", {"task_id": "nope"}).status_code == 400
    for body in ({"difficulty": "x"}, {"seed": -1}, {"seed": False}, {"task_id": ["a"]}):
        response = post(server, "/reset", body)
        assert response.status_code == 422, body
        assert response.json()["detail"][0]["loc"] == ["body", next(iter(body))]
    bad_json = httpx.post(
        f"{server.url}/step", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert bad_json.status_code == 422
    assert post(server, "/step", {}).status_code == 422
    bad_action = post(server, "/step", {"action": {"action_type": "FLY"}})
    assert bad_action.status_code == 422
    assert bad_action.json()["detail"][0]["loc"] == ["body", "action", "action_type"]
    typo = post(server, "/step", {"action": {"action_type": "VIEW_CODE", "start": 1}})
    assert typo.status_code == 422 and typo.json()["detail"][0]["type"] == "extra_forbidden"
    unknown = post(server, "/step", {"action": {"action_type": "VIEW_CODE"}, "episode_id": "zz"})
    assert unknown.status_code == 404 and "unknown or expired episode_id" in unknown.text


def test_no_secret_reaches_observations(server):
    post(server, "/reset", {"task_id": TASK, "episode_id": "secret-probe"})
    block = "import os\nprint(dict(os.environ))\nprint(open('/proc/self/environ').read())"
    post(
        server,
        "/step",
        {
            "action": {
                "action_type": "REPLACE_LINES",
                "start_line": 1,
                "end_line": 0,
                "new_code_block": block,
            },
            "episode_id": "secret-probe",
        },
    )
    run = post(
        server, "/step", {"action": {"action_type": "RUN_TESTS"}, "episode_id": "secret-probe"}
    )
    assert "PATH" in run.text  # the environment was printed...
    assert FAKE_SECRET not in run.text  # ...and holds no secret


def test_info_routes(server):
    schema = httpx.get(f"{server.url}/schema").json()
    assert {"task_id", "difficulty", "max_steps", "done"} <= set(schema["state"]["properties"])
    assert "action_type" in schema["action"]["properties"]
    assert "code_dict" in schema["observation"]["properties"]
    metadata = httpx.get(f"{server.url}/metadata").json()
    assert metadata["name"] == "tracefix_rl" and metadata["version"] == "0.1.0"
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "healthy" and health["tasks"] >= 16
    sandbox = health["sandbox"]
    assert sandbox["backend"] == "zygote" and sandbox["seccomp"] is True
    assert sandbox["rlimits"] is True and sandbox["workers_alive"] == sandbox["workers"]
    page = httpx.get(f"{server.url}/tasks", params={"difficulty": "hard", "limit": 2}).json()
    assert page["total"] >= 6 and len(page["tasks"]) == 2
    assert {row["difficulty"] for row in page["tasks"]} == {"hard"}
    page = httpx.get(f"{server.url}/tasks", params={"split": "eval", "source": "generated",
                                                    "offset": 3, "limit": 5}).json()  # fmt: skip
    assert page["total"] > 5 and len(page["tasks"]) == 5 and page["offset"] == 3
    assert {(r["split"], r["source"]) for r in page["tasks"]} == {("eval", "generated")}
    assert {"task_id", "difficulty", "split", "source", "bug_type"} == set(page["tasks"][0])
    assert httpx.get(f"{server.url}/tasks", params={"split": "dev"}).status_code == 422
    assert httpx.get(f"{server.url}/docs").status_code == 200


# -- WebSocket -------------------------------------------------------------------------------


def test_ws_episode_with_typed_client(server):
    with TraceFixEnv(base_url=server.url).sync() as env:
        result = env.reset(task_id=TASK, episode_id="ws-typed")
        assert result.observation.task_id == TASK and result.reward == 0.0
        result = env.step(TraceFixAction(**FIX))
        assert result.observation.last_action_error is None
        result = env.step(TraceFixAction(action_type="RUN_TESTS"))
        assert result.observation.tests_passed == 4 and result.reward > 0
        state = env.state()
        assert state.episode_id == "ws-typed" and state.step_count == 2
        result = env.step(TraceFixAction(action_type="SUBMIT"))
        assert result.done and result.observation.solved and result.observation.score == 1.0


def test_ws_episode_with_generic_client(server):
    with GenericEnvClient(base_url=server.url).sync() as env:
        result = env.reset(seed=4, difficulty="medium", episode_id="ws-generic")
        assert result.observation["difficulty"] == "medium"
        result = env.step(
            {"action_type": "VIEW_CODE", "start_line": 1, "end_line": 2, "thought": "look first"}
        )
        assert result.observation["last_action_error"] is None
        assert env.state()["episode_id"] == "ws-generic"
        result = env.step({"action_type": "SUBMIT"})
        assert result.done and result.observation["score"] < 1.0


async def ws_exchange(url: str, frames: list[dict | str]) -> list[dict]:
    replies = []
    async with websockets.connect(url.replace("http", "ws") + "/ws") as socket:
        for frame in frames:
            await socket.send(frame if isinstance(frame, str) else json.dumps(frame))
            replies.append(json.loads(await socket.recv()))
    return replies


def test_ws_errors_keep_the_session(server):
    replies = asyncio.run(
        ws_exchange(
            server.url,
            [
                {"type": "reset", "data": {"task_id": TASK, "episode_id": "ws-err"}},
                {"type": "reset", "data": {"task_id": "nope"}},
                {"type": "step", "data": {"action_type": "FLY"}},
                "{not json",
                {"type": "step", "data": {"action_type": "VIEW_CODE"}},
                {"type": "state"},
            ],
        )
    )
    assert replies[1]["type"] == "error" and "unknown task_id" in replies[1]["data"]["message"]
    assert replies[2]["data"]["code"] == "VALIDATION_ERROR"
    assert replies[3]["data"]["code"] == "INVALID_JSON"
    assert replies[4]["type"] == "observation" and replies[4]["data"]["reward"] == -0.01
    assert replies[5]["data"]["episode_id"] == "ws-err" and replies[5]["data"]["step_count"] == 1


def test_concurrent_ws_sessions_are_isolated(server):
    async def session(name: str, task: str, fix: bool) -> list[dict]:
        frames: list[dict] = [{"type": "reset", "data": {"task_id": task, "episode_id": name}}]
        if fix:
            frames.append({"type": "step", "data": FIX})
        frames += [{"type": "step", "data": {"action_type": "RUN_TESTS"}}, {"type": "state"}]
        return await ws_exchange(server.url, frames)

    async def both():
        return await asyncio.gather(session("s1", TASK, True), session("s2", TASK, False))

    first, second = asyncio.run(both())
    assert first[-2]["data"]["observation"]["tests_passed"] == 4
    assert second[-2]["data"]["observation"]["tests_passed"] == 1
    assert first[-1]["data"]["episode_id"] == "s1" and first[-1]["data"]["step_count"] == 2
    assert second[-1]["data"]["episode_id"] == "s2" and second[-1]["data"]["step_count"] == 1


# -- processes and configuration ---------------------------------------------------------------


def test_reset_is_identical_across_server_processes(server, start_server):
    other = start_server()
    bodies = []
    for proc in (server, other):
        for args in (
            {"seed": 42, "episode_id": "det"},
            {"seed": 9, "difficulty": "hard", "episode_id": "det-hard"},
        ):
            bodies.append(post(proc, "/reset", args).content)
    assert bodies[0] == bodies[2] and bodies[1] == bodies[3]
    assert bodies[0] != bodies[1]


def test_malformed_pack_is_skipped_and_capacity_is_enforced(start_server, tmp_path):
    pack = tmp_path / "pack.jsonl"
    pack.write_text(json.dumps(GOOD_TASK) + "\n{broken\n")
    proc = start_server(extra_env={"TRACEFIX_TASKS": str(pack), "MAX_CONCURRENT_ENVS": "2"})
    assert httpx.get(f"{proc.url}/health").json()["tasks_skipped"] == 1
    assert f"{pack}:2: invalid JSON" in proc.log()
    observation = post(proc, "/reset", {"task_id": "pack_double"}).json()["observation"]
    assert observation["task_id"] == "pack_double"

    async def three_sessions():
        url = proc.url.replace("http", "ws") + "/ws"
        async with websockets.connect(url) as one, websockets.connect(url) as two:
            for socket in (one, two):
                await socket.send(json.dumps({"type": "reset", "data": {}}))
                assert json.loads(await socket.recv())["type"] == "observation"
            async with websockets.connect(url) as three:
                return json.loads(await three.recv())

    refused = asyncio.run(three_sessions())
    assert refused["data"]["code"] == "CAPACITY_REACHED"


def test_openenv_task_api_lists_tasks_and_reset_plays_one(server):
    """openenv 0.10's Task API: discovery over HTTP, selection with reset(split=, index=)."""
    base = f"{server.url}/tracefix_rl"
    assert httpx.get(f"{server.url}/list_environments").json() == ["tracefix_rl"]
    assert httpx.get(f"{base}/splits").json() == [{"name": "train", "type": "train"},
                                                  {"name": "eval", "type": "test"}]  # fmt: skip
    count = post(server, "/tracefix_rl/num_tasks", {"split": "eval"}).json()["num_tasks"]
    tasks = post(server, "/tracefix_rl/tasks", {"split": "eval"}).json()["tasks"]
    assert count == len(tasks) > 0 and [t["index"] for t in tasks] == list(range(count))
    third = post(server, "/tracefix_rl/task", {"split": "eval", "index": 2}).json()["task"]
    assert third == tasks[2] and {"id", "difficulty", "description"} <= set(third)
    window = post(server, "/tracefix_rl/task_range", {"split": "eval", "start": 1, "stop": 4})
    assert window.json()["tasks"] == tasks[1:4]
    assert post(server, "/tracefix_rl/task", {"split": "eval", "index": count}).status_code == 400
    assert post(server, "/tracefix_rl/task", {"split": "eval", "index": -1}).status_code == 400
    assert post(server, "/tracefix_rl/num_tasks", {"split": "dev"}).json()["num_tasks"] == 0
    assert httpx.get(f"{server.url}/other_env/splits").status_code == 404
    reset = post(server, "/reset", {"split": "eval", "index": 2, "episode_id": "indexed"})
    assert reset.json()["observation"]["task_id"] == third["id"]
    assert post(server, "/reset", {"split": "eval", "index": count}).status_code == 400


def test_console_script_honours_port(start_server):
    proc = start_server(argv=[str(BIN / "server")])
    assert httpx.get(f"{proc.url}/health").json()["status"] == "healthy"


def test_openenv_validate_local_and_url(server):
    for level, verdicts in (("static", {"pass"}), ("semantic", {"pass", "warn"})):
        local = subprocess.run(
            [str(BIN / "openenv"), "validate", "--level", level, "--json", "--skip-build"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert local.returncode == 0, local.stdout + local.stderr
        report = json.loads(local.stdout)
        assert report["verdict"] in verdicts, report
        statuses = {r["check_id"]: r["status"] for r in report["results"]}
        assert statuses["static.manifest"] == "pass"
        # without a build (Docker) the runtime and semantic graders are skipped, never failed
        assert "fail" not in statuses.values(), statuses
    remote = subprocess.run(
        [str(BIN / "openenv"), "validate", "--url", server.url, "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert remote.returncode == 0, remote.stdout + remote.stderr
    report = json.loads(remote.stdout)
    assert report["passed"] is True
    assert report["summary"]["passed_count"] == report["summary"]["total_count"] == 6


class LocalProcessProvider:
    """An ``openenv validate`` provider that runs this checkout as a local server process
    instead of building and starting the Docker image (no Docker here), so openenv's own
    runtime graders check the server with the manifest's runtime plan."""

    name = "local-process"
    capabilities = frozenset({ProviderCapability.IMAGE_BUILD})
    supported_network_modes = frozenset({"public"})

    def __init__(self, start_server) -> None:
        self._start_server = start_server

    def build(self, root: Path, execution: Any) -> str:
        assert (root / execution.dockerfile).is_file() and (root / execution.probe_path).is_file()
        return "sha256:" + hashlib.sha256(str(root).encode()).hexdigest()

    def start(self, spec: Any) -> Any:
        process = self._start_server()

        class Running:
            base_url = process.url

            def inspect(self) -> dict:
                return {"pid": process.proc.pid}

            def logs(self, max_bytes: int = 65536) -> str:
                return process.log()[-max_bytes:]

            def exec(self, argv: list[str], timeout_s: float) -> Any:
                raise NotImplementedError("no exec capability declared")

            def stop(self) -> None:
                process.stop()

        return Running()


def test_openenv_runtime_validation_passes_with_the_runtime_plan(start_server):
    """``validation.execution`` and ``validation/runtime.json`` are what openenv 0.10 needs
    for its runtime level; its graders (startup, reward, observation schema, state
    contract) pass on the server, and the plan solves its task."""
    from openenv.validation.runner import run_validation
    from openenv.validation.types import Level

    plan = json.loads((REPO / "validation" / "runtime.json").read_text())
    report = run_validation(REPO, max_level=Level.RUNTIME,
                            provider=LocalProcessProvider(start_server))  # fmt: skip
    statuses = {r.check_id: r.status.value for r in report.results}
    for check in ("static.manifest", "runtime.startup", "runtime.reward_well_formed",
                  "runtime.observation_schema", "runtime.state_contract"):  # fmt: skip
        assert statuses[check] == "pass", (check, report.model_dump_json(indent=1)[:4000])
    assert "fail" not in statuses.values() and "error" not in statuses.values(), statuses
    # the plan really solves the task: replay it
    with TraceFixEnv(base_url=start_server().url).sync() as env:
        env.reset(**plan["reset"]["options"], seed=plan["reset"]["seed"])
        for action in plan["actions"]:
            result = env.step(TraceFixAction(**action))
    assert result.done and result.observation.solved
