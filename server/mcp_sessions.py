"""MCP sessions: every session of the MCP tools (``server.mcp``), whichever transport opened
it, with a limit of its own, idle reaping, one call at a time, and threads of their own.

Contract:

* **One limit for every kind** (``MCP_MAX_SESSIONS``): ``openenv/session/create`` and
  streamable-HTTP ``initialize`` on ``POST /mcp``, and WebSocket ``/mcp`` connections. An MCP
  session never takes a ``/ws`` slot (``MAX_CONCURRENT_ENVS``) or an HTTP episode slot, and
  a ``/ws`` socket attached to one (``/ws?session_id=``) takes none either. Over the limit,
  :meth:`McpSessions.create` raises :class:`McpCapacityError`, whose message names the limit
  and what to do, and whose :meth:`~McpCapacityError.response` is the JSON-RPC error
  (-32000, with ``active_sessions`` and ``max_sessions``).
* **Unused sessions go quickly.** A session in which no episode has started is closed after
  ``MCP_IDLE_TIMEOUT_S`` without a request; one with an episode after ``SESSION_TIMEOUT_S``.
  Expired sessions are reaped before every creation and by a background task (at least
  every ``REAP_INTERVAL_MAX_S``). A session a WebSocket drives is left to that socket, which
  ``server.ws`` reaps by the same two limits, and a session with a call running is never
  reaped.
* **One call at a time per session**, from any transport (HTTP tool calls and the attached
  socket share the environment), in a thread pool of ``MCP_MAX_SESSIONS`` threads; the lock
  is held until the thread returns, even if the caller went away.
* **Closing** (``openenv/session/close``, ``DELETE /mcp``, reaping, shutdown) closes the
  environment, cancelling its evaluation in flight; a session a WebSocket drives is closed
  when that socket detaches.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from openenv.core.env_server.mcp_types import JsonRpcErrorCode, JsonRpcResponse

from tracefix_rl.environment import TraceFixEnvironment

log = logging.getLogger("tracefix_rl.server.mcp")

T = TypeVar("T")

REAP_INTERVAL_MAX_S = 5.0


class McpCapacityError(Exception):
    """Every ``MCP_MAX_SESSIONS`` session is in use."""

    def __init__(self, active: int, capacity: int) -> None:
        super().__init__(
            f"MCP session limit reached: {active} of {capacity} MCP sessions are in use "
            "(MCP_MAX_SESSIONS). Close sessions you no longer need (openenv/session/close, "
            "or DELETE /mcp with Mcp-Session-Id), retry after MCP_IDLE_TIMEOUT_S, when unused "
            "sessions are closed, or play over /ws or /reset and /step instead."
        )
        self.active = active
        self.capacity = capacity

    def response(self, request_id: Any = None) -> JsonRpcResponse:
        return JsonRpcResponse.error_response(
            JsonRpcErrorCode.SERVER_ERROR, str(self), request_id=request_id,
            data={"active_sessions": self.active, "max_sessions": self.capacity},
        )  # fmt: skip


class McpSessionError(Exception):
    """A session that cannot be used as asked (unknown, closed, already attached)."""


class McpSession:
    """One MCP session: an environment, the lock that runs its calls one at a time, and
    when it was last used."""

    def __init__(self, store: McpSessions, env: TraceFixEnvironment, kind: str) -> None:
        self.store = store
        self.session_id = uuid.uuid4().hex
        self.env = env
        self.kind = kind
        self.lock = asyncio.Lock()
        self.last_used = time.monotonic()
        self.attached = False  # a WebSocket drives it (and reaps it by /ws's rules)
        self.close_pending = False  # closed when that WebSocket detaches
        self.closed = False
        self.protocol_version: str | None = None

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def idle_limit(self) -> tuple[float, str]:
        """How long this session may stay idle, and the setting that says so."""
        if self.env.episode is None:
            return self.store.idle_timeout_s, "MCP_IDLE_TIMEOUT_S: no episode was started"
        return self.store.session_timeout_s, "SESSION_TIMEOUT_S"

    def idle_for_s(self, limit_s: float) -> float:
        """Seconds left before this session has been idle for ``limit_s`` (requests over
        any transport count)."""
        return max(0.0, self.last_used + limit_s - time.monotonic())

    def expired(self, now: float) -> bool:
        busy = self.attached or self.lock.locked()
        return not busy and now - self.last_used > self.idle_limit()[0]

    def submit(self, function: Callable[[], T]) -> asyncio.Future[T]:
        """Run ``function`` in the store's threads; the caller holds :attr:`lock`, which is
        released when the thread is done (not when an awaiting task is cancelled)."""
        loop = asyncio.get_running_loop()
        try:
            done: Future[T] = self.store.executor.submit(function)
        except RuntimeError:  # the pool is shut down: the server is stopping
            self.lock.release()
            raise McpSessionError("the server is shutting down") from None

        def finished() -> None:
            self.touch()
            self.lock.release()

        def from_thread(_: Future[T]) -> None:
            try:
                loop.call_soon_threadsafe(finished)
            except RuntimeError:  # the loop is closed: nobody waits for the lock any more
                pass

        done.add_done_callback(from_thread)
        return asyncio.wrap_future(done, loop=loop)

    async def run_call(self, function: Callable[[], T]) -> T:
        """Run ``function`` after the calls before it, in a thread (used by ``POST /mcp``)."""
        await self.lock.acquire()
        return await self.submit(function)


class McpSessions:
    """Every MCP session of the server: the limit, idle reaping, the threads, shutdown."""

    def __init__(
        self,
        capacity: int,
        idle_timeout_s: float,
        session_timeout_s: float,
        env_factory: Callable[[], TraceFixEnvironment],
    ) -> None:
        self.capacity = capacity
        self.idle_timeout_s = idle_timeout_s
        self.session_timeout_s = session_timeout_s
        self.env_factory = env_factory
        self.executor = ThreadPoolExecutor(max_workers=capacity, thread_name_prefix="mcp-session")
        self.closing = False
        self._sessions: dict[str, McpSession] = {}
        self._reaper: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, kind: str, attached: bool = False) -> McpSession:
        """A new session, or :class:`McpCapacityError` (expired sessions are reaped first);
        ``attached``: a WebSocket drives it from the start (and reaps it)."""
        if self.closing:
            raise McpSessionError("the server is shutting down")
        self.reap()
        if len(self._sessions) >= self.capacity:
            raise McpCapacityError(len(self._sessions), self.capacity)
        session = McpSession(self, self.env_factory(), kind)
        session.attached = attached
        self._sessions[session.session_id] = session
        self._start_reaper()
        log.debug("MCP session %s opened (%s)", session.session_id, kind)
        return session

    def get(self, session_id: str) -> McpSession | None:
        """The open session ``session_id`` (marked used), else None."""
        session = self._sessions.get(session_id)
        if session is not None:
            session.touch()
        return session

    def attach(self, session_id: str) -> McpSession:
        """Let a WebSocket drive ``session_id`` (one at a time)."""
        session = self._sessions.get(session_id)
        if session is None:
            raise McpSessionError(f"Unknown session_id: {session_id}")
        if session.attached:
            raise McpSessionError(f"Session {session_id} already has an attached WebSocket")
        session.attached = True
        session.touch()
        return session

    def detach(self, session: McpSession) -> None:
        session.attached = False
        session.touch()
        if session.close_pending:
            self.discard(session)

    def close(self, session_id: str) -> str:
        """Close ``session_id``: ``closed``, ``closing`` (when its WebSocket detaches) or
        ``unknown``."""
        session = self._sessions.get(session_id)
        if session is None:
            return "unknown"
        if session.attached:
            session.close_pending = True
            return "closing"
        self.discard(session)
        return "closed"

    def discard(self, session: McpSession) -> None:
        """Forget ``session`` and close its environment (an evaluation in flight is
        cancelled; the thread running it releases the session's lock when it returns)."""
        if self._sessions.get(session.session_id) is session:
            del self._sessions[session.session_id]
        if not session.closed:
            session.closed = True
            session.env.close()
            log.debug("MCP session %s closed", session.session_id)

    def reap(self) -> int:
        """Close the sessions idle past their limit; how many there were."""
        now = time.monotonic()
        expired = [s for s in self._sessions.values() if s.expired(now)]
        for session in expired:
            seconds, why = session.idle_limit()
            log.info("MCP session %s reaped after %g s idle (%s)", session.session_id, seconds,
                     why)  # fmt: skip
            self.discard(session)
        return len(expired)

    def _start_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())

    async def _reap_forever(self) -> None:
        interval = min(REAP_INTERVAL_MAX_S, self.idle_timeout_s / 4, self.session_timeout_s / 4)
        while self._sessions and not self.closing:
            await asyncio.sleep(interval)
            self.reap()

    def shut_down(self) -> None:
        """Refuse new sessions and close every one (their evaluations are cancelled)."""
        self.closing = True
        if self._reaper is not None:
            self._reaper.cancel()
        for session in list(self._sessions.values()):
            self.discard(session)
        self.executor.shutdown(wait=False, cancel_futures=True)
