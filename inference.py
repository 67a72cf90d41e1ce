"""Baseline agent: evaluates an OpenAI-compatible model on the tracefix_rl gym.

    python inference.py                 # the benchmark set (the tasks listed in openenv.yaml)
    python inference.py --medium        # every medium task
    python inference.py --task ID --episodes 3 --trajectories runs.jsonl

stdout carries exactly these lines, each flushed (everything else goes to stderr):

    [START] task=<task_id> env=tracefix_rl model=<MODEL_NAME>
    [STEP] step=<n> action=<action> reward=<r:.2f> done=<true|false> error=<msg|null>
    [END] success=<true|false> steps=<n> score=<s:.3f> rewards=<r1,r2,...>

Environment variables (:class:`AgentSettings`, read and validated once in ``main``):
``API_BASE_URL`` (default https://router.huggingface.co/v1), ``MODEL_NAME`` (default
Qwen/Qwen2.5-72B-Instruct), ``HF_TOKEN`` (else ``API_KEY``), ``ENV_URL`` (default
http://127.0.0.1:8000), ``LOCAL_IMAGE_NAME`` (start the environment from this Docker image),
``LLM_TIMEOUT_S`` and ``LLM_MAX_RETRIES``. When no server answers at ``ENV_URL`` and no image
is given, a local server is started on a free port and stopped at the end.
"""

from tracefix_rl import models  # noqa: F401  (first: keeps gradio out of this process)

# isort: split

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from tracefix_rl.actions import ACTIONS, get_action
from tracefix_rl.client import TraceFixEnv
from tracefix_rl.models import ACTION_TYPES, TraceFixAction, TraceFixObservation
from tracefix_rl.procs import free_port, stop_process_group
from tracefix_rl.server import SERVER_MODULE
from tracefix_rl.settings import SettingsError, load_settings

REPO = Path(__file__).resolve().parent
BENCHMARK = "tracefix_rl"
DEFAULT_API_BASE_URL = "https://router.huggingface.co/v1"
DEFAULT_MODEL = "Qwen/Qwen2.5-72B-Instruct"
DEFAULT_ENV_URL = "http://127.0.0.1:8000"
DEFAULT_MAX_STEPS = 20
DEFAULT_BUDGET_S = 18 * 60
MAX_TOKENS = 1024
SCORE_FLOOR, SCORE_CEILING = 0.01, 0.99
HISTORY_TURNS = 6
SERVER_START_TIMEOUT_S = 120.0
SERVER_STOP_GRACE_S = 20.0
OUTPUT_CHARS = 1500
FALLBACK_ACTION = TraceFixAction(action_type="VIEW_CODE")


class AgentSettings(BaseSettings):
    """The agent's environment variables (the README's table under "Baseline agent"); unset
    or empty variables take the defaults."""

    model_config = SettingsConfigDict(case_sensitive=False, env_ignore_empty=True, extra="ignore")

    api_base_url: str = Field(
        default=DEFAULT_API_BASE_URL, description="OpenAI-compatible endpoint"
    )
    model_name: str = Field(default=DEFAULT_MODEL, description="model to evaluate")
    hf_token: str | None = Field(default=None, description="API key")
    api_key: str | None = Field(default=None, description="API key when HF_TOKEN is unset")
    env_url: str = Field(default=DEFAULT_ENV_URL, description="a running tracefix_rl server")
    local_image_name: str | None = Field(
        default=None, description="start the environment from this Docker image"
    )
    llm_timeout_s: float = Field(
        default=60.0, gt=0, allow_inf_nan=False, description="per-call timeout"
    )
    llm_max_retries: int = Field(
        default=3, ge=0, description="retries with backoff on 429/5xx/connection errors"
    )


THOUGHT_NOTE = ' Include a short "thought" field explaining your reasoning.'


def system_prompt() -> str:
    """The instructions: the reply format, then every action of the registry (an example
    of each form, then what it does)."""
    examples = "\n".join(
        json.dumps({"action_type": action.name, **example})
        for action in ACTIONS
        for example in action.examples
    )
    actions = "\n".join(f"- {action.name}: {action.description}" for action in ACTIONS)
    return (
        "You are fixing a buggy Python program in a debugging environment.\n"
        "Each turn you receive the task description (the spec), the current code with line "
        "numbers, and the result of your last action. Reply with exactly ONE action as a JSON "
        f"object:\n\n{examples}\n\nThe actions:\n{actions}\n\n"
        "Hidden tests grade the final code, so fix the bug for every input the spec allows, "
        "not just the visible tests. Run the tests before you submit."
    )


def _tool_property(schema: dict[str, Any]) -> dict[str, Any]:
    """One property of the wire schema as a tool parameter: an optional field's
    ``anyOf [X, null]`` becomes X (tool callers omit what they do not give)."""
    options = [o for o in schema.get("anyOf", [schema]) if o.get("type") != "null"]
    kept = options[0] if len(options) == 1 else {"anyOf": options}  # e.g. integer or string
    merged = {**kept, **{k: v for k, v in schema.items() if k == "description"}}
    return {k: v for k, v in merged.items() if k not in ("title", "default")}


def action_tool() -> dict[str, Any]:
    """The one tool offered to the model, ``act``, whose parameters are
    ``TraceFixAction``'s JSON schema (the wire contract) without ``metadata``."""
    schema = TraceFixAction.model_json_schema()
    properties = {
        name: _tool_property(prop)
        for name, prop in schema["properties"].items()
        if name != "metadata"
    }
    return {
        "type": "function",
        "function": {
            "name": "act",
            "description": "Take one action in the debugging environment.",
            "parameters": {
                "type": "object",
                "properties": properties,
                "required": schema.get("required", []),
                "additionalProperties": False,
            },
        },
    }


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def emit(line: str) -> None:
    print(line, flush=True)


def two_decimals(value: float) -> str:
    """``f"{value:.2f}"`` without a negative zero (-0.004 prints as 0.00)."""
    text = f"{value:.2f}"
    return "0.00" if text == "-0.00" else text


def one_line(text: str) -> str:
    return " ".join(str(text).split())


# -- parsing the model's reply ------------------------------------------------------------------


class ParseError(ValueError):
    """The model's reply holds no valid action."""


_FIELDS = set(TraceFixAction.model_fields) - {"metadata"}


def parse_action(text: str | None) -> TraceFixAction:
    """The first JSON object in ``text`` (code fences allowed) as a valid action."""
    if not text or not text.strip():
        raise ParseError("empty reply")
    for candidate in _json_objects(text):
        if isinstance(candidate, dict) and "action_type" in candidate:
            return action_from_dict(candidate)
    match = re.search(r"\b(" + "|".join(ACTION_TYPES) + r")\b", text)
    if match and not get_action(match.group(1)).Params.model_fields:  # needs no parameters
        return TraceFixAction(action_type=match.group(1))
    raise ParseError(f"no JSON action in reply: {one_line(text)[:120]}")


LINE_FIELDS = ("start_line", "end_line")


def action_from_dict(data: dict[str, Any]) -> TraceFixAction:
    """A valid action from a model's JSON object. Models often write line numbers as strings
    (``"5"``), which the server's strict JSON-integer fields refuse, so they are converted."""
    kept = {k: v for k, v in data.items() if k in _FIELDS}
    if isinstance(kept.get("action_type"), str):
        kept["action_type"] = kept["action_type"].strip().upper()
    for name in LINE_FIELDS:
        value = kept.get(name)
        if isinstance(value, str) and value.strip().isdigit():
            kept[name] = int(value.strip())
    try:
        return TraceFixAction(**kept)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ParseError(f"invalid action ({where}: {first['msg']})") from None


def _json_objects(text: str):
    """Yield every parseable ``{...}`` object in ``text``, outermost first."""
    decoder = json.JSONDecoder()
    for start, char in enumerate(text):
        if char == "{":
            try:
                value, _ = decoder.raw_decode(text[start:])
            except ValueError:
                continue
            yield value


# -- talking to the model -----------------------------------------------------------------------


class Model:
    """An OpenAI-compatible chat model; tool calling first, then JSON mode, then plain text."""

    def __init__(self, settings: AgentSettings, seed: int) -> None:
        self.name = settings.model_name
        self.seed = seed
        self.client = openai.OpenAI(
            base_url=settings.api_base_url,
            api_key=settings.hf_token or settings.api_key or "none",
            timeout=settings.llm_timeout_s,
            max_retries=settings.llm_max_retries,
        )
        self.modes = ["tools", "json", "text"]

    def act(self, messages: list[dict[str, Any]]) -> tuple[str, TraceFixAction | None, str | None]:
        """Ask for one action: (raw reply for the transcript, action or None, parse error)."""
        while True:
            mode = self.modes[0]
            try:
                reply = self._complete(messages, mode)
            except openai.BadRequestError as exc:
                if len(self.modes) > 1:
                    log(f"model rejected {mode} mode ({one_line(str(exc))[:160]}); falling back")
                    self.modes.pop(0)
                    continue
                raise
            message = reply.choices[0].message
            if message.tool_calls:
                raw = message.tool_calls[0].function.arguments or ""
                try:
                    return raw, action_from_dict(json.loads(raw)), None
                except (ValueError, ParseError) as exc:
                    return raw, None, f"unparsable tool call: {one_line(str(exc))[:160]}"
            raw = message.content or ""
            try:
                return raw, parse_action(raw), None
            except ParseError as exc:
                return raw, None, str(exc)

    def _complete(self, messages: list[dict[str, Any]], mode: str):
        extra: dict[str, Any] = {}
        if mode == "tools":
            extra["tools"] = [action_tool()]
            extra["tool_choice"] = {"type": "function", "function": {"name": "act"}}
        elif mode == "json":
            extra["response_format"] = {"type": "json_object"}
        return self.client.chat.completions.create(
            model=self.name,
            messages=messages,
            temperature=0,
            seed=self.seed,
            max_tokens=MAX_TOKENS,
            **extra,
        )


# -- rendering observations for the model -------------------------------------------------------


def render(obs: TraceFixObservation, first: bool) -> str:
    lines = [obs.code_dict[k] for k in sorted(obs.code_dict)]
    parts = []
    if first:
        parts.append(f"Task {obs.task_id} ({obs.difficulty}).\nSpec:\n{obs.description}")
    if obs.last_action_error:
        parts.append(f"Your last action was rejected: {obs.last_action_error}")
    parts.append(f"Result of the last action:\n{obs.last_execution_output[-OUTPUT_CHARS:]}")
    numbered = "\n".join(f"{n:4d} | {text}" for n, text in enumerate(lines, 1))
    parts.append(f"Code ({len(lines)} lines):\n{numbered}")
    if obs.syntax_error:
        parts.append("The code currently has a syntax error.")
    parts.append(
        f"Visible tests passing: {obs.tests_passed}/{obs.tests_total}. "
        f"Steps left: {obs.steps_remaining}. Reply with one JSON action."
    )
    return "\n\n".join(parts)


def describe_action(action: TraceFixAction) -> str:
    """Compact, single-token rendering for the [STEP] line (no spaces)."""
    kind = action.action_type
    if kind == "REPLACE_LINES":
        block = action.new_code_block or ""
        count = len(block.split("\n")) if block else 0
        return f"REPLACE_LINES({action.start_line}-{action.end_line},{count}_lines)"
    if kind == "VIEW_CODE" and action.start_line is not None:
        end = action.end_line if action.end_line is not None else ""
        return f"VIEW_CODE({action.start_line}-{end})"
    return kind


# -- environment lifecycle ----------------------------------------------------------------------


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


class Environment:
    """Where episodes run: ENV_URL, a Docker image, or a local server started for this run."""

    def __init__(self, env_url: str, image: str | None) -> None:
        self.url = env_url.rstrip("/")
        self._server: subprocess.Popen[bytes] | None = None
        self._provider: Any = None
        if image:
            self.url, self._provider = asyncio.run(_start_image(image))
            log(f"started {image} at {self.url}")
        elif not _healthy(self.url):
            self._start_local_server()

    def _start_local_server(self) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        handle_fd, name = tempfile.mkstemp(prefix="tracefix-inference-server-", suffix=".log")
        log_file = Path(name)
        log(f"no server at ENV_URL; starting one at {self.url} (log: {log_file})")
        with os.fdopen(handle_fd, "wb") as handle:
            self._server = subprocess.Popen(
                [sys.executable, "-m", SERVER_MODULE, "--host", "127.0.0.1", "--port", str(port)],
                cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "LOG_LEVEL": "WARNING"},
            )  # fmt: skip
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not _healthy(self.url):
            if self._server.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"local server did not start; see {log_file}")
            time.sleep(0.25)

    def tasks(self, difficulty: str) -> list[str]:
        """The curated tasks of one tier (the generated corpus is for training)."""
        params = {"difficulty": difficulty, "source": "curated", "limit": 1000}
        response = httpx.get(f"{self.url}/tasks", params=params, timeout=30)
        response.raise_for_status()
        return [row["task_id"] for row in response.json()["tasks"]]

    def session(self):
        return TraceFixEnv(base_url=self.url, message_timeout_s=300).sync()

    def close(self) -> None:
        if self._server is not None:
            stop_process_group(self._server, grace_s=SERVER_STOP_GRACE_S)
        if self._provider is not None:
            self._provider.stop_container()


async def _start_image(image: str) -> tuple[str, Any]:
    """Start the container through the client's ``from_docker_image``; keep its URL."""
    client = await TraceFixEnv.from_docker_image(image)
    url = client._ws_url.removesuffix("/ws").replace("ws://", "http://", 1)
    url = url.replace("wss://", "https://", 1)
    provider = client._provider
    await client.disconnect()
    return url, provider


# -- episodes -----------------------------------------------------------------------------------


@dataclass
class Episode:
    task_id: str
    seed: int
    rewards: list[float] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    score: float | None = None
    solved: bool = False
    error: str | None = None


def run_episode(episode: Episode, env: Environment, model: Model, args: argparse.Namespace,
                deadline: float) -> None:  # fmt: skip
    """Play one episode; prints [STEP] lines (the caller prints [START]/[END])."""
    system = system_prompt() + (THOUGHT_NOTE if args.thought else "")
    episode.messages.append({"role": "system", "content": system})
    with env.session() as session:
        result = session.reset(task_id=episode.task_id, seed=episode.seed,
                               max_steps=args.max_steps)  # fmt: skip
        obs = result.observation
        episode.messages.append({"role": "user", "content": render(obs, first=True)})
        step = 0
        while not result.done:
            if time.monotonic() > deadline:
                episode.error = "wall-clock budget exhausted"
                log(f"{episode.task_id}: stopping, wall-clock budget exhausted")
                break
            context = episode.messages[:2] + episode.messages[2:][-2 * HISTORY_TURNS :]
            raw, action, parse_error = model.act(context)
            if action is None:
                log(f"{episode.task_id}: could not parse the reply ({parse_error})")
                action = FALLBACK_ACTION
            if args.thought and action.thought:
                log(f"thought: {one_line(action.thought)}")
            episode.messages.append({"role": "assistant", "content": raw})
            result = session.step(action)
            step += 1
            obs = result.observation
            reward = float(result.reward or 0.0)
            episode.rewards.append(reward)
            episode.actions.append(action.model_dump(exclude={"metadata"}, exclude_none=True))
            error = parse_error or obs.last_action_error
            emit(
                f"[STEP] step={step} action={describe_action(action)} reward={reward:.2f} "
                f"done={str(result.done).lower()} error={one_line(error) if error else 'null'}"
            )
            episode.messages.append({"role": "user", "content": render(obs, first=False)})
        if result.done:
            episode.score = obs.score
            episode.solved = bool(obs.solved)


def benchmark_tasks() -> list[str]:
    manifest = yaml.safe_load((REPO / "openenv.yaml").read_text())
    return [entry["id"] for entry in manifest["tasks"]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run the baseline agent on tracefix_rl.")
    tier = parser.add_mutually_exclusive_group()
    for name in ("easy", "medium", "hard"):
        tier.add_argument(f"--{name}", dest="tier", action="store_const", const=name,
                          help=f"run every curated {name} task")  # fmt: skip
    parser.add_argument("--task", action="append", default=[], help="task id (repeatable)")
    parser.add_argument("--episodes", type=int, default=1, help="episodes per task")
    parser.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--thought", action="store_true", help="ask for and print thoughts")
    parser.add_argument("--trajectories", type=Path, help="write one JSON line per episode")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="wall-clock budget for the whole run")  # fmt: skip
    args = parser.parse_args(argv)
    if args.episodes < 1 or args.max_steps < 1:
        parser.error("--episodes and --max-steps must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = load_settings(model=AgentSettings)
    except SettingsError as exc:
        log(f"invalid configuration:\n{exc}")
        return 2
    model_name = settings.model_name
    model = Model(settings, args.seed)
    deadline = time.monotonic() + args.budget_s
    env: Environment | None = None
    env_error = "no environment"
    try:
        env = Environment(settings.env_url, settings.local_image_name)
    except Exception as exc:  # noqa: BLE001 - reported on every episode's [END]
        env_error = f"environment unavailable: {type(exc).__name__}: {one_line(str(exc))[:200]}"
        log(env_error)
    if args.tier and not args.task and env is None:
        log("cannot list the tasks of a tier without an environment")
        return 1
    trajectories = args.trajectories.open("w") if args.trajectories else None
    try:
        tasks = args.task or (env.tasks(args.tier) if args.tier and env else benchmark_tasks())
        runs = [task_id for task_id in tasks for _ in range(args.episodes)]
        for index, task_id in enumerate(runs):
            episode = Episode(task_id=task_id, seed=args.seed + index)
            emit(f"[START] task={task_id} env={BENCHMARK} model={model_name}")
            try:
                if env is None:
                    raise RuntimeError(env_error)
                if time.monotonic() > deadline:
                    raise RuntimeError("wall-clock budget exhausted before this episode")
                run_episode(episode, env, model, args, deadline)
            except Exception as exc:  # noqa: BLE001 - every failure still ends with [END]
                episode.error = f"{type(exc).__name__}: {one_line(str(exc))[:300]}"
                log(f"{task_id}: episode failed: {episode.error}")
            score = min(max(episode.score or 0.0, SCORE_FLOOR), SCORE_CEILING)
            rewards = ",".join(two_decimals(r) for r in episode.rewards)
            emit(
                f"[END] success={str(episode.solved).lower()} steps={len(episode.rewards)} "
                f"score={score:.3f} rewards={rewards}"
            )
            if trajectories:
                trajectories.write(json.dumps({
                    "task": task_id, "model": model_name, "seed": episode.seed,
                    "messages": episode.messages, "actions": episode.actions,
                    "rewards": episode.rewards, "score": episode.score,
                    "solved": episode.solved, "error": episode.error,
                }) + "\n")  # fmt: skip
                trajectories.flush()
    finally:
        if trajectories:
            trajectories.close()
        if env is not None:
            env.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
