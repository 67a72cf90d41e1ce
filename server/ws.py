"""The WebSocket endpoints ``/ws`` and ``/mcp``: one environment per connection, with hard
session caps (``MAX_CONCURRENT_ENVS`` for ``/ws``, ``MCP_MAX_SESSIONS`` for MCP).

Wire protocol: openenv-core 0.3's, unchanged (``EnvClient``, ``GenericEnvClient`` and
``client.TraceFixEnv`` work as they did). The client sends JSON text frames
``{"type": "reset", "data": {...}}``, ``{"type": "step", "data": {action}}``,
``{"type": "state"}``, ``{"type": "mcp", "data": {json-rpc}}`` and ``{"type": "close"}``;
each gets exactly one reply, in order: ``{"type": "observation", "data": ...}``,
``{"type": "state", "data": ...}``, ``{"type": "mcp", "data": ...}`` or
``{"type": "error", "data": {"message", "code", ...}}``. An error frame never ends the
session. Error codes are openenv's ``WSErrorCode`` values plus ``MESSAGE_TOO_LARGE``.

What this module guarantees (openenv 0.3's endpoint did none of it):

* **Every live environment counts against the cap** (``MAX_CONCURRENT_ENVS``). A session
  holds its slot from the moment it is accepted until its socket is closed *and* no step of
  it runs in a thread any more. Over the cap the server sends a ``CAPACITY_REACHED`` error
  frame and closes with **1013** (Try Again Later).
* **Idle sessions are reaped by closing the socket**: no frame for ``SESSION_TIMEOUT_S``
  (the wait starts when the last reply was sent) closes the socket with **4408** and a reason,
  and destroys the environment. 4408 is in the range RFC 6455 leaves to applications
  (4000-4999), reads as HTTP 408 Request Timeout, and lets a client tell reaping apart from
  a shutdown (1001) or a refusal (1013); graphql-ws uses it the same way.
* **A client that goes away cancels its evaluation.** A receiver task reads the socket while
  a step runs in a thread, so a disconnect or a ``close`` frame is seen at once and calls
  ``env.close()``: a queued evaluation is dropped and a running one killed, instead of
  holding a sandbox worker until it finishes. Frames not yet answered are dropped.
* **A client that stops reading is dropped** once a reply has waited ``SEND_TIMEOUT_S`` to
  be taken, so it cannot hold a slot (or a shutdown) forever.
* **Bounded messages.** A message longer than ``app.state.max_request_bytes`` gets a
  ``MESSAGE_TOO_LARGE`` error frame and the session goes on; uvicorn's ``ws_max_size``
  (``server.serve``) closes with 1009 above twice that. At most ``PENDING_FRAMES`` frames and
  ``PENDING_BYTES_FACTOR`` x the limit in bytes may wait for replies (clients of this
  request/reply protocol never have more than one); beyond that the socket is closed with
  **1008** (Policy Violation), because reading on would buffer without bound and not reading
  would hide a disconnect.
* **Every frame is encodable.** Frames are ASCII JSON; strings that came from the client or
  from agent code (error messages, validation details, echoed ids) are passed through
  ``models.escape_surrogates_in``, and a reply that cannot be encoded is replaced by an
  error frame rather than dropping the session (observations, and so scores, are already
  escaped when built).
* **Shutdown** (``server.serve``): :meth:`WebSocketSessions.shut_down` closes every session
  with **1001** (Going Away) and cancels its evaluation in flight.

**MCP** (the tools of ``server.mcp``), three ways, all with the guarantees above but the
cap, which is MCP's own (``MCP_MAX_SESSIONS``; an MCP session never takes a ``/ws`` slot):

* ``{"type": "mcp", "data": {json-rpc}}`` frames on ``/ws`` call the tools on the session's
  own environment (``openenv/session/create`` answers the session's id), and a ``step``
  whose data is OpenEnv's ``{"type": "call_tool", "tool_name", "arguments"}`` or
  ``{"type": "list_tools"}`` is answered with OpenEnv's ``CallToolObservation`` (with the
  step's reward and done) or ``ListToolsObservation``;
* ``/ws?session_id=<id>`` attaches to an MCP session made over HTTP (``MCPToolClient`` does
  this): the socket plays that session's environment, which HTTP tool calls share (calls run
  one at a time), and takes no ``/ws`` slot. An unknown id, or a session that already has a
  socket, is refused with a ``SESSION_ERROR`` frame and 1008;
* WebSocket ``/mcp`` (:class:`_McpSession`, openenv's bare JSON-RPC protocol) opens an MCP
  session per connection, refused over ``MCP_MAX_SESSIONS`` with a JSON-RPC error and 1013.

A socket on an MCP session in which no episode has started is reaped after
``MCP_IDLE_TIMEOUT_S`` (``SESSION_TIMEOUT_S`` once one has).

``reset`` passes the fields of ``models.ResetArgs`` to ``env.reset`` (which validates
them); other keys, e.g. a trainer's dataset columns, are ignored.

Threads: steps and resets run in one shared ``ThreadPoolExecutor`` with one thread per
session slot (threads start on demand), so a step waiting for the sandbox never waits for a
thread. openenv 0.3 created an executor per session.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI
from openenv.core.env_server.mcp_types import (
    CallToolAction,
    CallToolObservation,
    JsonRpcErrorCode,
    JsonRpcRequest,
    JsonRpcResponse,
    ListToolsAction,
    ListToolsObservation,
    Tool,
    ToolError,
    ToolErrorType,
    WSMCPMessage,
)
from openenv.core.env_server.serialization import deserialize_action, serialize_observation
from openenv.core.env_server.types import (
    WSCloseMessage,
    WSErrorCode,
    WSResetMessage,
    WSStateMessage,
    WSStepMessage,
)
from pydantic import ValidationError
from starlette.routing import WebSocketRoute

from tracefix_rl.environment import TraceFixEnvironment
from tracefix_rl.models import ResetArgs, TraceFixAction, escape_surrogates, escape_surrogates_in
from tracefix_rl.sandbox import get_sandbox
from tracefix_rl.server.mcp import TOOLS, Transport, call_tool, dispatch
from tracefix_rl.server.mcp_sessions import (
    McpCapacityError,
    McpSession,
    McpSessionError,
    McpSessions,
)
from tracefix_rl.tasks import TaskSelectionError, get_registry

log = logging.getLogger("tracefix_rl.server.ws")

PATH = "/ws"
MCP_PATH = "/mcp"  # openenv's JSON-RPC-over-WebSocket endpoint (see _McpSession)
MCP_STEP_TYPES = ("call_tool", "list_tools")  # OpenEnv's MCP actions, as step data

# Close codes (RFC 6455 section 7.4; 4000-4999 are for applications).
CLOSE_NORMAL = 1000  # the client sent {"type": "close"}
CLOSE_GOING_AWAY = 1001  # the server is shutting down
CLOSE_POLICY = 1008  # too many frames waiting for replies
CLOSE_INTERNAL = 1011  # a bug in this module (logged with its traceback)
CLOSE_TRY_AGAIN = 1013  # over MAX_CONCURRENT_ENVS
CLOSE_IDLE = 4408  # reaped after SESSION_TIMEOUT_S without a frame
CLOSE_REASON_BYTES = 123  # the most a close frame can carry

MESSAGE_TOO_LARGE = "MESSAGE_TOO_LARGE"
SEND_TIMEOUT_S = 30.0  # a peer that takes no data for this long is dropped
CLOSING_SEND_TIMEOUT_S = 0.25  # the same at shutdown
PENDING_FRAMES = 32
PENDING_BYTES_FACTOR = 2
ERROR_INPUT_CHARS = 256  # validation errors echo inputs up to this size, else describe them
MAX_ERRORS_ECHOED = 20
RESET_FIELDS = frozenset(ResetArgs.model_fields)


def _reason(text: str) -> str:
    """A close reason that is encodable and fits a close frame (123 bytes of UTF-8)."""
    text = escape_surrogates(text)
    data = text.encode()
    if len(data) <= CLOSE_REASON_BYTES:
        return text
    return data[:CLOSE_REASON_BYTES].decode(errors="ignore")


def _stringify(value: Any) -> str:
    return escape_surrogates(str(value))


def encode_frame(kind: str, data: Any, escape: bool = True) -> str:
    """One reply frame as ASCII JSON (``ensure_ascii``), so it is always encodable.

    ``escape`` passes every string through :func:`models.escape_surrogates_in` first, which
    is what data that came from a client or from agent code needs; observations are escaped
    when they are built. Anything that cannot be encoded becomes an ``EXECUTION_ERROR`` frame.
    """
    try:
        payload = escape_surrogates_in(data) if escape else data
        return json.dumps({"type": kind, "data": payload}, default=_stringify, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        log.warning("a %s reply could not be encoded: %r", kind, exc)
        message = f"the server could not encode its {kind} reply ({type(exc).__name__})"
        error = {"message": message, "code": WSErrorCode.EXECUTION_ERROR}
        return json.dumps({"type": "error", "data": error})


def encode_json(data: Any) -> str:
    """``data`` (a bare JSON-RPC message) as ASCII JSON with client strings escaped."""
    try:
        return json.dumps(escape_surrogates_in(data), default=_stringify, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        log.warning("a JSON-RPC reply could not be encoded: %r", exc)
        message = f"the server could not encode its reply ({type(exc).__name__})"
        return JsonRpcResponse.error_response(
            JsonRpcErrorCode.INTERNAL_ERROR, message
        ).model_dump_json()


def _error(code: str, message: str, **extra: Any) -> str:
    return encode_frame("error", {"message": message, "code": code, **extra})


def _describe(value: Any) -> Any:
    """``value`` if it is small plain JSON, else a description (validation errors echo the
    input; NaN and infinities are not JSON, so they are described too)."""
    try:
        if len(json.dumps(value, default=_stringify, allow_nan=False)) <= ERROR_INPUT_CHARS:
            return value
    except (TypeError, ValueError, RecursionError):
        pass
    size = f" of {len(value)}" if isinstance(value, (str, list, dict)) else ""
    return f"<{type(value).__name__}{size} not echoed>"


def validation_frame(exc: ValidationError, what: str) -> str:
    """``VALIDATION_ERROR`` naming the fields, with pydantic's errors (inputs clipped)."""
    errors = []
    for error in exc.errors(include_url=False)[:MAX_ERRORS_ECHOED]:
        error = dict(error)
        if "input" in error:
            error["input"] = _describe(error["input"])
        if "ctx" in error:
            error["ctx"] = {k: _describe(v) for k, v in error["ctx"].items()}
        errors.append(error)
    summary = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '(message)'}: {e['msg']}" for e in errors[:3]
    )
    return _error(WSErrorCode.VALIDATION_ERROR, f"invalid {what}: {summary}", errors=errors)


def _invalid_rpc(exc: Exception) -> dict[str, Any]:
    """openenv's answer to a JSON-RPC message it cannot read."""
    return JsonRpcResponse.error_response(
        JsonRpcErrorCode.INVALID_REQUEST, f"Invalid request: {exc}"
    ).model_dump()


def _tool_step(observation: Any, reward: float | None = None, done: bool = False) -> str:
    """An observation frame of OpenEnv's MCP step types (their own observation models)."""
    observation.reward, observation.done = reward, done
    return encode_frame("observation", serialize_observation(observation))


class _Gone(Exception):
    """The session ended (disconnect, close frame, shutdown) while a call was in flight."""


class _Session:
    """One accepted connection: its environment, its receiver task and its reply loop."""

    protocol_version: str | None = None  # MCP's, once an ``initialize`` frame set it

    def __init__(
        self, manager: WebSocketSessions, receive: Any, send: Any,
        mcp: McpSession | None = None, owns_mcp: bool = False,
    ) -> None:  # fmt: skip
        self.manager = manager
        self.receive = receive
        self.send = send
        self.mcp = mcp  # the MCP session this socket plays (None: an environment of its own)
        self.owns_mcp = owns_mcp  # the session ends with the socket (WebSocket /mcp)
        self.session_id = mcp.session_id if mcp is not None else str(uuid.uuid4())
        self.env = mcp.env if mcp is not None else manager.env_factory()
        self.loop = asyncio.get_running_loop()
        self.inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.gone: asyncio.Future[None] = self.loop.create_future()
        self.pending_bytes = 0
        self.disconnected = False
        self.closed = False
        self.close_with: tuple[int, str] | None = None
        self.running: asyncio.Future[Any] | None = None

    # -- ending -----------------------------------------------------------------------------

    def end(self, code: int | None, reason: str = "") -> None:
        """Stop the session: no further replies, the evaluation in flight is cancelled, and
        the socket is closed with ``code`` (None: the peer is already gone)."""
        if self.close_with is None and code is not None:
            self.close_with = (code, _reason(reason))
        if not self.gone.done():
            self.gone.set_result(None)
            self.inbox.put_nowait(("end",))
        if self.mcp is None:
            self.env.close()
        elif self.owns_mcp and self.manager.mcp is not None:
            self.manager.mcp.discard(self.mcp)
        elif self.running is not None and not self.running.done():
            self.env.cancel()  # this socket's own call; the HTTP side keeps the session

    async def _send(self, message: dict[str, Any]) -> bool:
        """Send one ASGI message; False (and the peer counts as gone) when it has left or has
        not taken the message within the send timeout (it stopped reading: its slot must not
        be held forever)."""
        manager = self.manager
        timeout_s = CLOSING_SEND_TIMEOUT_S if manager.closing else manager.send_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                await self.send(message)
            return True
        except TimeoutError:
            log.info("websocket session %s: the peer took no data for %g s; dropping it",
                     self.session_id, timeout_s)  # fmt: skip
        except (OSError, RuntimeError):  # the peer left (uvicorn's ClientDisconnected)
            pass
        self.disconnected = True
        return False

    async def _close_socket(self) -> None:
        if self.closed or self.disconnected:
            return
        self.closed = True
        code, reason = self.close_with or (CLOSE_NORMAL, "")
        await self._send({"type": "websocket.close", "code": code, "reason": reason})

    async def reply(self, text: str) -> None:
        if self.closed or self.disconnected or self.gone.done():
            return
        if not await self._send({"type": "websocket.send", "text": text}):
            self.end(None)

    # -- reading ----------------------------------------------------------------------------

    async def receive_frames(self) -> None:
        """Receiver task: parse each message into the inbox; notice disconnects at once."""
        limit = self.manager.max_message_bytes
        pending_limit = PENDING_BYTES_FACTOR * limit
        while True:
            try:
                event = await self.receive()
            except (OSError, RuntimeError):
                event = {"type": "websocket.disconnect"}
            if event["type"] == "websocket.disconnect":
                self.disconnected = True
                self.end(None)
                return
            if event["type"] != "websocket.receive":
                continue
            raw = event.get("text")
            if raw is None:
                raw = event.get("bytes") or b""
            size = _size(raw, limit)
            if size > limit:
                message = (
                    f"message of {size} bytes is over the limit of {limit} bytes "
                    "(MAX_REQUEST_BYTES); nothing was done"
                )
                item: tuple[Any, ...] = ("error", MESSAGE_TOO_LARGE, message, 0)
            else:
                item = _parse(raw, size)
            if item[0] == "frame" and self.is_close(item[1]):
                self.end(CLOSE_NORMAL, "session closed by the client")
                return
            backlog = self.pending_bytes + item[-1]
            if self.inbox.qsize() >= PENDING_FRAMES or backlog > pending_limit:
                reason = (
                    f"more than {PENDING_FRAMES} messages or {pending_limit} bytes sent "
                    "without waiting for replies"
                )
                self.end(CLOSE_POLICY, reason)
                return
            self.pending_bytes += item[-1]
            self.inbox.put_nowait(item)

    # -- replying ---------------------------------------------------------------------------

    def idle_limit(self) -> tuple[float, str]:
        """How long this socket may stay silent, and the setting that says so."""
        if self.mcp is not None:
            return self.mcp.idle_limit()
        return self.manager.idle_timeout_s, "SESSION_TIMEOUT_S"

    async def run(self) -> None:
        receiver = self.loop.create_task(self.receive_frames())
        try:
            while not self.gone.done():
                idle_s, setting = self.idle_limit()
                wait_s = idle_s if self.mcp is None else self.mcp.idle_for_s(idle_s)
                try:
                    async with asyncio.timeout(wait_s):
                        item = await self.inbox.get()
                except TimeoutError:
                    if self.mcp is not None and self.mcp.idle_for_s(self.idle_limit()[0]) > 0:
                        continue  # the session was used over HTTP meanwhile
                    reason = f"idle for {idle_s:g} s ({setting}); reconnect and reset"
                    self.end(CLOSE_IDLE, reason)
                    log.info("websocket session %s reaped after %g s idle", self.session_id, idle_s)
                    break
                if item[0] == "end" or self.gone.done():
                    break
                if self.mcp is not None:
                    self.mcp.touch()
                self.pending_bytes -= item[-1]
                if item[0] == "error":
                    await self.reply(self.error_reply(item[1], item[2]))
                    continue
                try:
                    await self.reply(await self.handle(item[1]))
                except _Gone:
                    break
        finally:
            receiver.cancel()
            self.end(None)
            await self._close_socket()
            if self.running is not None and not self.running.done() and not self.manager.closing:
                # The slot stays taken until the cancelled evaluation has really stopped.
                await asyncio.wait(
                    (self.running, self.manager.abandon), return_when=asyncio.FIRST_COMPLETED
                )

    # -- the protocol ------------------------------------------------------------------------

    @staticmethod
    def is_close(message: dict[str, Any]) -> bool:
        return message.get("type") == "close" and len(message) == 1

    @staticmethod
    def error_reply(code: str, detail: str) -> str:
        """The reply to a message that could not be read (``_parse``, size limit)."""
        if code == WSErrorCode.INVALID_JSON:
            detail = f"Invalid JSON: {detail}"
        return _error(code, detail)

    @staticmethod
    def refusal(code: str, message: str, **extra: Any) -> str:
        """The frame that refuses a connection before the session starts."""
        return _error(code, message, **extra)

    async def handle(self, message: dict[str, Any]) -> str:
        """The reply frame to one client frame (never raises for client input)."""
        kind = message.get("type", "")
        try:
            match kind:
                case "reset":
                    data = WSResetMessage.model_validate(message).data
                    args = {k: v for k, v in data.items() if k in RESET_FIELDS}
                    observation = await self.call(self.env.reset, **args)
                    return encode_frame("observation", serialize_observation(observation), False)
                case "step":
                    data = WSStepMessage.model_validate(message).data
                    if data.get("type") in MCP_STEP_TYPES and "action_type" not in data:
                        return await self.tool_step(data)
                    action = deserialize_action(data, TraceFixAction)
                    observation = await self.call(self.env.step, action)
                    return encode_frame("observation", serialize_observation(observation), False)
                case "state":
                    WSStateMessage.model_validate(message)
                    return encode_frame("state", self.env.state.model_dump())
                case "close":  # only reached with extra keys, which the model rejects
                    WSCloseMessage.model_validate(message)
                    raise _Gone
                case "mcp":
                    data = WSMCPMessage.model_validate(message).data
                    return encode_frame("mcp", await self.rpc(data))
                case _:
                    return _error(WSErrorCode.UNKNOWN_TYPE, f"Unknown message type: {kind}")
        except ValidationError as exc:
            return validation_frame(exc, kind if isinstance(kind, str) else "message")
        except TaskSelectionError as exc:
            return _error(WSErrorCode.EXECUTION_ERROR, str(exc))
        except _Gone:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug: the session survives, the log says why
            log.exception("websocket %s frame failed", kind)
            return _error(WSErrorCode.EXECUTION_ERROR, f"{type(exc).__name__}: {exc}")

    async def rpc(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The JSON-RPC answer to an MCP message (``server.mcp``), in this session."""
        try:
            request = JsonRpcRequest(**payload)
        except Exception as exc:  # noqa: BLE001 - openenv answers every failure this way
            return _invalid_rpc(exc)
        store = self.manager.mcp
        return (await dispatch(request, self, Transport.WEBSOCKET, store)).model_dump()

    async def tool_step(self, data: dict[str, Any]) -> str:
        """A ``step`` of OpenEnv's ``ListToolsAction`` or ``CallToolAction``."""
        if data["type"] == "list_tools":
            ListToolsAction.model_validate(data)
            tools = [Tool(name=t.name, description=t.description, input_schema=t.input_schema)
                     for t in TOOLS]  # fmt: skip
            return _tool_step(ListToolsObservation(tools=tools), done=self.env.state.done)
        action = CallToolAction.model_validate(data)
        result, problem, observation = await call_tool(self, action.tool_name, action.arguments)
        if problem is not None:
            error = ToolError(error_type=ToolErrorType.TOOL_NOT_FOUND, message=problem)
            return _tool_step(CallToolObservation(tool_name=action.tool_name, error=error),
                              done=self.env.state.done)  # fmt: skip
        reply = CallToolObservation(tool_name=action.tool_name, result=result)
        if observation is None:
            return _tool_step(reply, 0.0, self.env.state.done)
        return _tool_step(reply, observation.reward, observation.done)

    async def run_call(self, function: Callable[[], Any]) -> Any:
        """``server.mcp``'s way to run a tool call in this session (see :meth:`call`)."""
        return await self.call(function)

    async def call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``function`` in the session threads; if the session ends meanwhile, cancel
        the environment's evaluation and raise :class:`_Gone`. On an MCP session, it runs
        after the session's other calls (HTTP tool calls share the environment), in the MCP
        threads."""
        if self.mcp is not None:
            await self._acquire(self.mcp.lock)
            future = self.mcp.submit(lambda: function(*args, **kwargs))
        else:
            executor = self.manager.executor
            future = self.loop.run_in_executor(executor, lambda: function(*args, **kwargs))
        self.running = future
        await asyncio.wait((future, self.gone), return_when=asyncio.FIRST_COMPLETED)
        if self.gone.done():  # end() has cancelled the evaluation; nobody awaits a reply
            raise _Gone
        self.running = None
        return future.result()

    async def _acquire(self, lock: asyncio.Lock) -> None:
        """Take ``lock``, or raise :class:`_Gone` if the session ends first."""
        acquiring = self.loop.create_task(lock.acquire())
        await asyncio.wait((acquiring, self.gone), return_when=asyncio.FIRST_COMPLETED)
        if self.gone.done():
            if acquiring.done() and not acquiring.cancelled():
                lock.release()
            else:
                acquiring.cancel()
            raise _Gone


class _McpSession(_Session):
    """openenv's WebSocket ``/mcp`` protocol: bare JSON-RPC requests and responses. Each
    connection is an MCP session of its own (``MCP_MAX_SESSIONS``; openenv gave each an
    environment outside any cap), with the guarantees of every session (reaping, limits,
    shutdown)."""

    @staticmethod
    def is_close(message: dict[str, Any]) -> bool:
        return False

    @staticmethod
    def error_reply(code: str, detail: str) -> str:
        if code == WSErrorCode.INVALID_JSON:
            rpc = JsonRpcResponse.error_response(
                JsonRpcErrorCode.PARSE_ERROR, f"Parse error: {detail}"
            )
        else:
            rpc = JsonRpcResponse.error_response(JsonRpcErrorCode.INVALID_REQUEST, detail)
        return encode_json(rpc.model_dump())

    @staticmethod
    def refusal(code: str, message: str, **extra: Any) -> str:
        rpc = JsonRpcResponse.error_response(JsonRpcErrorCode.SERVER_ERROR, message, data=extra)
        return encode_json(rpc.model_dump())

    async def handle(self, message: dict[str, Any]) -> str:
        return encode_json(await self.rpc(message))


def _size(raw: str | bytes, limit: int) -> int:
    """Length of a message in bytes; a text shorter than ``limit / 4`` characters is not
    encoded to find out, since it cannot exceed ``limit`` (the estimate is then its length)."""
    if isinstance(raw, bytes) or 4 * len(raw) <= limit:
        return len(raw)
    return len(raw.encode(errors="surrogatepass"))


def _parse(raw: str | bytes, size: int) -> tuple[Any, ...]:
    try:
        message = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, deep nesting
        return ("error", WSErrorCode.INVALID_JSON, str(exc), 0)
    if not isinstance(message, dict):
        message = "a message must be a JSON object with a 'type'"
        return ("error", WSErrorCode.VALIDATION_ERROR, message, 0)
    return ("frame", message, size)


class WebSocketSessions:
    """The ``/ws`` ASGI endpoint and its sessions: cap, reaping, threads, shutdown."""

    def __init__(
        self,
        capacity: int,
        idle_timeout_s: float,
        max_message_bytes: int,
        env_factory: Callable[[], TraceFixEnvironment] | None = None,
        send_timeout_s: float = SEND_TIMEOUT_S,
        mcp: McpSessions | None = None,
    ) -> None:
        self.capacity = capacity
        self.mcp = mcp  # the MCP sessions (WebSocket /mcp, /ws?session_id=); None: no MCP
        self.idle_timeout_s = idle_timeout_s
        self.max_message_bytes = max_message_bytes
        self.env_factory = env_factory or _new_environment
        self.send_timeout_s = send_timeout_s
        self.executor = ThreadPoolExecutor(max_workers=capacity, thread_name_prefix="ws-session")
        self.closing = False
        self._live: dict[_Session, asyncio.Task[Any]] = {}
        self._abandon: asyncio.Future[None] | None = None
        self._all_closed: asyncio.Event | None = None

    def __len__(self) -> int:
        """Sessions holding a ``/ws`` slot (MCP sockets count against ``MCP_MAX_SESSIONS``)."""
        return sum(1 for session in self._live if session.mcp is None)

    @property
    def abandon(self) -> asyncio.Future[None]:
        """Resolved at shutdown: sessions stop waiting for their cancelled evaluations."""
        if self._abandon is None:
            self._abandon = asyncio.get_running_loop().create_future()
        return self._abandon

    def endpoint(self, session_type: type[_Session]) -> _Endpoint:
        """An ASGI app serving one WebSocket protocol with this manager's sessions."""
        return _Endpoint(self, session_type)

    async def serve(
        self, session_type: type[_Session], receive: Any, send: Any,
        scope: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        """Accept one connection and run its session, or refuse it (cap, shutdown)."""
        if (await receive())["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})
        if self.closing:
            message = "the server is shutting down"
            refusal = session_type.refusal(WSErrorCode.SESSION_ERROR, message)
            await _refuse(send, refusal, CLOSE_GOING_AWAY, message)
            return
        query = parse_qs((scope or {}).get("query_string", b"").decode(errors="replace"))
        attach_to = (query.get("session_id") or [""])[0] if session_type is _Session else ""
        if session_type is _McpSession or attach_to:
            await self._serve_mcp(session_type, receive, send, attach_to)
            return
        if len(self) >= self.capacity:
            count = len(self)
            message = (
                f"server at capacity: {count} of {self.capacity} WebSocket sessions are in "
                "use; retry later, close sessions you no longer need, or raise "
                "MAX_CONCURRENT_ENVS on the server"
            )
            reason = f"server at capacity ({count} of {self.capacity} sessions); retry later"
            extra = {"active_sessions": count, "max_sessions": self.capacity}
            refusal = session_type.refusal(WSErrorCode.CAPACITY_REACHED, message, **extra)
            await _refuse(send, refusal, CLOSE_TRY_AGAIN, reason)
            return
        try:
            session = session_type(self, receive, send)
        except Exception as exc:  # noqa: BLE001 - reported to the client, logged here
            log.exception("could not create an environment for a websocket session")
            message = f"could not create the environment: {exc}"
            refusal = session_type.refusal(WSErrorCode.FACTORY_ERROR, message)
            await _refuse(send, refusal, CLOSE_INTERNAL, message)
            return
        await self._run(session)

    async def _serve_mcp(
        self, session_type: type[_Session], receive: Any, send: Any, attach_to: str
    ) -> None:
        """A socket on an MCP session: a new one (WebSocket ``/mcp``), or the HTTP-made
        session ``attach_to`` (``/ws?session_id=``); neither takes a ``/ws`` slot."""
        store = self.mcp
        try:
            if store is None:
                raise McpSessionError("this server has no MCP sessions")
            mcp = store.attach(attach_to) if attach_to else store.create("websocket", True)
        except McpCapacityError as exc:
            extra = {"active_sessions": exc.active, "max_sessions": exc.capacity}
            refusal = session_type.refusal(WSErrorCode.CAPACITY_REACHED, str(exc), **extra)
            reason = f"MCP session limit reached ({exc.active} of {exc.capacity}); retry later"
            await _refuse(send, refusal, CLOSE_TRY_AGAIN, reason)
            return
        except McpSessionError as exc:
            refusal = session_type.refusal(WSErrorCode.SESSION_ERROR, str(exc))
            await _refuse(send, refusal, CLOSE_POLICY, str(exc))
            return
        owns = not attach_to
        try:
            await self._run(session_type(self, receive, send, mcp, owns_mcp=owns))
        finally:
            if owns:
                store.discard(mcp)
            else:
                store.detach(mcp)

    async def _run(self, session: _Session) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._live[session] = task
        try:
            await session.run()
        except asyncio.CancelledError:
            if not self.closing:
                raise
            # cancelled at shutdown (wait_closed, or uvicorn's backstop): end quietly
        except Exception:
            log.exception("websocket session %s failed", session.session_id)
            session.end(CLOSE_INTERNAL, "internal error")
            await session._close_socket()
        finally:
            self._live.pop(session, None)
            if not self._live and self._all_closed is not None:
                self._all_closed.set()

    def shut_down(self, reason: str = "server shutting down") -> None:
        """Refuse new sessions and end every live one with 1001 (their evaluations in
        flight are cancelled). Returns at once; :meth:`wait_closed` waits for the sockets."""
        self.closing = True
        if not self.abandon.done():
            self.abandon.set_result(None)
        for session in list(self._live):
            session.end(CLOSE_GOING_AWAY, reason)
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.mcp is not None:
            self.mcp.shut_down()

    async def wait_closed(self, timeout_s: float) -> int:
        """After :meth:`shut_down`: wait up to ``timeout_s`` for every session to end, then
        cancel those still stuck (a peer that reads nothing); returns how many were."""
        if not self._live:
            return 0
        self._all_closed = asyncio.Event()
        try:
            async with asyncio.timeout(timeout_s):
                await self._all_closed.wait()
            return 0
        except TimeoutError:
            stuck = list(self._live.values())
            for task in stuck:
                task.cancel()  # serve() ends quietly while closing
            await asyncio.wait(stuck, timeout=2 * CLOSING_SEND_TIMEOUT_S)
            return len(stuck)


class _Endpoint:
    """ASGI app of one WebSocket route (an object, so Starlette passes raw ASGI to it)."""

    def __init__(self, manager: WebSocketSessions, session_type: type[_Session]) -> None:
        self.manager = manager
        self.session_type = session_type

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self.manager.serve(self.session_type, receive, send, scope)


async def _refuse(send: Any, refusal: str, close_code: int, reason: str) -> None:
    """Send the ``refusal`` frame, then close with ``close_code``."""
    try:
        async with asyncio.timeout(SEND_TIMEOUT_S):
            await send({"type": "websocket.send", "text": refusal})
            await send({"type": "websocket.close", "code": close_code, "reason": _reason(reason)})
    except (OSError, RuntimeError, TimeoutError):
        pass


def _new_environment() -> TraceFixEnvironment:
    return TraceFixEnvironment(registry=get_registry(), sandbox=get_sandbox())


def register_ws_route(app: FastAPI, sessions: WebSocketSessions) -> None:
    """Replace openenv's WebSocket routes ``/ws`` and ``/mcp`` with ``sessions`` (kept as
    ``app.state.ws_sessions``); HTTP ``/mcp`` is ``server.routes``'."""
    app.router.routes[:] = [
        r for r in app.router.routes
        if not (isinstance(r, WebSocketRoute) and r.path in (PATH, MCP_PATH))
    ]  # fmt: skip
    app.router.routes.append(WebSocketRoute(PATH, sessions.endpoint(_Session)))
    app.router.routes.append(WebSocketRoute(MCP_PATH, sessions.endpoint(_McpSession)))
    app.state.ws_sessions = sessions
