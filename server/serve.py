"""Serving the app with uvicorn, and a graceful shutdown that is bounded in time.

On SIGTERM or SIGINT (uvicorn's own signal handling notices within 0.1 s), in this order:

1. stop accepting connections; HTTP requests that arrive from now on are answered 503;
2. close every WebSocket session with 1001 (Going Away) and a reason, cancelling the
   evaluation each has in flight (``server.ws``);
3. close the sandbox (kills every sandbox worker and child, so every evaluation still in
   flight ends at once, and removes this server's sandbox root) in a thread of its own, and
   wait for it up to ``SANDBOX_CLOSE_WAIT_S``;
4. give HTTP requests still running until ``HTTP_GRACE_S`` to answer (a step whose
   evaluation ended answers at once, saying it was not counted), then end the rest with 503
   (:class:`ShutdownGate`); only then close the HTTP episode store, so no request still
   running finds its episode gone; abort the connections whose peer reads nothing (their
   unsent data would hold uvicorn's shutdown);
5. uvicorn's own shutdown (closes idle keep-alive connections, runs the app's shutdown
   hooks), then the process exits.

Why: before this (issue 10), SIGTERM under load took 11 s, because uvicorn waited for every
request and session and then cancelled them, which logged a dozen ASGI tracebacks; and the
sandbox pool was never closed, so its directories stayed behind. Now nothing is cancelled by
uvicorn (its ``timeout_graceful_shutdown`` is only a backstop) and the whole shutdown takes
well under ``SHUTDOWN_BUDGET_S``.

The process then ends at once with ``os._exit``: threads still blocked in a sandbox call
(``concurrent.futures`` joins its threads at interpreter exit) must not hold the exit once
the sandbox is closed. On SIGTERM uvicorn re-raises the signal after its shutdown, so the
exit status is that of SIGTERM (143), as with plain uvicorn; on SIGINT it is 130.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn

from tracefix_rl.server.ws import WebSocketSessions

log = logging.getLogger("tracefix_rl.server")

SHUTDOWN_BUDGET_S = 3.0  # the required bound from SIGTERM to exit
# Deadlines, in seconds after the shutdown began (it begins within 0.1 s of the signal). The
# worst case adds up to 1.2 + 0.3 (cancelled requests answering) + 0.1 + 1.0 (uvicorn's
# backstop) = 2.6 s; measured (tests/test_shutdown.py) the whole shutdown takes about 0.15 s.
WS_CLOSE_WAIT_S = 0.5
HTTP_GRACE_S = 1.0
SANDBOX_CLOSE_WAIT_S = 1.2
CANCELLED_REQUEST_WAIT_S = 0.3
UVICORN_GRACE_S = 1  # uvicorn's timeout_graceful_shutdown: a backstop, never reached so far
SERVICE_UNAVAILABLE = 503
WS_HARD_LIMIT_FACTOR = 2  # uvicorn closes with 1009 above this many times max_request_bytes


class ShutdownGate:
    """ASGI middleware: once :meth:`close` is called, new HTTP requests are answered 503,
    and :meth:`drain` ends those still running with 503 after a grace period (cancelling a
    request here, instead of letting uvicorn do it, is what keeps tracebacks out of the log).
    WebSocket and lifespan traffic pass through untouched."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.closing = False
        self._in_flight: dict[asyncio.Task[Any], list[bool]] = {}
        self._cancelled: set[asyncio.Task[Any]] = set()

    def close(self) -> None:
        self.closing = True

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.closing:
            await _unavailable(send)
            return
        task = asyncio.current_task()
        assert task is not None
        started = [False]

        async def tracked_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                started[0] = True
            await send(message)

        self._in_flight[task] = started
        try:
            await self.app(scope, receive, tracked_send)
        except asyncio.CancelledError:
            if task not in self._cancelled:
                raise
            if not started[0]:
                await _unavailable(send)
        finally:
            self._in_flight.pop(task, None)

    async def drain(self, deadline: float) -> int:
        """Wait until ``deadline`` (``time.monotonic()``) for the HTTP requests in flight,
        then end the rest with 503; returns how many were ended that way."""
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        late = list(self._in_flight)
        for task in late:
            self._cancelled.add(task)
            task.cancel()
        if late:
            await asyncio.wait(late, timeout=CANCELLED_REQUEST_WAIT_S)
        return len(late)


async def _unavailable(send: Any) -> None:
    body = b'{"detail":"the server is shutting down; retry on another instance or later"}'
    await send({
        "type": "http.response.start",
        "status": SERVICE_UNAVAILABLE,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": body, "more_body": False})


class GracefulServer(uvicorn.Server):
    """``uvicorn.Server`` whose shutdown closes sessions, episodes and the sandbox first
    (see the module docstring); everything else is uvicorn's."""

    def __init__(
        self,
        config: uvicorn.Config,
        gate: ShutdownGate,
        sessions: WebSocketSessions,
        close_episodes: Callable[[], None],
        close_sandbox: Callable[[], None],
    ) -> None:
        super().__init__(config)
        self.gate = gate
        self.sessions = sessions
        self.close_episodes = close_episodes
        self.close_sandbox = close_sandbox

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        started = time.monotonic()
        for server in getattr(self, "servers", []):
            server.close()  # stop accepting; uvicorn closes them again, harmlessly
        self.gate.close()
        self.sessions.shut_down()
        sandbox_closed = _in_daemon_thread(self.close_sandbox, "sandbox-close")
        if stuck := await self.sessions.wait_closed(WS_CLOSE_WAIT_S):
            log.warning("ended %d WebSocket sessions whose peers took no data", stuck)
        try:
            remaining = started + SANDBOX_CLOSE_WAIT_S - time.monotonic()
            await asyncio.wait_for(asyncio.shield(sandbox_closed), max(0.0, remaining))
        except TimeoutError:
            log.warning("the sandbox is still closing after %.1f s", SANDBOX_CLOSE_WAIT_S)
        except Exception as exc:  # noqa: BLE001 - the shutdown goes on; the log says why
            log.error("closing the sandbox failed: %r", exc)
        ended = await self.gate.drain(started + HTTP_GRACE_S)
        if ended:
            log.warning("answered 503 to %d HTTP requests still running at shutdown", ended)
        try:  # only now: a request still running must not find its episode gone (404)
            self.close_episodes()
        except Exception as exc:  # noqa: BLE001 - the shutdown goes on; the log says why
            log.error("closing the HTTP episodes failed: %r", exc)
        for connection in list(self.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None and transport.get_write_buffer_size() > 0:
                transport.abort()  # its peer reads nothing; uvicorn would wait for it
        await super().shutdown(sockets)
        log.info("shut down in %.2f s", time.monotonic() - started)


def _in_daemon_thread(function: Callable[[], None], name: str) -> asyncio.Future[None]:
    """Run ``function`` in a daemon thread (the process may exit before it returns, unlike
    with the loop's default executor, which ``asyncio.run`` joins); its outcome as a future."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if not done.done():
            done.set_exception(error) if error else done.set_result(None)

    def target() -> None:
        error = None
        try:
            function()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            error = exc
        loop.call_soon_threadsafe(settle, error)

    threading.Thread(target=target, name=name, daemon=True).start()
    return done


def run(
    app: Any,
    *,
    host: str,
    port: int,
    log_level: str,
    max_message_bytes: int,
    ws_compression: bool,
    sessions: WebSocketSessions,
    close_episodes: Callable[[], None],
    close_sandbox: Callable[[], None],
) -> None:
    """Serve ``app`` until SIGTERM/SIGINT, shut down gracefully, and end the process."""
    gate = ShutdownGate(app)
    config = uvicorn.Config(
        gate,
        host=host,
        port=port,
        log_level=log_level,
        ws_max_size=WS_HARD_LIMIT_FACTOR * max_message_bytes,
        ws_per_message_deflate=ws_compression,
        timeout_graceful_shutdown=UVICORN_GRACE_S,
    )
    server = GracefulServer(config, gate, sessions, close_episodes, close_sandbox)
    status = 0
    try:
        server.run()
    except KeyboardInterrupt:  # SIGINT, re-raised by uvicorn once it has shut down
        status = 128 + signal.SIGINT
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
