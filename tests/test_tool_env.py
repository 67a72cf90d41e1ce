"""TraceFixToolEnv against TRL 1.16's environment_factory contract, without TRL: the tool
methods come from the registry, reset forwards only reset keys, an unsubmitted episode is
graded by get_reward, and a session the server ended is replaced at the next reset.
(tests/test_train.py runs it inside a real GRPOTrainer.)"""

from __future__ import annotations

import inspect
import re
import time

import pytest

from tracefix_rl import TraceFixToolEnv, tool_env
from tracefix_rl.actions import ACTIONS

TASK = "sum_of_evens_wrong_modulus"
FIX = {"start_line": 5, "end_line": 5, "new_code_block": "if n % 2 == 0:"}


def public_functions(cls: type) -> list[str]:
    """What TRL lists: the class's functions, ``_``-prefixed ones excluded."""
    return sorted(name for name, _ in inspect.getmembers(cls, predicate=inspect.isfunction)
                  if not name.startswith("_"))  # fmt: skip


def test_the_tools_are_the_registrys_actions_with_typed_documented_parameters():
    tools = [name for name in public_functions(TraceFixToolEnv)
             if name not in ("reset", "get_reward")]  # fmt: skip
    assert tools == sorted(action.name.lower() for action in ACTIONS)
    for action in ACTIONS:
        method = getattr(TraceFixToolEnv, action.name.lower())
        signature = inspect.signature(method)
        assert list(signature.parameters)[0] == "self"
        doc = inspect.getdoc(method)
        assert doc.startswith(" ".join(action.description.split()))
        fields = action.Params.model_fields
        assert list(signature.parameters)[1:] == sorted(
            fields, key=lambda name: not fields[name].is_required()
        )
        for name, info in fields.items():
            parameter = signature.parameters[name]
            assert parameter.annotation is not inspect.Parameter.empty
            assert (parameter.default is inspect.Parameter.empty) == info.is_required()
            assert re.search(rf"^    {name}: \S", doc, re.M), doc  # Google style Args entry
        assert method.__annotations__["return"] is str


def test_configured_makes_zero_argument_factories_and_checks_its_arguments():
    Env = TraceFixToolEnv.configured(base_url="http://127.0.0.1:1/", reward="solved")
    assert Env.__name__ == "TraceFixToolEnv" and issubclass(Env, TraceFixToolEnv)
    assert Env.base_url == "http://127.0.0.1:1" and Env().reward == "solved"
    assert TraceFixToolEnv.reward == "return"  # the base class is untouched
    with pytest.raises(ValueError, match="reward must be one of return, score, solved"):
        TraceFixToolEnv.configured(reward="sum")  # type: ignore[arg-type]


def test_an_episode_through_the_tools_and_its_reward(server):
    Env = TraceFixToolEnv.configured(base_url=server.url)
    env = Env()
    with pytest.raises(ValueError, match="the episode is over"):
        env.run_tests()  # no episode yet
    # every dataset column arrives; only the reset keys are forwarded
    text = env.reset(task_id=TASK, prompt=[{"role": "user", "content": "x"}], answer=42)
    assert f"Task {TASK} (easy)" in text and "   5 |         if n % 2 == 1:" in text
    assert "1 passed, 3 failed" in env.run_tests()
    with pytest.raises(ValueError, match="REPLACE_LINES needs new_code_block"):
        env.replace_lines(5, 5)  # type: ignore[call-arg]
    assert ">>    5 |         if n % 2 == 0:" in env.replace_lines(**FIX)
    assert "Showing lines 4-6" in env.view_code(start_line=4, end_line=6)
    assert "score 1.000, solved: true" in env.submit()
    with pytest.raises(ValueError, match="the episode is over"):
        env.undo_edit()
    solved_return = env.get_reward()
    assert solved_return > 1.0 and env.get_reward() == solved_return  # stable
    env.reset(task_id=TASK)  # the same session, a new episode
    assert env.get_reward() < solved_return  # never submitted: graded here, unsolved
    assert env._observation.done and env._observation.solved is False
    for reward, expected in (("score", 1.0), ("solved", 1.0)):
        scored = TraceFixToolEnv.configured(base_url=server.url, reward=reward)()
        scored.reset(task_id=TASK)
        scored.replace_lines(**FIX)
        assert scored.get_reward() == expected  # auto-submitted, solved
        scored._close()
    env._close()


def test_a_session_the_server_ended_is_replaced_at_the_next_reset(start_server):
    server = start_server(extra_env={"SESSION_TIMEOUT_S": "1"})
    env = TraceFixToolEnv.configured(base_url=server.url)()
    env.reset(task_id=TASK)
    time.sleep(2.5)  # idle: the server closes the session (4408) and ends its episode
    with pytest.raises(ValueError, match="session was lost"):
        env.run_tests()
    assert env.get_reward() == 0.0  # the episode is gone: the return so far
    assert "Task sum_of_evens" in env.reset(task_id=TASK)  # a new session, transparently
    time.sleep(2.5)
    assert "Task sum_of_evens" in env.reset(task_id=TASK)  # reset itself reconnects
    assert "1 passed" in env.run_tests()
    env._close()


def test_a_full_server_is_waited_for_then_named(start_server, monkeypatch):
    server = start_server(extra_env={"MAX_CONCURRENT_ENVS": "1"})
    Env = TraceFixToolEnv.configured(base_url=server.url)
    holder = Env()
    holder.reset(task_id=TASK)
    monkeypatch.setattr(tool_env, "CAPACITY_RETRY_S", 1.5)
    waiting = Env()
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="raise its MAX_CONCURRENT_ENVS"):
        waiting.reset(task_id=TASK)
    assert time.monotonic() - started >= 1.0  # it retried before giving up
    holder._close()
    assert "Task sum_of_evens" in waiting.reset(task_id=TASK)  # a slot is free again
    waiting._close()
