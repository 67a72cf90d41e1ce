"""Talking to an OpenAI-compatible model: retries, context-length recovery, tool or text mode."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import openai

from tracefix_rl.agent.config import ENDPOINT_CHECK_TIMEOUT_S, MAX_BACKOFF_S, AgentSettings
from tracefix_rl.agent.instructions import action_tool
from tracefix_rl.agent.output import clip, log, one_line
from tracefix_rl.agent.parsing import ParseError, parse_action, parse_arguments
from tracefix_rl.models import TraceFixAction

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
