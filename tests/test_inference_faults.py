"""inference.py against a misbehaving model (issue 15): a fake OpenAI-compatible server on
127.0.0.1 replays what real small models and servers did (context-length 400s, prose with
action words, literal newlines, Python dicts, cut-off replies, timeouts, 5xx), plus an
unreachable endpoint and SIGTERM / SIGINT mid-episode. Each run is checked line by line with
``test_inference.episodes``; the unit tests below cover the parser, the classification of
refusals and the prompt budget in process."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import count
from typing import Any

import httpx
import pytest

from tests.conftest import REPO, free_port
from tests.fake_llm import _solution, golden_action
from tests.test_inference import episodes
from tracefix_rl import inference
from tracefix_rl.models import TraceFixAction, TraceFixObservation

EASY = "sum_of_evens_wrong_modulus"
HARD = ("json_subset_parser_escape_and_empty_array", "lru_cache_get_does_not_promote")
PROSE = "I should not SUBMIT yet; first RUN_TESTS."
CONTEXT_SLACK_CHARS = 2500  # the fake's context: the first prompt of the run plus this
SLOW_REPLY_S = 60.0
RUN_TIMEOUT_S = 300


# -- the fake model server ----------------------------------------------------------------------


def completion(content: str | None = None, arguments: str | None = None,
               finish: str = "stop") -> dict[str, Any]:  # fmt: skip
    """A chat completion holding ``content`` or a tool call with ``arguments``."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if arguments is not None:
        message["tool_calls"] = [{"id": "call_1", "type": "function",
                                  "function": {"name": "act", "arguments": arguments}}]  # fmt: skip
    return {"id": "fake", "object": "chat.completion", "created": int(time.time()),
            "model": "fake", "choices": [{"index": 0, "message": message,
                                         "finish_reason": finish}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}  # fmt: skip


def golden(body: dict[str, Any], finish: str = "stop") -> dict[str, Any]:
    """The golden policy's next action: a tool call when tools are offered, else JSON text."""
    action = golden_action(body["messages"], with_thought=False)
    if "tools" in body:
        return completion(arguments=json.dumps(action), finish=finish)
    return completion(f"```json\n{json.dumps(action)}\n```", finish=finish)


def prompt_size(body: dict[str, Any]) -> int:
    return sum(len(m.get("content") or "") for m in body["messages"])


Answer = tuple[int, dict[str, Any], float]  # status, JSON body, delay before answering


def answer(kind: str, n: int, body: dict[str, Any], state: dict[str, Any]) -> Answer:
    """The ``n``-th (from 0) answer of scenario ``kind``."""
    if kind == "context":  # a small context window: a prompt above it is refused
        size = prompt_size(body)
        limit = state.setdefault("limit", size + CONTEXT_SLACK_CHARS)
        if size > limit:
            state["refused"] = state.get("refused", 0) + 1
            requested, window = size // 3 + body["max_tokens"], limit // 3 + body["max_tokens"]
            message = (f"This model's maximum context length is {window} tokens. However, you "
                       f"requested {requested} tokens ({size // 3} in the messages, "
                       f"{body['max_tokens']} in the completion). Please reduce the length of "
                       "the messages or completion.")  # fmt: skip
            return 400, {"error": {"message": message, "type": "invalid_request_error",
                                   "code": "context_length_exceeded"}}, 0.0  # fmt: skip
        return 200, golden(body), 0.0
    if kind == "prose" and n == 0:
        return 200, completion(PROSE), 0.0
    if kind == "newline":  # JSON with literal newlines inside new_code_block, after prose
        action = golden_action(body["messages"], with_thought=False)
        text = json.dumps(action).replace("\\n", "\n")
        return 200, completion(f"I will fix it, then RUN_TESTS and SUBMIT.\n{text}"), 0.0
    if kind == "pydict":
        return 200, completion(f"Action: {golden_action(body['messages'], False)!r}"), 0.0
    if kind == "cut":
        text = json.dumps(golden_action(body["messages"], with_thought=False))
        if n == 0:  # a tool call cut off inside new_code_block
            return 200, completion(arguments=text[: len(text) // 2], finish="length"), 0.0
        if n == 1:  # the same in text
            return 200, completion(text[: len(text) // 2], finish="length"), 0.0
        if n == 2:  # complete, but finish_reason says it reached max_tokens
            return 200, golden(body, finish="length"), 0.0
    if kind == "timeout" and n == 0:
        return 200, golden(body), 4.0  # past LLM_TIMEOUT_S
    if kind == "flaky" and n < 2:
        return 500 + 3 * n, {"error": {"message": "upstream exploded"}}, 0.0
    if kind == "slow" and n >= 1:
        return 200, golden(body), SLOW_REPLY_S
    return 200, golden(body), 0.0


class FaultLLM:
    """The fake server: ``url(kind)`` is a fresh scenario (its own call count and state)."""

    def __init__(self) -> None:
        self.calls: dict[str, list[dict[str, Any]]] = {}
        self.states: dict[str, dict[str, Any]] = {}
        self.release = threading.Event()  # wakes the slow answers at teardown
        self._lock = threading.Lock()
        self._ids = count()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return None

            def do_GET(self) -> None:
                self._send(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})

            def do_POST(self) -> None:
                name = self.path.split("/")[1]
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake._lock:
                    calls = fake.calls.setdefault(name, [])
                    calls.append(body)
                    state = fake.states.setdefault(name, {})
                status, payload, delay = answer(name.rsplit("-", 1)[0], len(calls) - 1, body,
                                                state)  # fmt: skip
                if delay:
                    fake.release.wait(delay)
                try:
                    self._send(status, payload)
                except OSError:  # the client gave up (a timeout, a signal)
                    pass

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, kind: str) -> str:
        name = f"{kind}-{next(self._ids)}"
        return f"http://127.0.0.1:{self.server.server_port}/{name}/v1"

    def requests(self, url: str) -> list[dict[str, Any]]:
        return self.calls.get(url.split("/")[3], [])

    def state(self, url: str) -> dict[str, Any]:
        return self.states.get(url.split("/")[3], {})

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def fake() -> Iterator[FaultLLM]:
    llm = FaultLLM()
    yield llm
    llm.stop()


def agent_env(api_url: str, env_url: str | None, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "LOCAL_IMAGE_NAME"}
    env.update({
        "API_BASE_URL": api_url, "MODEL_NAME": "fake-model", "HF_TOKEN": "test-token",
        "ENV_URL": env_url or f"http://127.0.0.1:{free_port()}",  # nothing listens there
        "LLM_MAX_RETRIES": "3", "LLM_RETRY_BACKOFF_S": "0.1", **extra,
    })  # fmt: skip
    return env


def play(api_url: str, env_url: str, *args: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "inference.py", *args], cwd=REPO,
                          env=agent_env(api_url, env_url, **extra), capture_output=True,
                          text=True, timeout=RUN_TIMEOUT_S)  # fmt: skip


def last_user_message(request: dict[str, Any]) -> str:
    return request["messages"][-1]["content"]


# -- the failure modes, end to end ----------------------------------------------------------------


def test_a_context_length_error_trims_the_history_and_keeps_tool_mode(fake, server):
    url = fake.url("context")
    done = play(url, server.url, "--task", HARD[0], "--task", HARD[1])
    assert done.returncode == 0, done.stderr
    found = episodes(done.stdout)
    assert [e["task"] for e in found] == list(HARD)
    assert all(e["success"] and e["score"] == 0.99 for e in found), done.stdout
    assert [len(e["steps"]) for e in found] == [3, 3], done.stdout  # the output stayed in view
    assert fake.state(url)["refused"] >= 1  # the history did outgrow the context
    assert "trimming the history" in done.stderr and "falling back" not in done.stderr
    assert all("tools" in request for request in fake.requests(url))  # never left tool mode
    for request in fake.requests(url):  # the code appears once: in the latest message only
        with_code = [m for m in request["messages"] if "Code (" in (m["content"] or "")]
        assert with_code == [request["messages"][-1]]


def test_prose_with_action_words_is_no_action_and_the_model_is_told_why(fake, server):
    url = fake.url("prose")
    done = play(url, server.url, "--task", EASY)
    (episode,) = episodes(done.stdout)
    first = episode["steps"][0]
    assert first["action"] == "VIEW_CODE" and first["done"] == "false"
    assert first["error"] == f"no JSON action in reply: {PROSE}"
    assert [s["action"] for s in episode["steps"][1:]][-2:] == ["RUN_TESTS", "SUBMIT"]
    assert episode["success"] and done.returncode == 0
    told = last_user_message(fake.requests(url)[1])
    assert told.startswith("Your last reply was not a valid action (no JSON action in reply")
    assert "VIEW_CODE was done instead" in told


@pytest.mark.parametrize("kind", ["newline", "pydict"])
def test_lenient_replies_are_read_as_the_action_they_hold(fake, server, kind):
    assert "\\" not in _solution(EASY)  # so that the fake can unescape every "\n"
    url = fake.url(kind)
    done = play(url, server.url, "--task", EASY)
    (episode,) = episodes(done.stdout)
    actions = [s["action"] for s in episode["steps"]]
    assert actions[0].startswith("REPLACE_LINES(1-") and not actions[0].endswith(",1_lines)")
    assert actions[1:] == ["RUN_TESTS", "SUBMIT"], done.stderr  # the fix was not dropped
    assert all(s["error"] == "null" for s in episode["steps"])
    assert episode["success"] and episode["score"] == 0.99


def test_cut_off_replies_are_reported_to_the_model_and_on_stderr(fake, server):
    url = fake.url("cut")
    done = play(url, server.url, "--task", EASY, "--max-steps", "8", LLM_MAX_TOKENS="300")
    (episode,) = episodes(done.stdout)
    first, second = episode["steps"][:2]
    for step in (first, second):
        assert step["action"] == "VIEW_CODE"
        assert step["error"].startswith("reply cut off at max_tokens=300 (LLM_MAX_TOKENS): ")
        assert "the reply ends inside its JSON action" in step["error"]
    assert done.stderr.count("finish_reason=length") == 3, done.stderr
    requests = fake.requests(url)
    assert all(r["max_tokens"] == 300 for r in requests)
    assert "not a valid action (reply cut off at max_tokens=300" in last_user_message(requests[1])
    assert "cut off at the 300-token limit (its action was still read)" in last_user_message(
        requests[3]
    )
    assert episode["steps"][2]["action"].startswith("REPLACE_LINES(1-")  # the complete one
    assert episode["success"]


@pytest.mark.parametrize("kind", ["timeout", "flaky"])
def test_transient_failures_are_retried_within_the_step(fake, server, kind):
    url = fake.url(kind)
    done = play(url, server.url, "--task", EASY, LLM_TIMEOUT_S="1")
    (episode,) = episodes(done.stdout)
    assert episode["success"] and len(episode["steps"]) == 3, done.stderr
    retries = 1 if kind == "timeout" else 2
    assert f"retry {retries}/3 in" in done.stderr
    assert ("APITimeoutError" if kind == "timeout" else "InternalServerError") in done.stderr
    assert len(fake.requests(url)) == 3 + retries


def test_an_unreachable_endpoint_is_named_and_fails_fast(fake):
    api = f"http://127.0.0.1:{free_port()}/v1"
    started = time.monotonic()
    done = play(api, None, "--task", EASY, "--task", HARD[0])
    assert time.monotonic() - started < 30
    assert done.returncode == 1
    assert f"LLM endpoint unreachable at {api}/models" in done.stderr
    assert "0/2 solved" in done.stderr and "Traceback" not in done.stderr
    found = episodes(done.stdout)
    assert [(e["steps"], e["score"], e["success"]) for e in found] == [([], 0.01, False)] * 2
    assert "starting one at" not in done.stderr  # no environment was started for nothing


def test_help_lists_every_variable_with_its_default():
    done = subprocess.run([sys.executable, "inference.py", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0
    for name, info in inference.AgentSettings.model_fields.items():
        line = next(x for x in done.stdout.splitlines() if x.strip().startswith(name.upper()))
        assert f"(default: {'unset' if info.default is None else info.default})" in line


# -- signals ------------------------------------------------------------------------------------


class Agent:
    """inference.py as a running subprocess, its output read by threads."""

    def __init__(self, api_url: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "inference.py", "--task", EASY], cwd=REPO,
            env=agent_env(api_url, None), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        self.stdout: queue.Queue[str] = queue.Queue()
        self.lines: list[str] = []
        self.stderr: list[str] = []
        threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout.put),
                         daemon=True).start()  # fmt: skip
        threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr.append),
                         daemon=True).start()  # fmt: skip

    @staticmethod
    def _read(stream, put) -> None:
        for line in stream:
            put(line)

    def wait_for_line(self, prefix: str, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self.stdout.get(timeout=max(0.1, deadline - time.monotonic()))
            self.lines.append(line)
            if line.startswith(prefix):
                return line

    def finish(self, timeout: float = 90) -> tuple[int, str, str]:
        code = self.proc.wait(timeout=timeout)
        time.sleep(0.2)  # the reader threads drain the pipes
        while not self.stdout.empty():
            self.lines.append(self.stdout.get())
        return code, "".join(self.lines), "".join(self.stderr)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def descendants(pid: int) -> dict[int, str]:
    """Every live descendant of ``pid``: pid -> its start time (to tell a reused pid)."""
    from tracefix_rl.procs import children_of

    found: dict[int, str] = {}
    pending = [pid]
    while pending:
        for child in children_of(pending.pop()):
            if (started := start_time(child)) is not None:
                found[child] = started
                pending.append(child)
    return found


def start_time(pid: int) -> str | None:
    """The start time of a live ``pid`` (None once it is gone or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in "ZX" else fields[19]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_episode_ends_it_and_stops_the_started_server(fake, signum):
    url = fake.url("slow")
    agent = Agent(url)
    try:
        agent.wait_for_line("[STEP] step=1 ")
        deadline = time.monotonic() + 60
        while len(fake.requests(url)) < 2:  # the agent now waits for a slow reply
            assert time.monotonic() < deadline
            time.sleep(0.05)
        started = [line for line in agent.stderr if "starting one at" in line]
        server_url = started[0].split("starting one at ")[1].split()[0]
        server_pid = int(started[0].split("(pid ")[1].split(",")[0])
        family = descendants(agent.proc.pid)
        assert server_pid in family  # with its sandbox workers, if started
        agent.proc.send_signal(signum)
        code, stdout, stderr = agent.finish()
    finally:
        agent.kill()
    assert code == 128 + signum, stderr
    (episode,) = episodes(stdout)
    assert episode["success"] is False and len(episode["steps"]) == 1 and episode["score"] == 0.01
    assert "Traceback" not in stderr and f"stopped by {signum.name}" in stderr
    assert "0/1 solved" in stderr
    left = {pid for pid, began in family.items() if start_time(pid) == began}
    assert not left, f"left running: {left}"
    with pytest.raises(ProcessLookupError):  # its process group is empty
        os.killpg(server_pid, 0)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{server_url}/health", timeout=2)


def test_a_signal_while_the_server_starts_stops_it_without_an_episode(fake):
    agent = Agent(fake.url("golden"))
    try:
        deadline = time.monotonic() + 60
        while not any("starting one at" in line for line in agent.stderr):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        line = next(line for line in agent.stderr if "starting one at" in line)
        server_pid = int(line.split("(pid ")[1].split(",")[0])
        agent.proc.send_signal(signal.SIGTERM)
        code, stdout, stderr = agent.finish()
    finally:
        agent.kill()
    assert code == 143 and "Traceback" not in stderr, stderr
    assert stdout == "" and "stopped by SIGTERM" in stderr  # no episode had started
    with pytest.raises(ProcessLookupError):
        os.killpg(server_pid, 0)


# -- in process: the parser, refusals, the prompt -----------------------------------------------


def test_the_parser_reads_lenient_forms_and_never_guesses():
    parse = inference.parse_action
    literal = '{"action_type": "REPLACE_LINES", "start_line": 1, "end_line": 2,\n' \
              '"new_code_block": "def f():\n    return {1: 2}"}'  # fmt: skip
    assert parse(literal).new_code_block == "def f():\n    return {1: 2}"
    mixed = f"I will fix it, then RUN_TESTS and SUBMIT.\n{literal}"
    assert parse(mixed).action_type == "REPLACE_LINES"
    python = "{'action_type': 'VIEW_CODE', 'start_line': 2, 'end_line': None, 'thought': None,}"
    assert parse(python).start_line == 2
    assert parse('Sure: {"action_type": "SUBMIT"').action_type == "SUBMIT"  # only "}" missing
    assert parse('{"name": "act", "arguments": {"action_type": "RUN_TESTS"}}').action_type == (
        "RUN_TESTS"
    )
    for text, reason in (
        (PROSE, f"no JSON action in reply: {PROSE}"),
        ("RUN_TESTS", "no JSON action in reply: RUN_TESTS"),
        ('{"action_type": "VIEW_CODE", "start_line": 1', "ends inside its JSON action"),
        ('{"action_type": "REPLACE_LINES", "new_code_block": "def f(', "ends inside"),
        ('{"action_type": RUN_TESTS}', "unreadable JSON action (Expecting value at line 1"),
        ('{"thought": "hmm"}', "JSON object without action_type"),
        ('{"action_type": "FLY"}', "invalid action (action_type"),
        ("  ", "empty reply"),
    ):
        with pytest.raises(inference.ParseError) as caught:
            parse(text)
        assert reason in str(caught.value), (text, str(caught.value))
    args = (
        '{"action_type": "REPLACE_LINES", "start_line": 1, "end_line": 1, "new_code_block": "a\nb"}'
    )
    assert inference.parse_arguments(args).new_code_block == "a\nb"


@pytest.mark.parametrize(
    ("text", "mode", "why"),
    [
        ("This model's maximum context length is 8192 tokens. However, you requested 10361 "
         "tokens (9337 in the messages, 1024 in the completion).", "tools", "context"),
        ("the request exceeds the available context size, try increasing it", "tools", "context"),
        ("Requested tokens (10361) exceed context window of 8192", "json", "context"),
        ('{"code":400,"type":"exceed_context_size_error","n_prompt_tokens":9337,"n_ctx":8192}',
         "tools", "context"),
        ("tools param requires --jinja flag", "tools", "mode"),
        ('"auto" tool choice requires --enable-auto-tool-choice', "tools", "mode"),
        ("response_format is not supported by this model", "json", "mode"),
        ("response_format is not supported by this model", "tools", "other"),
        ("max_tokens must be at most 4096", "tools", "max_tokens"),
        ("Invalid value for 'messages'", "tools", "other"),
    ],
)  # fmt: skip
def test_refusals_are_classified(text, mode, why):
    assert inference.classify_rejection(text, mode) == why


def test_the_context_error_sets_how_much_to_trim():
    said = "maximum context length is 8192 tokens. However, you requested 10361 tokens"
    assert inference.context_shrink(said, 1024) == pytest.approx(0.9 * 7168 / 9337)
    assert inference.context_shrink(said, 9000) == pytest.approx(0.9 * 8192 / 10361)
    llama = '"n_prompt_tokens": 9337, "n_ctx": 4096'  # llama.cpp counts the prompt only
    assert inference.context_shrink(llama, 1024) == pytest.approx(0.9 * 4096 / 9337)
    assert inference.context_shrink("prompt is too long") == inference.CONTEXT_SHRINK
    tiny = "maximum context length is 10 tokens. However, you requested 99999 tokens"
    assert inference.context_shrink(tiny) == inference.MIN_SHRINK


def observation(lines: int, output: str = "", **fields: Any) -> TraceFixObservation:
    return TraceFixObservation(
        task_id="t", difficulty="hard", description="Spec " * 50, tests_total=4,
        code_dict={n: f"    value_{n} = compute({n})  # line {n}" for n in range(1, lines + 1)},
        last_execution_output=output, steps_remaining=10, **fields,
    )  # fmt: skip


def test_the_first_prompt_says_the_tests_have_not_run():
    first = inference.Conversation("system", observation(5)).first_message()
    assert "Visible tests passing: not run yet." in first and "0/4" not in first
    ran = observation(5, test_results=[{"test_name": "a", "passed": True}], tests_passed=1)
    assert "Visible tests passing: 1/4 (last run)." in inference.render(ran)


def rewrite(lines: int, block: str) -> tuple[TraceFixAction, inference.Reply]:
    """A whole-file REPLACE_LINES and the reply that held it."""
    action = TraceFixAction(
        action_type="REPLACE_LINES", start_line=1, end_line=lines, new_code_block=block
    )
    raw = json.dumps(action.model_dump(exclude_none=True, exclude={"metadata"}))
    return action, inference.Reply(raw, action, None)


def test_the_prompt_keeps_the_code_once_and_fits_its_budget():
    conversation = inference.Conversation("system " * 100, observation(80))
    action, reply = rewrite(80, "\n".join(f"    value_{n} = compute({n})" for n in range(80)))
    for _ in range(12):
        conversation.record(reply, action, observation(80, "Ran 4 tests\n" + "x" * 3000), None)
    roomy = conversation.messages(10**9)
    assert len(roomy) == 2 + 2 * inference.HISTORY_TURNS  # system, task, 6 turns
    assert [m["role"] for m in roomy] == ["system", "user"] + ["assistant", "user"] * 6
    assert sum("Code (80 lines)" in m["content"] for m in roomy) == 1
    assert "Code (80 lines)" in roomy[-1]["content"]
    assert "6 earlier steps are not shown: REPLACE_LINES(1-80,80_lines)" in roomy[1]["content"]
    assert all(len(m["content"]) <= inference.OLD_REPLY_CHARS for m in roomy[2:-2:2])
    full = inference.prompt_chars(roomy, None)
    for budget in (full, full // 2, full // 4, 100):
        messages = conversation.messages(budget)
        size = inference.prompt_chars(messages, None)
        assert size <= budget or len(messages) == 2, (budget, size)
        assert "Code (80 lines)" in messages[-1]["content"]  # the code always stays
        roles = [m["role"] for m in messages]
        assert roles[:2] == ["system", "user"] and all(
            a != b for a, b in zip(roles[1:], roles[2:], strict=False)
        )


def test_feedback_and_view_clamping():
    bad = inference.Reply("hmm", None, "no JSON action in reply: hmm")
    assert "not a valid action (no JSON action in reply: hmm)" in inference.feedback(bad, 100)
    cut = inference.Reply("{}", TraceFixAction(action_type="SUBMIT"), None, cut_off=True)
    assert "cut off at the 100-token limit" in inference.feedback(cut, 100)
    assert inference.feedback(inference.Reply("{}", cut.action, None), 100) is None
    view = TraceFixAction(action_type="VIEW_CODE", start_line=3, end_line=99)
    assert inference.clamp_view(view, 20).end_line == 20
    assert inference.clamp_view(view, 200).end_line == 99
    beyond = TraceFixAction(action_type="VIEW_CODE", start_line=30, end_line=99)
    assert inference.clamp_view(beyond, 20).end_line == 99  # the server says why


def test_largest_prompt_per_tier_fits_the_default_context(registry, make_env, capsys):
    """The largest prompt of each tier over the curated tasks, first and late in an episode
    (six turns of whole-file rewrites with long outputs), against the default budget."""
    settings = inference.AgentSettings(_env_file=None)
    tools = [inference.action_tool()]
    budget = (settings.llm_context_tokens - settings.llm_max_tokens) * inference.CHARS_PER_TOKEN
    rows = []
    for tier in ("easy", "medium", "hard"):
        first_sizes, late_sizes, natural_sizes = [], [], []
        for task_id in registry.ids(tier, source="curated"):
            task = registry.tasks[task_id]
            obs = make_env().reset(task_id=task_id)
            conversation = inference.Conversation(inference.system_prompt(), obs)
            first = conversation.messages(budget - inference.prompt_chars([], tools))
            first_sizes.append(inference.prompt_chars(first, tools))
            action, reply = rewrite(len(obs.code_dict), task.solution)
            later = obs.model_copy(update={"last_execution_output": "y" * 2000})
            for _ in range(8):
                conversation.record(reply, action, later, None)
            natural_sizes.append(inference.prompt_chars(conversation.messages(10**9), tools))
            late = conversation.messages(budget - inference.prompt_chars([], tools))
            late_sizes.append(inference.prompt_chars(late, tools))
        rows.append((tier, max(first_sizes), max(late_sizes), max(natural_sizes)))
    with capsys.disabled():
        print(f"\nlargest prompt per tier (chars, ~tokens at {inference.CHARS_PER_TOKEN} "
              f"chars/token; budget {budget} chars incl. the tool schema):")  # fmt: skip
        for tier, first, late, natural in rows:
            print(f"  {tier:6} first {first:6} (~{first // 3:5})  late {late:6} "
                  f"(~{late // 3:5})  late untrimmed {natural:6} (~{natural // 3:5})")  # fmt: skip
    for _, first, late, _ in rows:
        assert first <= budget and late <= budget
