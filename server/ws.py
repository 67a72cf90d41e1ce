"""The WebSocket endpoints ``/ws`` (and openenv's ``/mcp``): one environment per connection,
with a hard session cap shared by both.

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

openenv's WebSocket ``/mcp`` (bare JSON-RPC, answered as openenv answers for an environment
without MCP tools) runs on the same sessions (:class:`_McpSession`), so it counts against the
same cap; openenv served it outside any cap. HTTP ``POST /mcp`` stays openenv's.

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

from fastapi import FastAPI
from openenv.core.env_server.mcp_types import (
    JsonRpcErrorCode,
    JsonRpcRequest,
    JsonRpcResponse,
    McpMethod,
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
from tracefix_rl.tasks import TaskSelectionError, get_registry

log = logging.getLogger("tracefix_rl.server.ws")

PATH = "/ws"
MCP_PATH = "/mcp"  # openenv's JSON-RPC-over-WebSocket endpoint (see _McpSession)

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


def mcp_reply(payload: dict[str, Any], session_id: str) -> dict[str, Any]:
    """What openenv 0.10's ``mcp_handler`` answers over ``/ws`` for an environment without MCP
    tools (tracefix_rl has none). ``openenv/session/close`` of another id answers "Unknown
    session_id", as openenv does for any id not opened over HTTP ``/mcp``."""
    try:
        request = JsonRpcRequest(**payload)
    except Exception as exc:  # noqa: BLE001 - openenv answers every failure this way
        return JsonRpcResponse.error_response(
            JsonRpcErrorCode.INVALID_REQUEST, f"Invalid request: {exc}"
        ).model_dump()
    method, request_id, params = request.method, request.id, request.params
    if method == "openenv/session/create":
        response = JsonRpcResponse.success({"session_id": session_id}, request_id=request_id)
    elif method == "openenv/session/close":
        target = params.get("session_id")
        if not target:
            response = JsonRpcResponse.error_response(
                JsonRpcErrorCode.INVALID_PARAMS,
                "Invalid params - 'session_id' is required",
                request_id=request_id,
            )
        elif target == session_id:
            response = JsonRpcResponse.error_response(
                JsonRpcErrorCode.INVALID_REQUEST,
                "Cannot close active WebSocket-managed session via MCP method",
                request_id=request_id,
            )
        else:
            response = JsonRpcResponse.error_response(
                JsonRpcErrorCode.INVALID_PARAMS,
                f"Unknown session_id: {target}",
                request_id=request_id,
            )
    elif method == McpMethod.TOOLS_CALL and not params.get("name"):
        response = JsonRpcResponse.error_response(
            JsonRpcErrorCode.INVALID_PARAMS, "Missing 'name' in params", request_id=request_id
        )
    elif method in (McpMethod.TOOLS_LIST, McpMethod.TOOLS_CALL):
        response = JsonRpcResponse.error_response(
            JsonRpcErrorCode.INTERNAL_ERROR,
            "Environment does not support MCP",
            request_id=request_id,
        )
    else:
        response = JsonRpcResponse.error_response(
            JsonRpcErrorCode.METHOD_NOT_FOUND, f"Method not found: {method}", request_id=request_id
        )
    return response.model_dump()


class _Gone(Exception):
    """The session ended (disconnect, close frame, shutdown) while a call was in flight."""


class _Session:
    """One accepted connection: its environment, its receiver task and its reply loop."""

    def __init__(self, manager: WebSocketSessions, receive: Any, send: Any) -> None:
        self.manager = manager
        self.receive = receive
        self.send = send
        self.session_id = str(uuid.uuid4())
        self.env = manager.env_factory()
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
        self.env.close()

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

    async def run(self) -> None:
        idle_s = self.manager.idle_timeout_s
        receiver = self.loop.create_task(self.receive_frames())
        try:
            while not self.gone.done():
                try:
                    async with asyncio.timeout(idle_s):
                        item = await self.inbox.get()
                except TimeoutError:
                    reason = f"idle for {idle_s:g} s (SESSION_TIMEOUT_S); reconnect and reset"
                    self.end(CLOSE_IDLE, reason)
                    log.info("websocket session %s reaped after %g s idle", self.session_id, idle_s)
                    break
                if item[0] == "end" or self.gone.done():
                    break
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
                    return encode_frame("mcp", mcp_reply(data, self.session_id))
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

    async def call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``function`` in the session threads; if the session ends meanwhile, cancel
        the environment's evaluation and raise :class:`_Gone`."""
        future = self.loop.run_in_executor(self.manager.executor, lambda: function(*args, **kwargs))
        self.running = future
        await asyncio.wait((future, self.gone), return_when=asyncio.FIRST_COMPLETED)
        if self.gone.done():  # end() has cancelled the evaluation; nobody awaits a reply
            raise _Gone
        self.running = None
        return future.result()


class _McpSession(_Session):
    """openenv 0.3's WebSocket ``/mcp`` protocol: bare JSON-RPC requests and responses, with
    openenv's answers for an environment without MCP tools. openenv gave each connection an
    environment outside the ``/ws`` cap; here it is a session like any other (cap, reaping,
    limits, shutdown)."""

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
        return encode_json(mcp_reply(message, self.session_id))


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
    ) -> None:
        self.capacity = capacity
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
        return len(self._live)

    @property
    def abandon(self) -> asyncio.Future[None]:
        """Resolved at shutdown: sessions stop waiting for their cancelled evaluations."""
        if self._abandon is None:
            self._abandon = asyncio.get_running_loop().create_future()
        return self._abandon

    def endpoint(self, session_type: type[_Session]) -> _Endpoint:
        """An ASGI app serving one WebSocket protocol with this manager's sessions."""
        return _Endpoint(self, session_type)

    async def serve(self, session_type: type[_Session], receive: Any, send: Any) -> None:
        """Accept one connection and run its session, or refuse it (cap, shutdown)."""
        if (await receive())["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})
        if self.closing:
            message = "the server is shutting down"
            refusal = session_type.refusal(WSErrorCode.SESSION_ERROR, message)
            await _refuse(send, refusal, CLOSE_GOING_AWAY, message)
            return
        if len(self._live) >= self.capacity:
            count = len(self._live)
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
        await self.manager.serve(self.session_type, receive, send)


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
    ``app.state.ws_sessions``); the HTTP ``POST /mcp`` stays openenv's."""
    app.router.routes[:] = [
        r for r in app.router.routes
        if not (isinstance(r, WebSocketRoute) and r.path in (PATH, MCP_PATH))
    ]  # fmt: skip
    app.router.routes.append(WebSocketRoute(PATH, sessions.endpoint(_Session)))
    app.router.routes.append(WebSocketRoute(MCP_PATH, sessions.endpoint(_McpSession)))
    app.state.ws_sessions = sessions
