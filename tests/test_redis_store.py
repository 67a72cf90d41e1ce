"""HTTP episodes in Redis (``EPISODE_STORE=redis://...``): any replica continues any
episode, byte for byte; steps of one episode are serialised across replicas; a restart
loses nothing; the bound and eviction hold across replicas; Redis down is a 503, not a
500. Real Redis (Debian's redis-server) and real server processes."""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import REPO
from tracefix_rl.environment import SNAPSHOT_FORMAT, TraceFixEnvironment
from tracefix_rl.models import TraceFixAction
from tracefix_rl.server.redis_episodes import KEY_PREFIX, LEASE_MS

TASK = "sum_of_evens_wrong_modulus"
FIX = {"action_type": "REPLACE_LINES", "start_line": 5, "end_line": 5,
       "new_code_block": "if n % 2 == 0:"}  # fmt: skip
SCRIPT = [
    {"action_type": "RUN_TESTS"},
    {"action_type": "VIEW_CODE", "start_line": 1, "end_line": 3},
    {"action_type": "TRACE", "test": 1, "lines": [5]},
    FIX,
    {"action_type": "RUN_TESTS"},
    {"action_type": "UNDO_EDIT"},
    {"action_type": "REPLACE_LINES", "start_line": 9, "end_line": 9, "new_code_block": "x ="},
    {"action_type": "RESET_TO_ORIGINAL"},
    FIX,
    {"action_type": "SUBMIT"},
    {"action_type": "RUN_TESTS"},  # after the end: rejected
]


def send(url: str, episode_id: str, action: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}/step", json={"action": action, "episode_id": episode_id},
                      timeout=60)  # fmt: skip


def play(urls: list[str], episode_id: str, task: str = TASK) -> list[bytes]:
    """Reset on ``urls[0]``, then each step of ``SCRIPT`` on the next URL in turn: the raw
    response bodies."""
    bodies = [httpx.post(f"{urls[0]}/reset", json={"task_id": task, "episode_id": episode_id},
                         timeout=60).content]  # fmt: skip
    for number, action in enumerate(SCRIPT, 1):
        response = httpx.post(f"{urls[number % len(urls)]}/step", timeout=60,
                              json={"action": action, "episode_id": episode_id})  # fmt: skip
        assert response.status_code == 200, response.text
        bodies.append(response.content)
    return bodies


def test_an_episode_continues_on_any_replica_byte_for_byte(start_server, redis_url):
    alone = start_server()  # the in-process store: the reference
    one, two = (start_server(extra_env={"EPISODE_STORE": redis_url}) for _ in range(2))
    reference = play([alone.url], "same-id")
    assert json.loads(reference[-2])["observation"]["solved"] is True
    assert play([one.url, two.url], "same-id") == reference
    assert play([two.url], "same-id") == reference  # one replica, Redis-backed
    state = httpx.get(f"{one.url}/state", params={"episode_id": "same-id"}).json()
    assert state["done"] is True and state["step_count"] == len(SCRIPT) - 1
    health = httpx.get(f"{two.url}/health").json()
    assert health["episode_store"] == {"kind": "redis", "capacity": 256, "reachable": True}
    assert health["http_episodes"] == 1
    cookie_client = httpx.Client(timeout=60)  # the cookie /reset sets works on any replica
    cookie_client.post(f"{one.url}/reset", json={"task_id": TASK})
    step = cookie_client.post(f"{two.url}/step", json={"action": {"action_type": "RUN_TESTS"}})
    assert step.json()["observation"]["step_count"] == 1


def test_concurrent_steps_of_one_episode_are_serialised_across_replicas(start_server, redis_url):
    replicas = [start_server(extra_env={"EPISODE_STORE": redis_url}) for _ in range(2)]
    httpx.post(f"{replicas[0].url}/reset", json={"task_id": TASK, "episode_id": "busy"})

    def step(number: int) -> int:
        response = httpx.post(f"{replicas[number % 2].url}/step", timeout=120,
                              json={"action": {"action_type": "RUN_TESTS"},
                                    "episode_id": "busy"})  # fmt: skip
        assert response.status_code == 200, response.text
        return response.json()["observation"]["step_count"]

    with ThreadPoolExecutor(max_workers=12) as pool:
        counts = sorted(pool.map(step, range(24)))
    assert counts == list(range(1, 25))  # every step applied once, none twice or lost
    state = httpx.get(f"{replicas[1].url}/state", params={"episode_id": "busy"}).json()
    assert state["step_count"] == 24


def test_a_restarted_replica_loses_no_episode(start_server, redis_url):
    first = start_server(extra_env={"EPISODE_STORE": redis_url})
    httpx.post(f"{first.url}/reset", json={"task_id": TASK, "episode_id": "survivor"})
    httpx.post(f"{first.url}/step", json={"action": FIX, "episode_id": "survivor"})
    first.stop()  # SIGTERM: a graceful shutdown keeps the episodes in Redis
    second = start_server(extra_env={"EPISODE_STORE": redis_url})
    final = send(second.url, "survivor", {"action_type": "SUBMIT"})
    observation = final.json()["observation"]
    assert observation["solved"] is True and observation["step_count"] == 2


def test_the_bound_and_eviction_hold_across_replicas(start_server, redis_url):
    settings = {"EPISODE_STORE": redis_url, "HTTP_MAX_EPISODES": "2",
                "HTTP_EPISODE_GRACE_S": "600"}  # fmt: skip
    one, two = (start_server(extra_env=settings) for _ in range(2))
    for url, episode_id in ((one.url, "a"), (two.url, "b")):
        assert httpx.post(f"{url}/reset", json={"task_id": TASK, "episode_id": episode_id}
                          ).status_code == 200  # fmt: skip
    full = httpx.post(f"{one.url}/reset", json={"task_id": TASK, "episode_id": "c"})
    assert full.status_code == 503 and int(full.headers["Retry-After"]) >= 1
    assert "all 2 HTTP episode slots" in full.json()["detail"]
    submit = {"action": {"action_type": "SUBMIT"}, "episode_id": "a"}
    assert httpx.post(f"{two.url}/step", json=submit, timeout=60).json()["done"] is True
    assert httpx.post(f"{two.url}/reset", json={"task_id": TASK, "episode_id": "c"}
                      ).status_code == 200  # the finished episode "a" was evicted  # fmt: skip
    gone = httpx.post(f"{one.url}/step", json=submit)
    assert gone.status_code == 404 and "unknown or expired episode_id 'a'" in gone.text
    assert httpx.get(f"{one.url}/health").json()["http_episodes"] == 2


def test_a_dead_replicas_lease_lapses(start_server, redis_url):
    """A replica killed mid-step leaves its lease behind; the next step waits for it to
    lapse (within LEASE_MS), then proceeds."""
    server = start_server(extra_env={"EPISODE_STORE": redis_url})
    httpx.post(f"{server.url}/reset", json={"task_id": TASK, "episode_id": "leased"})
    client = redis.Redis.from_url(redis_url)
    client.set(f"{KEY_PREFIX}lock:leased", "a-dead-replica", px=1500)
    started = time.monotonic()
    step = send(server.url, "leased", {"action_type": "RUN_TESTS"})
    assert step.status_code == 200 and step.json()["observation"]["step_count"] == 1
    assert time.monotonic() - started >= 1.0
    assert LEASE_MS <= 15_000  # a crashed replica blocks its episodes for seconds, not minutes
    client.close()


def test_redis_down_is_a_503_and_the_websocket_path_keeps_working(start_server, tmp_path: Path):
    from tracefix_rl.procs import free_port, start_redis, stop_process_group

    port = free_port()
    proc = start_redis(port)
    url = f"redis://127.0.0.1:{port}/0"
    server = start_server(extra_env={"EPISODE_STORE": url})
    httpx.post(f"{server.url}/reset", json={"task_id": TASK, "episode_id": "kept"})
    proc.send_signal(signal.SIGSTOP)  # Redis stops answering (as if the network dropped)
    try:
        redis_call = send(server.url, "kept", {"action_type": "RUN_TESTS"})
        assert redis_call.status_code == 503
        assert "the episode store (Redis) cannot be reached" in redis_call.json()["detail"]
        assert redis_call.headers["Retry-After"] == "2"
        health = httpx.get(f"{server.url}/health", timeout=60)
        assert health.status_code == 200 and health.json()["http_episodes"] is None
        assert health.json()["episode_store"]["reachable"] is False
        from tracefix_rl.client import TraceFixEnv

        with TraceFixEnv(base_url=server.url).sync() as env:  # /ws needs no Redis
            assert env.reset(task_id=TASK).observation.task_id == TASK
    finally:
        proc.send_signal(signal.SIGCONT)
    again = send(server.url, "kept", {"action_type": "RUN_TESTS"})
    assert again.status_code == 200 and again.json()["observation"]["step_count"] == 1
    stop_process_group(proc)


def test_a_step_whose_save_goes_unanswered_is_reported_truthfully(start_server):
    """Redis stops answering while a step is being saved (longer than the client's socket
    timeout): the 503 must say whether the step was kept, so that a retry applies it once."""
    from tracefix_rl.procs import free_port, start_redis, stop_process_group

    port = free_port()
    proc = start_redis(port)
    server = start_server(extra_env={"EPISODE_STORE": f"redis://127.0.0.1:{port}/0"})
    try:
        httpx.post(f"{server.url}/reset", json={"task_id": TASK, "episode_id": "stall"})
        slow = {"action_type": "REPLACE_LINES", "start_line": 1, "end_line": 0,
                "new_code_block": "import time\ntime.sleep(0.2)"}  # fmt: skip
        assert send(server.url, "stall", slow).json()["observation"]["step_count"] == 1
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(send, server.url, "stall", {"action_type": "RUN_TESTS"})
            time.sleep(0.3)  # the step holds its lease and runs its tests (0.2 s each)
            proc.send_signal(signal.SIGSTOP)
            time.sleep(12)  # longer than the socket timeout (10 s): the save's answer is lost
            proc.send_signal(signal.SIGCONT)
            answer = pending.result(timeout=120)
        count = httpx.get(f"{server.url}/state", params={"episode_id": "stall"}).json()
        if answer.status_code == 200:
            assert answer.json()["observation"]["step_count"] == count["step_count"] == 2
        else:
            assert answer.status_code == 503, answer.text
            assert "the step was not kept: retry it" in answer.json()["detail"]
            assert count["step_count"] == 1
            again = send(server.url, "stall", {"action_type": "RUN_TESTS"})
            assert again.json()["observation"]["step_count"] == 2  # applied once
    finally:
        proc.send_signal(signal.SIGCONT)
        stop_process_group(proc)


def test_a_server_whose_redis_never_answers_refuses_to_start():
    from tests.conftest import run_refused_server
    from tracefix_rl.procs import free_port

    done = run_refused_server({"EPISODE_STORE": f"redis://127.0.0.1:{free_port()}/0"})
    assert done.returncode != 0
    assert "EPISODE_STORE: Redis at redis://127.0.0.1:" in done.stderr
    assert "did not answer within 15s" in done.stderr
    assert "Traceback" not in done.stderr  # one line, before anything started


def test_snapshots_restore_every_action_byte_for_byte(registry):
    """In process: an episode saved and restored before every step (as a Redis-backed
    replica does) observes exactly what one kept in memory observes."""
    actions = [TraceFixAction(**a) for a in SCRIPT]
    kept = TraceFixEnvironment(registry=registry)
    kept.reset(task_id=TASK, episode_id="e")
    expected = [kept.step(action).model_dump_json() for action in actions]
    moving = TraceFixEnvironment(registry=registry)
    moving.reset(task_id=TASK, episode_id="e")
    saved: dict[str, Any] = json.loads(json.dumps(moving.snapshot()))
    assert saved["format"] == SNAPSHOT_FORMAT
    seen = []
    for action in actions:
        env = TraceFixEnvironment(registry=registry)
        env.restore(saved)
        seen.append(env.step(action).model_dump_json())
        saved = json.loads(json.dumps(env.snapshot()))
        env.close()
    assert seen == expected
    wrong = {**saved, "format": SNAPSHOT_FORMAT + 1}
    with pytest.raises(ValueError, match="a replica of another version saved it"):
        TraceFixEnvironment(registry=registry).restore(wrong)
    changed = json.loads(json.dumps(saved))
    changed["episode"]["task_fingerprint"] = "0" * 16
    with pytest.raises(ValueError, match="replicas must serve the same tasks"):
        TraceFixEnvironment(registry=registry).restore(changed)
    kept.close()
    moving.close()


def test_a_replica_without_the_episodes_task_answers_503_not_500(start_server, redis_url,
                                                                 tmp_path: Path):  # fmt: skip
    """Replicas must serve the same tasks; one that does not says so (another may serve)."""
    from tests.test_tasks import GOOD_TASK

    pack = tmp_path / "pack.jsonl"
    pack.write_text(json.dumps(GOOD_TASK) + "\n")
    with_pack = start_server(extra_env={"EPISODE_STORE": redis_url, "TRACEFIX_TASKS": str(pack)})
    without = start_server(extra_env={"EPISODE_STORE": redis_url})
    task_id = GOOD_TASK["task_id"]
    httpx.post(f"{with_pack.url}/reset", json={"task_id": task_id, "episode_id": "extra"})
    refused = send(without.url, "extra", {"action_type": "RUN_TESTS"})
    assert refused.status_code == 503
    assert "this replica cannot continue episode 'extra'" in refused.json()["detail"]
    assert send(with_pack.url, "extra", {"action_type": "RUN_TESTS"}).status_code == 200


def test_a_password_in_the_store_url_is_never_shown(monkeypatch):
    from tracefix_rl.settings import SettingsError, load_settings, redacted

    assert redacted("redis://:hunter2@redis:6379/0") == "redis://:***@redis:6379/0"
    monkeypatch.setenv("EPISODE_STORE", "http://user:hunter2@redis:6379/0")
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert "hunter2" not in str(refused.value) and "user:***@redis" in str(refused.value)


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_a_step_retried_with_its_request_id_is_answered_not_applied_again(
    start_server, redis_url, store
):
    env = {"EPISODE_STORE": redis_url} if store == "redis" else {}
    replicas = [start_server(extra_env=env) for _ in range(2 if store == "redis" else 1)]
    urls = [r.url for r in replicas]
    httpx.post(f"{urls[0]}/reset", json={"task_id": TASK, "episode_id": "retried"})

    def step(url: str, action: dict[str, Any], request_id: str) -> httpx.Response:
        body = {"action": action, "episode_id": "retried", "request_id": request_id}
        return httpx.post(f"{url}/step", json=body, timeout=60)

    first = step(urls[0], FIX, "step-1")
    again = step(urls[-1], FIX, "step-1")  # the answer was lost: the client retries
    assert first.content == again.content
    assert first.json()["observation"]["step_count"] == 1
    tests = step(urls[0], {"action_type": "RUN_TESTS"}, "step-2")
    assert tests.json()["observation"]["step_count"] == 2
    assert step(urls[-1], FIX, "step-1").json()["observation"]["step_count"] == 3  # not last
    state = httpx.get(f"{urls[0]}/state", params={"episode_id": "retried"}).json()
    assert state["step_count"] == 3


def test_the_configuration_reference_documents_the_store():
    text = (REPO / "docs" / "configuration.md").read_text()
    assert "| `EPISODE_STORE` | `memory` |" in text
