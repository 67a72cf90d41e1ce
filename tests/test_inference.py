"""inference.py end to end: a real server subprocess, a fake OpenAI-compatible model, and
strict checks of every stdout line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import REPO, free_port
from tests.fake_llm import FakeLLM
from tracefix_rl import inference

START_RE = re.compile(r"^\[START\] task=(\S+) env=tracefix_rl model=(\S+)$")
STEP_RE = re.compile(
    r"^\[STEP\] step=(\d+) action=(\S+) reward=(-?\d+\.\d{2}) done=(true|false) error=(.+)$"
)
END_RE = re.compile(
    r"^\[END\] success=(true|false) steps=(\d+) score=(\d\.\d{3}) "
    r"rewards=((?:-?\d+\.\d{2})(?:,-?\d+\.\d{2})*)?$"
)


@pytest.fixture(scope="module")
def llm() -> Iterator[FakeLLM]:
    fake = FakeLLM(free_port())
    yield fake
    fake.stop()


def run(
    llm: FakeLLM,
    policy: str,
    *args: str,
    env_url: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "LOCAL_IMAGE_NAME"}
    env.update({
        "API_BASE_URL": llm.url(policy),
        "MODEL_NAME": "fake-model",
        "HF_TOKEN": "test-token",
        "ENV_URL": env_url or f"http://127.0.0.1:{free_port()}",  # nothing listens there
        "LLM_MAX_RETRIES": "1",
        "LLM_RETRY_BACKOFF_S": "0.1",
        **(extra_env or {}),
    })  # fmt: skip
    return subprocess.run([sys.executable, "inference.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def episodes(stdout: str) -> list[dict]:
    """Parse and validate the whole transcript; returns one dict per episode."""
    found: list[dict] = []
    current: dict | None = None
    for line in stdout.splitlines():
        if match := START_RE.match(line):
            assert current is None, f"[START] inside an episode: {line}"
            current = {"task": match.group(1), "model": match.group(2), "steps": []}
        elif match := STEP_RE.match(line):
            assert current is not None, f"[STEP] outside an episode: {line}"
            assert int(match.group(1)) == len(current["steps"]) + 1
            current["steps"].append({"action": match.group(2), "reward": match.group(3),
                                     "done": match.group(4), "error": match.group(5)})  # fmt: skip
        elif match := END_RE.match(line):
            assert current is not None, f"[END] without [START]: {line}"
            rewards = match.group(4).split(",") if match.group(4) else []
            assert int(match.group(2)) == len(current["steps"]) == len(rewards)
            assert rewards == [s["reward"] for s in current["steps"]]
            score = float(match.group(3))
            assert 0.01 <= score <= 0.99
            current.update(success=match.group(1) == "true", score=score)
            if current["steps"]:
                assert all(s["done"] == "false" for s in current["steps"][:-1])
            found.append(current)
            current = None
        else:
            pytest.fail(f"unexpected stdout line: {line!r}")
    assert current is None, "episode without [END]"
    return found


def benchmark() -> list[str]:
    return [t["id"] for t in yaml.safe_load((REPO / "openenv.yaml").read_text())["tasks"]]


def test_golden_policy_solves_the_benchmark_set(llm, server):
    done = run(llm, "golden", env_url=server.url)
    assert done.returncode == 0, done.stderr
    found = episodes(done.stdout)
    assert [e["task"] for e in found] == benchmark()
    for episode in found:
        assert episode["model"] == "fake-model"
        assert episode["success"] and episode["score"] == 0.99
        actions = [s["action"] for s in episode["steps"]]
        assert actions[0].startswith("REPLACE_LINES(1-") and actions[-2:] == ["RUN_TESTS", "SUBMIT"]
        assert all(s["error"] == "null" for s in episode["steps"])
        assert episode["steps"][-1]["done"] == "true"
    assert any(call["tools"] for call in llm.calls)


def test_medium_on_a_fresh_checkout_starts_its_own_server(llm, registry):
    done = run(llm, "golden", "--medium")
    assert done.returncode == 0, done.stderr
    found = episodes(done.stdout)
    assert sorted(e["task"] for e in found) == registry.ids("medium", source="curated")
    assert all(e["success"] for e in found)
    started = re.search(r"starting one at (http://127\.0\.0\.1:\d+)", done.stderr)
    assert started, done.stderr
    with pytest.raises(httpx.HTTPError):  # the server it started is gone again
        httpx.get(f"{started.group(1)}/health", timeout=2)


def test_text_fallback_when_tools_and_json_mode_are_rejected(llm, server):
    done = run(llm, "golden-text", "--task", "sum_of_evens_wrong_modulus", env_url=server.url)
    (episode,) = episodes(done.stdout)
    assert episode["success"]
    assert "falling back" in done.stderr


def test_garbage_replies_become_harmless_actions_with_errors(llm, server):
    done = run(llm, "garbage", "--task", "sum_of_evens_wrong_modulus", "--max-steps", "3",
               env_url=server.url)  # fmt: skip
    assert done.returncode == 0
    (episode,) = episodes(done.stdout)
    assert episode["success"] is False and episode["score"] == 0.01  # no gain over the bug
    assert [s["action"] for s in episode["steps"]] == ["VIEW_CODE"] * 3
    assert all(s["error"].startswith("no JSON action in reply") for s in episode["steps"])
    assert episode["steps"][-1]["done"] == "true"  # truncated at max_steps


@pytest.mark.parametrize("policy", ["error500", "down"])
def test_api_failures_still_end_every_episode(llm, server, policy):
    extra = {"API_BASE_URL": f"http://127.0.0.1:{free_port()}/v1"} if policy == "down" else {}
    done = run(llm, policy, env_url=server.url, extra_env=extra)
    assert done.returncode == 1, done.stderr  # every episode failed with an error
    assert f"0/{len(benchmark())} solved" in done.stderr
    found = episodes(done.stdout)
    assert [e["task"] for e in found] == benchmark()
    for episode in found:
        assert not episode["success"] and episode["steps"] == [] and episode["score"] == 0.01


def test_environment_failure_still_ends_every_episode(llm):
    done = run(llm, "golden", extra_env={"LOCAL_IMAGE_NAME": "no-such-image:latest"})
    found = episodes(done.stdout)
    assert [e["task"] for e in found] == benchmark()
    assert not any(e["success"] for e in found)
    assert "environment unavailable" in done.stderr


def test_tier_flags_change_the_tasks(llm, server, registry):
    easy = run(llm, "garbage", "--easy", "--max-steps", "1", env_url=server.url)
    hard = run(llm, "garbage", "--hard", "--max-steps", "1", env_url=server.url)
    easy_tasks = [e["task"] for e in episodes(easy.stdout)]
    hard_tasks = [e["task"] for e in episodes(hard.stdout)]
    assert easy_tasks == registry.ids("easy", source="curated")
    assert hard_tasks == registry.ids("hard", source="curated")
    assert not set(easy_tasks) & set(hard_tasks)


def test_same_seed_same_stdout(llm, server):
    args = ("--task", "lru_cache_get_does_not_promote", "--episodes", "2", "--seed", "7")
    first = run(llm, "golden", *args, env_url=server.url)
    second = run(llm, "golden", *args, env_url=server.url)
    assert first.stdout == second.stdout and len(episodes(first.stdout)) == 2


def test_trajectories_and_thoughts(llm, server, tmp_path: Path):
    path = tmp_path / "runs.jsonl"
    done = run(llm, "golden", "--task", "sum_of_evens_wrong_modulus", "--thought",
               "--trajectories", str(path), env_url=server.url)  # fmt: skip
    (episode,) = episodes(done.stdout)
    assert "thought: golden policy for sum_of_evens_wrong_modulus" in done.stderr
    (record,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert record["task"] == "sum_of_evens_wrong_modulus" and record["model"] == "fake-model"
    assert record["solved"] is True and record["score"] == 1.0 and record["seed"] == 0
    assert record["gain"] == 1.0  # score: the raw pass fraction; gain: what [END] reports
    assert [m["role"] for m in record["messages"][:3]] == ["system", "user", "assistant"]
    assert len(record["actions"]) == len(record["rewards"]) == len(episode["steps"])


# -- unit tests of the parsing and of the Docker glue -----------------------------------------


def test_parse_action_variants():
    fenced = 'Sure.\n```json\n{"action_type": "run_tests"}\n```'
    assert inference.parse_action(fenced).action_type == "RUN_TESTS"
    nested = (
        'x {"action_type": "REPLACE_LINES", "start_line": 2, "end_line": 2, '
        '"new_code_block": "y = {1: 2}", "extra": 1} tail'
    )
    action = inference.parse_action(nested)
    assert action.new_code_block == "y = {1: 2}" and action.start_line == 2
    with pytest.raises(inference.ParseError, match="no JSON action in reply"):
        inference.parse_action("I will SUBMIT now")  # a word in prose is not an action
    quoted = inference.parse_action('{"action_type": "VIEW_CODE", "start_line": "3", '
                                    '"end_line": " 9 "}')  # fmt: skip
    assert (quoted.start_line, quoted.end_line) == (3, 9)  # the server wants JSON integers
    for bad in ("", "no idea", '{"action_type": "FLY"}', '{"action_type": "VIEW_CODE", '
                '"start_line": "x"}'):  # fmt: skip
        with pytest.raises(inference.ParseError):
            inference.parse_action(bad)


def test_two_decimals_has_no_negative_zero():
    assert [inference.two_decimals(x) for x in (-0.004, 0.004, -0.01, 1.105)] == [
        "0.00", "0.00", "-0.01", "1.10"]  # fmt: skip


def test_step_action_rendering_has_no_spaces():
    from tracefix_rl.models import TraceFixAction

    block = TraceFixAction(action_type="REPLACE_LINES", start_line=3, end_line=4,
                           new_code_block="a = 1\nb = 2")  # fmt: skip
    assert inference.describe_action(block) == "REPLACE_LINES(3-4,2_lines)"
    view = TraceFixAction(action_type="VIEW_CODE", start_line=2)
    assert inference.describe_action(view) == "VIEW_CODE(2-)"


def test_local_image_goes_through_from_docker_image(monkeypatch, server):
    stopped = []

    class Provider:
        def stop_container(self):
            stopped.append(True)

    class Started:
        _ws_url = server.url.replace("http://", "ws://") + "/ws"
        _provider = Provider()

        async def disconnect(self):
            return None

    async def fake_from_docker_image(image):
        assert image == "tracefix_rl:test"
        return Started()

    monkeypatch.setattr(inference.TraceFixEnv, "from_docker_image", fake_from_docker_image)
    env = inference.Environment("http://127.0.0.1:1", "tracefix_rl:test")
    assert env.url == server.url
    with env.session() as session:
        assert session.reset(task_id="sum_of_evens_wrong_modulus").observation.task_id
    env.close()
    assert stopped == [True]


def test_the_docs_list_every_agent_variable_with_its_default():
    section = (REPO / "docs" / "inference.md").read_text()
    table = section[
        section.index("| variable |") : section.index("\n\n", section.index("| variable |"))
    ]
    named = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", table))
    assert named == {name.upper() for name in inference.AgentSettings.model_fields}
    for name, info in inference.AgentSettings.model_fields.items():
        if info.default is not None:
            default = info.default if not isinstance(info.default, float) else int(info.default)
            assert f"`{default}`" in table, name


def test_a_bad_variable_stops_the_agent_with_its_name(llm):
    proc = run(llm, "golden", extra_env={"LLM_TIMEOUT_S": "fast", "LLM_MAX_RETRIES": "-1"})
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert "LLM_TIMEOUT_S must be a finite number > 0, got 'fast'" in proc.stderr
    assert "LLM_MAX_RETRIES must be an integer ≥ 0, got '-1'" in proc.stderr
