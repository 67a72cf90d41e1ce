"""Baseline agent: evaluates an OpenAI-compatible model on the tracefix_rl gym.

    python inference.py                 # the benchmark set (the tasks listed in openenv.yaml)
    python inference.py --medium        # every medium task
    python inference.py --task ID --episodes 3 --trajectories runs.jsonl

stdout carries exactly these lines, each flushed (everything else goes to stderr):

    [START] task=<task_id> env=tracefix_rl model=<MODEL_NAME>
    [STEP] step=<n> action=<action> reward=<r:.2f> done=<true|false> error=<msg|null>
    [END] success=<true|false> steps=<n> score=<s:.3f> rewards=<r1,r2,...>

``score`` is the episode's normalised gain (the observation's ``gain``: 0 for code no better
than the buggy original, 1 when solved), clamped into [0.01, 0.99]. Every ``[START]`` gets its
``[END]``, also on SIGINT or SIGTERM: the episode in progress ends, a self-started environment
server is stopped, and the exit status is 130 or 143. The status is 1 when every episode
failed with an error (e.g. the LLM endpoint is unreachable), 2 for a bad variable, else 0.

The environment variables are :class:`AgentSettings`' fields (``--help`` lists them with
their defaults). When no server answers at ``ENV_URL`` and no image is given, a local server
is started on a free port and stopped at the end.
"""

from tracefix_rl import models  # noqa: F401  (first: keeps gradio out of this process)

# isort: split

import argparse
import ast
import asyncio
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tokenize
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import openai
import yaml
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from tracefix_rl.actions import ACTIONS
from tracefix_rl.client import TraceFixEnv
from tracefix_rl.episode.render import clip_output
from tracefix_rl.models import TraceFixAction, TraceFixObservation
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
DEFAULT_MAX_TOKENS = 2048  # a whole-file rewrite of the largest hard task is ~1,000 tokens
DEFAULT_CONTEXT_TOKENS = 8192
SCORE_FLOOR, SCORE_CEILING = 0.01, 0.99
SERVER_START_TIMEOUT_S = 120.0
SERVER_STOP_GRACE_S = 20.0
ENDPOINT_CHECK_TIMEOUT_S = 10.0
FALLBACK_ACTION = TraceFixAction(action_type="VIEW_CODE")

EXIT_OK, EXIT_ALL_FAILED, EXIT_BAD_CONFIG = 0, 1, 2
SIGNAL_EXIT_BASE = 128  # exit status 128 + signal number: 130 for SIGINT, 143 for SIGTERM


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
        default=3,
        ge=0,
        description="retries of one LLM call on timeouts, connection errors, 408/409/429 and "
        "5xx, with exponential backoff, within --budget-s",
    )
    llm_retry_backoff_s: float = Field(
        default=2.0,
        ge=0,
        allow_inf_nan=False,
        description="delay before the first retry; it doubles at each retry (at most 30 s)",
    )
    llm_max_tokens: int = Field(
        default=DEFAULT_MAX_TOKENS,
        ge=16,
        description="max_tokens of each reply; a reply cut off there is reported to the model",
    )
    llm_context_tokens: int = Field(
        default=DEFAULT_CONTEXT_TOKENS,
        ge=256,
        description="the model's context window: prompts are kept within it minus "
        "LLM_MAX_TOKENS (estimated at 3 characters a token), and trimmed further when the "
        "server says a prompt is too long",
    )


MAX_BACKOFF_S = 30.0


def settings_help() -> str:
    """``--help``'s list of the environment variables, with their defaults."""
    rows = ["environment variables (unset or empty: the default):"]
    for name, info in AgentSettings.model_fields.items():
        default = "unset" if info.default is None else info.default
        rows.append(f"  {name.upper():<20} {info.description} (default: {default})")
    return "\n".join(rows)


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
        "The first message gives the task description (the spec). Each turn you receive the "
        "result of your last action, and the latest message shows the current code with line "
        "numbers (earlier turns are summarised). Reply with exactly ONE action as a JSON "
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
    """One line of progress on stderr (stdout is the transcript)."""
    print(message, file=sys.stderr, flush=True)


def emit(line: str) -> None:
    """One transcript line on stdout, flushed."""
    print(line, flush=True)


def two_decimals(value: float) -> str:
    """``f"{value:.2f}"`` without a negative zero (-0.004 prints as 0.00)."""
    text = f"{value:.2f}"
    return "0.00" if text == "-0.00" else text


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines too) made one space."""
    return " ".join(str(text).split())


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, marked with "…" when cut."""
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"


# -- parsing the model's reply ------------------------------------------------------------------


class ParseError(ValueError):
    """The model's reply holds no valid action; the message says what could not be read."""


_FIELDS = set(TraceFixAction.model_fields) - {"metadata"}
_LENIENT_JSON = json.JSONDecoder(strict=False)  # literal newlines and tabs inside strings
QUOTED_CHARS = 120  # how much of an unreadable reply an error quotes
LINE_FIELDS = ("start_line", "end_line")


def parse_action(text: str | None) -> TraceFixAction:
    """The first object in ``text`` that names an ``action_type``, as a valid action.

    Accepted forms: JSON (code fences and prose around it allowed, literal newlines inside
    strings allowed), a Python dict literal (single quotes, ``True``/``None``, trailing
    commas), and a JSON object whose closing braces alone were cut off. A bare action name in
    prose is never taken for an action. ``ParseError`` says what could not be read."""
    if not text or not text.strip():
        raise ParseError("empty reply")
    problem: str | None = None
    for value, why in _objects(text):
        if isinstance(value, dict) and "action_type" in value:
            return action_from_dict(value)
        problem = problem or why
    if problem:
        raise ParseError(problem)
    if any(isinstance(v, dict) for v, _ in _objects(text)):
        raise ParseError(f"JSON object without action_type in reply: {_quote(text)}")
    raise ParseError(f"no JSON action in reply: {_quote(text)}")


def parse_arguments(raw: str) -> TraceFixAction:
    """A tool call's ``arguments`` as an action, read as leniently as :func:`parse_action`."""
    if not raw.strip():
        raise ParseError("empty tool-call arguments")
    try:
        value = _LENIENT_JSON.decode(raw)
    except ValueError:
        return parse_action(raw)
    if not isinstance(value, dict):
        raise ParseError(f"tool-call arguments are not an object: {_quote(raw)}")
    return action_from_dict(value)


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


def _quote(text: str) -> str:
    return clip(one_line(text), QUOTED_CHARS)


def _objects(text: str) -> Iterator[tuple[Any, str | None]]:
    """For every ``{`` in ``text`` (outermost first): the value read from there, or None and
    why it could not be read (None, None when there is nothing worth reporting)."""
    for start, char in enumerate(text):
        if char == "{":
            yield _read_object(text, start)


def _read_object(text: str, start: int) -> tuple[Any, str | None]:
    """The object at ``text[start]`` as JSON, else as a Python literal, else as JSON whose
    closing braces were cut off; or None and why not (only where ``action_type`` follows)."""
    try:
        return _LENIENT_JSON.raw_decode(text, start)[0], None
    except json.JSONDecodeError as exc:
        json_error = exc
    end = _python_extent(text, start)
    if end is not None:
        with contextlib.suppress(ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return ast.literal_eval(text[start:end]), None
    elif (closed := _close_braces(text[start:])) is not None:
        return closed, None
    if "action_type" not in text[start:]:
        return None, None
    if end is None:
        return None, "the reply ends inside its JSON action (no closing brace: cut off?)"
    where = f"line {json_error.lineno} column {json_error.colno}"
    return None, f"unreadable JSON action ({json_error.msg} at {where} of the reply)"


def _python_extent(text: str, start: int) -> int | None:
    """The index just past the brace that closes ``text[start]``, read as Python tokens
    (strings in either quote style, triple-quoted too); None when the text ends first."""
    source = text[start:]
    offsets = [0]  # where each line starts, split as the tokenizer reads them (at "\n")
    for line in io.StringIO(source).readlines():
        offsets.append(offsets[-1] + len(line))
    depth = 0
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.OP and token.string in "([{":
                depth += 1
            elif token.type == tokenize.OP and token.string in ")]}":
                depth -= 1
                if depth == 0:
                    row, col = token.end
                    return start + offsets[row - 1] + col
    except (tokenize.TokenError, SyntaxError):
        return None
    return None


def _close_braces(fragment: str) -> Any:
    """A JSON object that is complete but for its final closing braces (a cut-off reply),
    or None. Only whole values count: a string or number that was cut is never completed."""
    body = fragment.rstrip().rstrip(",")
    if not body or body[-1] not in '"]}el':  # a complete string, list, object, literal
        return None
    for missing in range(1, 4):
        try:
            value = _LENIENT_JSON.decode(body + "}" * missing)
        except ValueError:
            continue
        return value if isinstance(value, dict) else None
    return None


# -- talking to the model -----------------------------------------------------------------------


class LLMUnavailable(RuntimeError):
    """The model's endpoint kept failing (timeouts, connection errors, 5xx) after the
    retries, or the run's budget left no time for another try."""


class PromptTooLong(RuntimeError):
    """The server said the prompt is too long, and it cannot be made any shorter."""


CHARS_PER_TOKEN = 3  # a conservative estimate for code and JSON
MESSAGE_OVERHEAD_CHARS = 16  # the chat template's tokens around each message
CONTEXT_SHRINK = 0.9  # a prompt the server refused is rebuilt at most this large
CONTEXT_SAFETY = 0.9  # of the ratio the server's error gives (context / requested)
MIN_SHRINK = 0.2
CONTEXT_RETRIES = 5  # rebuilds after "prompt too long" within one call
MIN_MAX_TOKENS = 256
RETRYABLE_STATUS = frozenset({408, 409, 429})  # and every 5xx
PAYLOAD_TOO_LARGE = 413
REJECTED_STATUS = frozenset({400, PAYLOAD_TOO_LARGE, 422})  # requests the server refused

_CONTEXT_ERROR = re.compile(
    r"context[ _](length|window|size)|maximum context|exceed_context_size|context_length_exceeded"
    r"|exceeds? the (available )?context|too many tokens|prompt is too long|input is too long"
    r"|requested \d+ tokens|reduce the length|n_ctx",
    re.IGNORECASE,
)
_MODE_ERROR = {
    "tools": re.compile(r"\btools?\b|tool_choice|tool[ _]call|function[ _]?call|--jinja", re.I),
    "json": re.compile(
        r"response_format|response format|json_object|json[ _]mode|json_schema", re.I
    ),  # fmt: skip
}
_MAX_TOKENS_ERROR = re.compile(r"max_tokens|max_completion_tokens|n_predict", re.IGNORECASE)
_CONTEXT_NUMBERS = (  # (pattern, group of the window, group of the request, request has max_tokens)
    (re.compile(r"maximum context length is (\d+).*?requested (\d+)", re.I | re.S), 1, 2, True),
    (re.compile(r"requested tokens \((\d+)\) exceed context window of (\d+)", re.I), 2, 1, True),
    (re.compile(r"n_prompt_tokens\D{0,4}(\d+).{0,80}?n_ctx\D{0,4}(\d+)", re.I | re.S), 2, 1, False),
)


def classify_rejection(text: str, mode: str) -> str:
    """Why the server refused a request (a 400, 413 or 422 whose message is ``text``), sent
    in ``mode``: ``context`` (the prompt is too long), ``max_tokens``, ``mode`` (it does not
    support tool calling or ``response_format``), or ``other``."""
    if _CONTEXT_ERROR.search(text):
        return "context"
    if _MAX_TOKENS_ERROR.search(text):
        return "max_tokens"
    pattern = _MODE_ERROR.get(mode)
    if pattern is not None and pattern.search(text):
        return "mode"
    return "other"


def context_shrink(text: str, max_tokens: int = 0) -> float:
    """How much smaller to make a prompt the server found too long, from the numbers its
    message gives: the share of the request's prompt tokens that fit in the window (the
    completion's ``max_tokens`` set aside where the request counts it), less a margin; else
    ``CONTEXT_SHRINK``. Within [MIN_SHRINK, CONTEXT_SHRINK]."""
    for pattern, window_at, requested_at, with_completion in _CONTEXT_NUMBERS:
        if match := pattern.search(text):
            window, requested = int(match.group(window_at)), int(match.group(requested_at))
            if with_completion and window > max_tokens:
                window, requested = window - max_tokens, requested - max_tokens
            if requested > 0:
                share = CONTEXT_SAFETY * window / requested
                return max(MIN_SHRINK, min(CONTEXT_SHRINK, share))
    return CONTEXT_SHRINK


def prompt_chars(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int:
    """The size of a request's prompt in characters: every message (with the chat
    template's overhead) and the tool schema."""
    size = sum(len(str(m.get("content") or "")) + MESSAGE_OVERHEAD_CHARS for m in messages)
    return size + (len(json.dumps(tools)) if tools else 0)


def _retryable(exc: Exception) -> bool:
    if isinstance(exc, openai.APIConnectionError):  # APITimeoutError is one
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in RETRYABLE_STATUS or exc.status_code >= 500
    return False


def _error_text(exc: Exception) -> str:
    return one_line(f"{type(exc).__name__}: {exc}")


@dataclass
class Reply:
    """One answer of the model: its raw text (the tool call's arguments, or the content), the
    action it holds (None when it holds none), why not, and whether it was cut off at
    ``max_tokens`` (``finish_reason == "length"``)."""

    raw: str
    action: TraceFixAction | None
    error: str | None
    cut_off: bool = False


PromptBuilder = Callable[[int], list[dict[str, Any]]]
"""Builds the messages of a request within a size budget in characters."""


class Model:
    """An OpenAI-compatible chat model: tool calling first, then JSON mode, then plain text
    (a mode is given up only when the server says it does not support it); prompts within
    the context window; retries on transient failures."""

    def __init__(self, settings: AgentSettings, seed: int) -> None:
        self.name = settings.model_name
        self.url = settings.api_base_url
        self.seed = seed
        self.timeout_s = settings.llm_timeout_s
        self.max_retries = settings.llm_max_retries
        self.backoff_s = settings.llm_retry_backoff_s
        self.max_tokens = settings.llm_max_tokens
        context_chars = settings.llm_context_tokens * CHARS_PER_TOKEN
        self.budget_chars = max(0, context_chars - self.max_tokens * CHARS_PER_TOKEN)
        self.largest_accepted = 0  # chars: the longest prompt the server has answered
        self.client = openai.OpenAI(
            base_url=settings.api_base_url,
            api_key=settings.hf_token or settings.api_key or "none",
            timeout=settings.llm_timeout_s,
            max_retries=0,  # retried here, within the run's budget
        )
        self.modes = ["tools", "json", "text"]

    def act(self, build: PromptBuilder, deadline: float) -> Reply:
        """Ask for one action with the prompt ``build`` makes within the budget. Raises
        ``LLMUnavailable``, ``PromptTooLong`` or the server's refusal (``openai.APIStatusError``)
        when no reply can be had."""
        shrinks = 0
        while True:
            mode = self.modes[0]
            tools = [action_tool()] if mode == "tools" else None
            overhead = prompt_chars([], tools)
            messages = build(max(0, self.budget_chars - overhead))
            size = prompt_chars(messages, tools)
            try:
                completion = self._complete(messages, mode, tools, deadline)
            except openai.APIStatusError as exc:
                if exc.status_code not in REJECTED_STATUS:
                    raise
                text = _error_text(exc)
                too_large = exc.status_code == PAYLOAD_TOO_LARGE
                why = "context" if too_large else classify_rejection(text, mode)
                if why == "mode" and len(self.modes) > 1:
                    log(f"model rejected {mode} mode ({clip(text, 160)}); falling back")
                    self.modes.pop(0)
                    continue
                if why not in ("context", "max_tokens") or shrinks >= CONTEXT_RETRIES:
                    raise
                shrinks += 1
                self._shrink(why, size, text)
                continue
            self.largest_accepted = max(self.largest_accepted, size)
            return self._read(completion)

    def _shrink(self, why: str, size: int, text: str) -> None:
        """After a "too long" refusal of a prompt of ``size`` characters: a smaller prompt
        budget, never below the longest prompt the server answered (or, when the prompt is
        as small as it gets, fewer ``max_tokens``)."""
        if why == "context" and size <= self.budget_chars:  # it can be built smaller
            if self.largest_accepted >= size:  # the server's limit changed: start afresh
                self.largest_accepted = 0
            budget = max(int(size * context_shrink(text, self.max_tokens)), self.largest_accepted)
            log(f"prompt too long for the model ({size} chars: {clip(text, 160)}); "
                f"trimming the history to {budget} chars and retrying")  # fmt: skip
            self.budget_chars = budget
            return
        if self.max_tokens > MIN_MAX_TOKENS:
            self.max_tokens = max(MIN_MAX_TOKENS, self.max_tokens // 2)
            log(f"request too long for the model ({clip(text, 160)}); max_tokens lowered "
                f"to {self.max_tokens}")  # fmt: skip
            return
        raise PromptTooLong(
            f"the model's context is too small for this prompt ({size} chars) even with no "
            f"history: {clip(text, 200)}"
        )

    def _complete(self, messages: list[dict[str, Any]], mode: str,
                  tools: list[dict[str, Any]] | None, deadline: float) -> Any:  # fmt: skip
        """One chat completion, retried with backoff on timeouts, connection errors,
        408/409/429 and 5xx, up to ``max_retries`` times and within ``deadline``."""
        extra: dict[str, Any] = {}
        if tools:
            extra["tools"] = tools
            extra["tool_choice"] = {"type": "function", "function": {"name": "act"}}
        elif mode == "json":
            extra["response_format"] = {"type": "json_object"}
        delay = self.backoff_s
        attempt = 0
        while True:
            left = deadline - time.monotonic()
            try:
                return self.client.chat.completions.create(
                    model=self.name,
                    messages=messages,
                    temperature=0,
                    seed=self.seed,
                    max_tokens=self.max_tokens,
                    timeout=max(1.0, min(self.timeout_s, left)),
                    **extra,
                )
            except openai.APIError as exc:
                if not _retryable(exc):
                    raise
                problem = f"{_error_text(exc)} (at {self.url})"
                if attempt >= self.max_retries:
                    raise LLMUnavailable(f"{problem}; {attempt + 1} attempts failed") from None
                if time.monotonic() + delay >= deadline:
                    raise LLMUnavailable(f"{problem}; no time left to retry") from None
                attempt += 1
                log(f"LLM call failed: {problem}; retry {attempt}/{self.max_retries} in "
                    f"{delay:.1f} s")  # fmt: skip
                time.sleep(delay)
                delay = min(MAX_BACKOFF_S, delay * 2)

    def _read(self, completion: Any) -> Reply:
        """The reply of a completion: the tool call's arguments, else the content."""
        if not completion.choices:
            return Reply("", None, "the server answered with no choices")
        choice = completion.choices[0]
        message = choice.message
        cut_off = choice.finish_reason == "length"
        if message.tool_calls:
            raw, parse = message.tool_calls[0].function.arguments or "", parse_arguments
        else:
            raw, parse = message.content or "", parse_action
        try:
            return Reply(raw, parse(raw), None, cut_off)
        except ParseError as exc:
            error = str(exc)
        if cut_off:
            error = f"reply cut off at max_tokens={self.max_tokens} (LLM_MAX_TOKENS): {error}"
        return Reply(raw, None, error, cut_off)


def check_endpoint(base_url: str, timeout_s: float) -> str | None:
    """None when ``GET {base_url}/models`` gets any HTTP answer (whatever its status: the
    endpoint is reachable); else why not, naming the URL."""
    url = f"{base_url.rstrip('/')}/models"
    try:
        httpx.get(url, timeout=min(timeout_s, ENDPOINT_CHECK_TIMEOUT_S))
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        return f"LLM endpoint unreachable at {url}: {type(exc).__name__}: {one_line(str(exc))}"
    return None


# -- what the model is shown --------------------------------------------------------------------

HISTORY_TURNS = 6  # earlier steps shown as turns, at most
OUTPUT_CHARS = 1500  # of the last action's output in the latest message
SHORT_OUTPUT_CHARS = 400  # when the budget is tight
SUMMARY_CHARS = 300  # of an earlier step's output
OLD_REPLY_CHARS = 600  # an earlier reply longer than this is shown compacted
OLD_BLOCK_CHARS = 200  # a longer new_code_block of an earlier reply is left out
OMITTED_NAMES = 30  # steps named in the "not shown" note, at most
EMPTY_REPLY = "(empty reply)"  # an assistant message is never empty


def tests_line(obs: TraceFixObservation) -> str:
    """The visible tests' status: "not run yet" before the first run, else the last run's."""
    if not obs.test_results:
        return "Visible tests passing: not run yet."
    return f"Visible tests passing: {obs.tests_passed}/{obs.tests_total} (last run)."


def render(obs: TraceFixObservation, notice: str | None = None,
           output_chars: int = OUTPUT_CHARS) -> str:  # fmt: skip
    """The latest observation in full: the note about the last reply, the rejection, the
    last action's output (head and tail, ``output_chars`` at most), the whole code with line
    numbers."""
    lines = [obs.code_dict[k] for k in sorted(obs.code_dict)]
    parts = []
    if notice:
        parts.append(notice)
    if obs.last_action_error:
        parts.append(f"Your last action was rejected: {obs.last_action_error}")
    output = obs.last_execution_output
    if output_chars > 0 and output:
        parts.append(f"Result of the last action:\n{clip_output(output, output_chars)}")
    numbered = "\n".join(f"{n:4d} | {text}" for n, text in enumerate(lines, 1))
    parts.append(f"Code ({len(lines)} lines):\n{numbered}")
    if obs.syntax_error:
        parts.append("The code currently has a syntax error.")
    parts.append(f"{tests_line(obs)} Steps left: {obs.steps_remaining}. "
                 "Reply with one JSON action.")  # fmt: skip
    return "\n\n".join(parts)


def summarize(obs: TraceFixObservation, notice: str | None = None) -> str:
    """An earlier observation in brief (no code): the note, the rejection, the start of the
    output, the tests."""
    parts = []
    if notice:
        parts.append(notice)
    if obs.last_action_error:
        parts.append(f"Rejected: {clip(one_line(obs.last_action_error), SUMMARY_CHARS)}")
    if obs.last_execution_output:
        parts.append(f"Result: {clip(obs.last_execution_output.strip(), SUMMARY_CHARS)}")
    parts.append(f"{tests_line(obs)} (Code not repeated: the latest message shows it.)")
    return "\n".join(parts)


def feedback(reply: Reply, max_tokens: int) -> str | None:
    """What the next message tells the model about its reply: that it held no action and
    why (a VIEW_CODE was done instead), or that it was cut off at the token limit."""
    if reply.action is None:
        return (
            f"Your last reply was not a valid action ({reply.error}), so VIEW_CODE was done "
            'instead. Reply with exactly one JSON object, e.g. {"action_type": "RUN_TESTS"}.'
        )
    if reply.cut_off:
        return (
            f"Your last reply was cut off at the {max_tokens}-token limit (its action was "
            "still read). Keep replies short: replace only the lines that change."
        )
    return None


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


@dataclass
class Turn:
    """One step as the model sees it again: its reply, the action sent, whether the reply
    held that action, and the observation after it in brief."""

    reply: str
    action: TraceFixAction
    parsed: bool
    summary: str

    def shown(self) -> str:
        """The reply as the last turn shows it: whole ("(empty reply)" for none)."""
        return self.reply if self.reply.strip() else EMPTY_REPLY

    def compact(self) -> str:
        """The reply as an earlier turn shows it: whole when short, else the action with a
        long ``new_code_block`` left out (the latest message shows the code)."""
        if len(self.reply) <= OLD_REPLY_CHARS:
            return self.shown()
        if not self.parsed:
            return clip(self.reply, OLD_REPLY_CHARS)
        data = self.action.model_dump(exclude={"metadata", "thought"}, exclude_none=True)
        block = data.get("new_code_block")
        if isinstance(block, str) and len(block) > OLD_BLOCK_CHARS:
            data["new_code_block"] = f"... ({len(block.splitlines())} lines, left out here)"
        return json.dumps(data)


class Conversation:
    """What the model is shown: the system prompt, the task, the recent turns (replies and
    brief results, at most ``HISTORY_TURNS``), and the latest observation in full: the only
    message with the code. :meth:`messages` fits it into a size budget."""

    def __init__(self, system: str, obs: TraceFixObservation) -> None:
        self.system = system
        self.header = f"Task {obs.task_id} ({obs.difficulty}).\nSpec:\n{obs.description}"
        self.turns: list[Turn] = []
        self.latest = obs
        self.notice: str | None = None

    def record(self, reply: Reply, action: TraceFixAction, obs: TraceFixObservation,
               notice: str | None) -> None:  # fmt: skip
        """Add a step: the model's ``reply``, the ``action`` sent, the observation after it,
        and the note for the model about its reply."""
        summary = summarize(obs, notice)
        self.turns.append(Turn(reply.raw, action, reply.action is not None, summary))
        self.latest, self.notice = obs, notice

    def first_message(self) -> str:
        """The first user message: the task, then the first observation in full."""
        return f"{self.header}\n\n{self.latest_text()}"

    def latest_text(self, output_chars: int = OUTPUT_CHARS) -> str:
        """The latest observation in full (see :func:`render`)."""
        return render(self.latest, self.notice, output_chars)

    def messages(self, budget: int) -> list[dict[str, Any]]:
        """The richest prompt within ``budget`` characters (as :func:`prompt_chars` counts
        them): older turns go first, then the last reply's code, then the output; the
        smallest form when none fits."""
        candidate: list[dict[str, Any]] = []
        for output_chars in (OUTPUT_CHARS, SHORT_OUTPUT_CHARS, 0):
            latest = self.latest_text(output_chars)
            for candidate in self._forms(latest):
                if prompt_chars(candidate, None) <= budget:
                    return candidate
        return candidate

    def _forms(self, latest: str) -> Iterator[list[dict[str, Any]]]:
        """The prompt's forms, from the longest to the shortest."""
        if not self.turns:
            yield self._assemble(latest, [], None, 0)
            return
        last = self.turns[-1]
        for keep in range(min(len(self.turns) - 1, HISTORY_TURNS - 1), -1, -1):
            older = self.turns[len(self.turns) - 1 - keep : -1]
            omitted = len(self.turns) - 1 - keep
            yield self._assemble(latest, older, last.shown(), omitted)
        yield self._assemble(latest, [], last.compact(), len(self.turns) - 1)
        yield self._assemble(latest, [], None, len(self.turns))

    def _assemble(self, latest: str, older: list[Turn], last_reply: str | None,
                  omitted: int) -> list[dict[str, Any]]:  # fmt: skip
        """system, the task (with a note naming ``omitted`` earlier steps), the ``older``
        turns, the last reply and the latest observation; with no last reply, the latest
        observation joins the task message (roles alternate user/assistant)."""
        header = self.header
        if omitted:
            names = [describe_action(t.action) for t in self.turns[:omitted]][-OMITTED_NAMES:]
            header += f"\n\n({omitted} earlier steps are not shown: {', '.join(names)}.)"
        messages = [{"role": "system", "content": self.system}]
        if last_reply is None:
            messages.append({"role": "user", "content": f"{header}\n\n{latest}"})
            return messages
        messages.append({"role": "user", "content": header})
        for turn in older:
            messages.append({"role": "assistant", "content": turn.compact()})
            messages.append({"role": "user", "content": turn.summary})
        messages.append({"role": "assistant", "content": last_reply})
        messages.append({"role": "user", "content": latest})
        return messages


def clamp_view(action: TraceFixAction, line_count: int) -> TraceFixAction:
    """A VIEW_CODE whose ``end_line`` lies past the end of the file shows up to its last
    line (the environment rejects such a range); any other action is returned as it is."""
    if (action.action_type == "VIEW_CODE" and action.end_line is not None
            and line_count and action.end_line > line_count
            and (action.start_line or 1) <= line_count):  # fmt: skip
        return action.model_copy(update={"end_line": line_count})
    return action


# -- environment lifecycle ----------------------------------------------------------------------


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


class Environment:
    """Where episodes run: ENV_URL, a Docker image, or a local server started for this run
    (in a process group of its own, stopped by :meth:`close`)."""

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
        with os.fdopen(handle_fd, "wb") as handle:
            self._server = subprocess.Popen(
                [sys.executable, "-m", SERVER_MODULE, "--host", "127.0.0.1", "--port", str(port)],
                cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "LOG_LEVEL": "WARNING"},
            )  # fmt: skip
        log(f"no server at ENV_URL; starting one at {self.url} (pid {self._server.pid}, "
            f"log: {log_file})")  # fmt: skip
        try:
            deadline = time.monotonic() + SERVER_START_TIMEOUT_S
            while not _healthy(self.url):
                if self._server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"local server did not start; see {log_file}")
                time.sleep(0.25)
        except BaseException:  # a signal too: never leave the server behind
            self.close()
            raise

    def tasks(self, difficulty: str) -> list[str]:
        """The curated tasks of one tier (the generated corpus is for training)."""
        params = {"difficulty": difficulty, "source": "curated", "limit": 1000}
        response = httpx.get(f"{self.url}/tasks", params=params, timeout=30)
        response.raise_for_status()
        return [row["task_id"] for row in response.json()["tasks"]]

    def session(self):
        return TraceFixEnv(base_url=self.url, message_timeout_s=300).sync()

    def close(self) -> None:
        """Stop what this run started: the local server's process group, or the container."""
        if self._server is not None:
            stop_process_group(self._server, grace_s=SERVER_STOP_GRACE_S)
        if self._provider is not None:
            self._provider.stop_container()
            self._provider = None


async def _start_image(image: str) -> tuple[str, Any]:
    """Start the container through the client's ``from_docker_image``; keep its URL."""
    client = await TraceFixEnv.from_docker_image(image)
    url = client._ws_url.removesuffix("/ws").replace("ws://", "http://", 1)
    url = url.replace("wss://", "https://", 1)
    provider = client._provider
    await client.disconnect()
    return url, provider


# -- signals ------------------------------------------------------------------------------------


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived (a BaseException, like KeyboardInterrupt, so that no
    ``except Exception`` takes it for an episode's failure)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """SIGINT and SIGTERM as :class:`Interrupted`, raised at most once, in the main thread,
    and only inside :meth:`armed` sections (waiting on the model or the environment) and
    outside :meth:`shielded` ones (a [STEP] line and its record). A signal that arrives
    elsewhere (while [START] or [END] is written, during cleanup) is only recorded:
    :attr:`pending` tells the caller, and the next armed section raises it at its start.
    Once raised, later signals are only logged, so cleanup runs to its end."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._raised = False
        self._armed = 0
        self._shielded = 0
        self._previous: dict[int, Any] = {}

    @property
    def pending(self) -> bool:
        """A signal arrived: stop after the episode in progress."""
        return self.signum is not None

    def install(self) -> None:
        """Take over SIGINT and SIGTERM (from the main thread only; elsewhere it does
        nothing)."""
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        """Give SIGINT and SIGTERM back their previous handlers."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            log(f"received {name}: ending the episode in progress, then stopping")
        else:
            log(f"received {name} again; still stopping")
        self._raise_pending()

    def _raise_pending(self) -> None:
        if self.signum is not None and not self._raised and self._armed and not self._shielded:
            self._raised = True
            raise Interrupted(self.signum)

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        """A section a signal interrupts (at once, or at its start if one is pending)."""
        self._armed += 1
        try:
            self._raise_pending()
            yield
        finally:
            self._armed -= 1

    @contextlib.contextmanager
    def shielded(self) -> Iterator[None]:
        """A section inside an armed one that no signal interrupts; one that arrived
        meanwhile is raised at its end."""
        self._shielded += 1
        try:
            yield
        finally:
            self._shielded -= 1
        self._raise_pending()


# -- episodes -----------------------------------------------------------------------------------


@dataclass
class Episode:
    """One episode's record: what the transcript and the trajectories file report.
    ``messages`` is the whole conversation (every observation in full), ``score`` the raw
    pass fraction over all tests and ``gain`` the normalised gain (both set when done)."""

    task_id: str
    seed: int
    rewards: list[float] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    score: float | None = None
    gain: float | None = None
    solved: bool = False
    error: str | None = None

    def end_score(self) -> float:
        """``[END]``'s score: the gain clamped into [SCORE_FLOOR, SCORE_CEILING] (the floor
        when the episode did not end)."""
        return min(max(self.gain or 0.0, SCORE_FLOOR), SCORE_CEILING)


def run_episode(episode: Episode, env: Environment, model: Model, args: argparse.Namespace,
                deadline: float, stop: StopSignals) -> None:  # fmt: skip
    """Play one episode; prints [STEP] lines (the caller prints [START]/[END])."""
    system = system_prompt() + (THOUGHT_NOTE if args.thought else "")
    with env.session() as session:
        result = session.reset(task_id=episode.task_id, seed=episode.seed,
                               max_steps=args.max_steps)  # fmt: skip
        obs = result.observation
        conversation = Conversation(system, obs)
        episode.messages.append({"role": "system", "content": system})
        episode.messages.append({"role": "user", "content": conversation.first_message()})
        step = 0
        while not result.done:
            if time.monotonic() > deadline:
                episode.error = "wall-clock budget exhausted"
                log(f"{episode.task_id}: stopping, wall-clock budget exhausted")
                break
            reply = model.act(conversation.messages, deadline)
            if reply.cut_off:
                log(f"{episode.task_id}: reply cut off at max_tokens={model.max_tokens} "
                    "(finish_reason=length; raise LLM_MAX_TOKENS)")  # fmt: skip
            if reply.action is None:
                log(f"{episode.task_id}: could not parse the reply ({reply.error})")
            action = clamp_view(reply.action or FALLBACK_ACTION, len(obs.code_dict))
            if args.thought and action.thought:
                log(f"thought: {one_line(action.thought)}")
            result = session.step(action)
            obs = result.observation
            notice = feedback(reply, model.max_tokens)
            with stop.shielded():  # the step, its [STEP] line and its record go together
                step += 1
                reward = float(result.reward or 0.0)
                episode.rewards.append(reward)
                episode.actions.append(action.model_dump(exclude={"metadata"}, exclude_none=True))
                error = reply.error or obs.last_action_error
                emit(
                    f"[STEP] step={step} action={describe_action(action)} reward={reward:.2f} "
                    f"done={str(result.done).lower()} error={one_line(error) if error else 'null'}"
                )
                conversation.record(reply, action, obs, notice)
                episode.messages.append({"role": "assistant", "content": reply.raw})
                episode.messages.append({"role": "user", "content": conversation.latest_text()})
        if result.done:
            episode.score = obs.score
            episode.solved = bool(obs.solved)
            episode.gain = obs.gain
            if episode.gain is None:  # a server older than the gain field
                episode.gain = 1.0 if episode.solved else 0.0
                log(f"{episode.task_id}: the server reports no gain; scored {episode.gain}")


def benchmark_tasks() -> list[str]:
    manifest = yaml.safe_load((REPO / "openenv.yaml").read_text())
    return [entry["id"] for entry in manifest["tasks"]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run the baseline agent on tracefix_rl.",
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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


def end_episode(episode: Episode, model_name: str, trajectories: Any) -> None:
    """Print the episode's [END] line and write its trajectory record."""
    rewards = ",".join(two_decimals(r) for r in episode.rewards)
    emit(
        f"[END] success={str(episode.solved).lower()} steps={len(episode.rewards)} "
        f"score={episode.end_score():.3f} rewards={rewards}"
    )
    if trajectories:
        trajectories.write(json.dumps({
            "task": episode.task_id, "model": model_name, "seed": episode.seed,
            "messages": episode.messages, "actions": episode.actions,
            "rewards": episode.rewards, "score": episode.score, "gain": episode.gain,
            "solved": episode.solved, "error": episode.error,
        }) + "\n")  # fmt: skip
        trajectories.flush()


def summary(episodes: list[Episode]) -> str:
    """The run in one line for stderr: N/M solved, the mean gain, the errors."""
    solved = sum(e.solved for e in episodes)
    errored = sum(e.error is not None for e in episodes)
    gains = [e.gain or 0.0 for e in episodes]
    mean = sum(gains) / len(gains) if gains else 0.0
    return f"{solved}/{len(episodes)} solved, mean gain {mean:.3f}, {errored} with errors"


def main(argv: list[str] | None = None) -> int:
    """Run the agent; returns the exit status (see the module's docstring)."""
    args = parse_args(argv)
    try:
        settings = load_settings(model=AgentSettings)
    except SettingsError as exc:
        log(f"invalid configuration:\n{exc}")
        return EXIT_BAD_CONFIG
    stop = StopSignals()
    stop.install()
    try:
        return run(args, settings, stop)
    finally:
        stop.restore()


def run(args: argparse.Namespace, settings: AgentSettings, stop: StopSignals) -> int:
    """The run: check the endpoint, get an environment, play every episode with its
    [START]/[END], stop what was started. Returns the exit status."""
    model_name = settings.model_name
    model = Model(settings, args.seed)
    deadline = time.monotonic() + args.budget_s
    listing = bool(args.tier and not args.task)
    env: Environment | None = None
    env_error = "no environment"
    episodes: list[Episode] = []
    trajectories = None
    try:
        with stop.armed():
            llm_problem = check_endpoint(settings.api_base_url, settings.llm_timeout_s)
            if llm_problem:
                log(llm_problem)
            if not llm_problem or listing:  # no environment is needed otherwise
                try:
                    env = Environment(settings.env_url, settings.local_image_name)
                except Exception as exc:  # noqa: BLE001 - reported on every episode's [END]
                    problem = f"{type(exc).__name__}: {one_line(str(exc))[:200]}"
                    env_error = f"environment unavailable: {problem}"
                    log(env_error)
            if listing and env is None:
                log("cannot list the tasks of a tier without an environment")
                return EXIT_ALL_FAILED
            tasks = args.task or (env.tasks(args.tier) if listing and env else benchmark_tasks())
        trajectories = args.trajectories.open("w") if args.trajectories else None
        runs = [task_id for task_id in tasks for _ in range(args.episodes)]
        for index, task_id in enumerate(runs):
            if stop.pending:
                break
            episode = Episode(task_id=task_id, seed=args.seed + index)
            emit(f"[START] task={task_id} env={BENCHMARK} model={model_name}")
            episodes.append(episode)
            try:
                with stop.armed():
                    if llm_problem:
                        raise RuntimeError(llm_problem)
                    if env is None:
                        raise RuntimeError(env_error)
                    if time.monotonic() > deadline:
                        raise RuntimeError("wall-clock budget exhausted before this episode")
                    run_episode(episode, env, model, args, deadline, stop)
            except Interrupted as exc:
                episode.error = f"interrupted by {exc}"
            except Exception as exc:  # noqa: BLE001 - every failure still ends with [END]
                episode.error = f"{type(exc).__name__}: {one_line(str(exc))[:300]}"
                log(f"{task_id}: episode failed: {episode.error}")
            end_episode(episode, model_name, trajectories)
    except Interrupted:  # outside any episode: nothing to end
        pass
    finally:
        if trajectories:
            trajectories.close()
        if env is not None:
            env.close()
        if episodes:
            log(summary(episodes))
    if stop.signum is not None:
        log(f"stopped by {signal.Signals(stop.signum).name}")
        return SIGNAL_EXIT_BASE + stop.signum
    if episodes and all(e.error is not None for e in episodes):
        return EXIT_ALL_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
