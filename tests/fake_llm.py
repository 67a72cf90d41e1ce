"""A small fake OpenAI-compatible server with scripted policies, chosen by URL path.

    http://127.0.0.1:PORT/<policy>/v1/chat/completions

* ``golden``: reads the observation, replaces the whole file with the task's reference
  solution, runs the tests, submits. Answers with a tool call when tools are offered, else
  with JSON in a code fence.
* ``golden-text``: the same, but rejects ``tools`` and ``response_format`` with HTTP 400, so
  the agent must fall back to plain text.
* ``garbage``: answers prose that holds no action.
* ``error500``: answers HTTP 500 to everything.
"""

from __future__ import annotations

import json
import re
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

TASKS = Path(__file__).resolve().parent.parent / "task_data" / "curated"


def _solution(task_id: str) -> str:
    return tomllib.loads((TASKS / f"{task_id}.toml").read_text())["solution"].strip("\n")


def golden_action(messages: list[dict[str, Any]], with_thought: bool) -> dict[str, Any]:
    """The fix, then RUN_TESTS, then SUBMIT: decided from the conversation so far."""
    task_id = re.search(r"Task (\S+) \(", messages[1]["content"]).group(1)
    latest = messages[-1]["content"]
    lines = int(re.search(r"Code \((\d+) lines\)", latest).group(1))
    solution = _solution(task_id)
    if "Visible tests passing" in latest and _code_of(latest) != solution:
        action = {"action_type": "REPLACE_LINES", "start_line": 1, "end_line": lines,
                  "new_code_block": solution}  # fmt: skip
    elif "Ran " not in latest.split("Code (")[0]:
        action = {"action_type": "RUN_TESTS"}
    else:
        action = {"action_type": "SUBMIT"}
    if with_thought:
        action["thought"] = f"golden policy for {task_id}"
    return action


def _code_of(rendered: str) -> str:
    block = rendered.split("lines):\n", 1)[1].split("\n\n", 1)[0]
    return "\n".join(line.split(" | ", 1)[1] if " | " in line else "" for line in
                     block.split("\n"))  # fmt: skip


def _reply(body: dict[str, Any], action: dict[str, Any] | None, text: str | None) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if action is not None:
        message["tool_calls"] = [{
            "id": "call_1", "type": "function",
            "function": {"name": "act", "arguments": json.dumps(action)},
        }]  # fmt: skip
    return {
        "id": "fake-1",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "fake"),
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def create_app() -> FastAPI:
    app = FastAPI()
    app.state.calls = []

    @app.get("/{policy}/v1/models")
    async def models(policy: str) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "fake", "object": "model"}]}

    @app.post("/{policy}/v1/chat/completions")
    async def complete(policy: str, request: Request):
        body = await request.json()
        app.state.calls.append({"policy": policy, "tools": "tools" in body,
                                "response_format": "response_format" in body})  # fmt: skip
        messages = body["messages"]
        thought = '"thought"' in messages[0]["content"]
        if policy == "error500":
            return JSONResponse({"error": {"message": "upstream exploded"}}, status_code=500)
        if policy == "garbage":
            return _reply(body, None, "Hmm, I believe the bug might be somewhere in there.")
        if policy == "golden-text" and ("tools" in body or "response_format" in body):
            return JSONResponse({"error": {"message": "tools and response_format are not "
                                           "supported"}}, status_code=400)  # fmt: skip
        action = golden_action(messages, thought)
        if "tools" in body:
            return _reply(body, action, None)
        return _reply(body, None, "Here is my action:\n```json\n" + json.dumps(action) + "\n```")

    return app


class FakeLLM:
    """Runs the fake server in a background thread on 127.0.0.1."""

    def __init__(self, port: int) -> None:
        self.app = create_app()
        self.port = port
        config = uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake LLM did not start")
            time.sleep(0.05)

    def url(self, policy: str) -> str:
        return f"http://127.0.0.1:{self.port}/{policy}/v1"

    @property
    def calls(self) -> list[dict[str, Any]]:
        return self.app.state.calls

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
