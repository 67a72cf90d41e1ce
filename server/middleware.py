"""ASGI middleware of the tracefix_rl server: the request body limit (:class:`BodyLimit`) and
quiet WebSocket closes (:class:`QuietWebSocketClose`)."""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.websockets import WebSocketDisconnect
from uvicorn.protocols.utils import ClientDisconnected

log = logging.getLogger("tracefix_rl.server")


class QuietWebSocketClose:
    """ASGI middleware: a WebSocket peer that already left is not a server error.

    openenv-core 0.3's ``/ws`` handler closes the socket after the client's ``close``
    message, and the stock client hangs up at once, so nearly every session ended with
    ``WebSocketDisconnect`` escaping to uvicorn, which logged a full traceback at ERROR
    (huggingface/OpenEnv#1159) and spent a third of the server's CPU formatting them at 512
    sessions. The session is already torn down by then; this records it at DEBUG instead.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        except (WebSocketDisconnect, ClientDisconnected) as exc:
            log.debug("websocket %s: peer had already closed (%r)", scope.get("path"), exc)


REQUEST_TOO_LARGE = 413


def declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The request's Content-Length, or None when it has none (chunked) or it is unreadable
    (uvicorn's h11 parser has already refused a malformed one with 400)."""
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def has_header(headers: list[tuple[bytes, bytes]], wanted: bytes) -> bool:
    return any(name.lower() == wanted for name, _ in headers)


class BodyLimit:
    """ASGI middleware: an HTTP request body over ``max_bytes`` is answered 413 and never
    read into memory.

    Measured before it (issue 10): four concurrent 100 MB POSTs took the server to 677 MB
    RSS, because FastAPI reads a whole body into memory before it validates it. Now:

    * a ``Content-Length`` over the limit is answered at once, before the app runs and before
      a byte of the body is read. The connection stays open, and uvicorn discards the bytes
      the client still sends (no buffering), so the client gets the 413 once its upload is
      done, the way HTTP/1.1 clients read an answer (closing at once instead made each of
      four concurrent 100 MB httpx uploads fail with ``ReadError``, never seeing the 413).
      Measured: the four uploads grew the server's RSS by 1 MB, against 800 MB before;
    * a chunked or undeclared body is counted as the app reads it. The message that passes
      the limit is not handed on: the 413 goes out with ``Connection: close``, so the server
      stops reading at once (an undeclared body has no end to wait for; a client still
      sending may see the reset rather than the 413), the app sees ``http.disconnect``, and
      whatever it answers afterwards is dropped;
    * a chunked body the app answers without reading to its end (a 405, ``GET /health``)
      gets ``Connection: close`` on that answer, for the same reason: uvicorn would otherwise
      go on discarding it for as long as the client sends.

    The answer is JSON ``{"detail": ...}``. WebSocket messages are not HTTP bodies and pass.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _refusal(self, size: str, close: bool) -> tuple[dict, dict]:
        body = json.dumps({
            "detail": f"the request body ({size}) is larger than the limit of {self.max_bytes} "
                      "bytes (MAX_REQUEST_BYTES)",
        }).encode()  # fmt: skip
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        if close:
            headers.append((b"connection", b"close"))
        start = {"type": "http.response.start", "status": REQUEST_TOO_LARGE, "headers": headers}
        return start, {"type": "http.response.body", "body": body, "more_body": False}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = declared_length(scope["headers"])
        if declared is not None and declared > self.max_bytes:
            log.info("%s %s: refused a %d-byte body", scope["method"], scope["path"], declared)
            for message in self._refusal(f"{declared} bytes", close=False):
                await send(message)
            return

        received = 0
        body_done = declared is not None or not has_header(scope["headers"], b"transfer-encoding")
        started = False  # the app has begun its response
        refused = False  # this middleware has sent the 413

        async def limited_receive() -> dict:
            nonlocal received, refused, body_done
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                body_done = body_done or not message.get("more_body", False)
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    log.info("%s %s: refused a body past %d bytes", scope["method"],
                             scope["path"], self.max_bytes)  # fmt: skip
                    if not started:
                        refused = True
                        refusal = self._refusal(f"more than {self.max_bytes} bytes", close=True)
                        for reply in refusal:
                            await send(reply)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict) -> None:
            nonlocal started
            if refused:
                return  # the 413 is out; the app's answer to the cut-off body is dropped
            if message["type"] == "http.response.start":
                started = True
                if not body_done:  # an unread chunked body: do not let uvicorn drain it
                    message = {**message, "headers": [*message.get("headers", ()),
                                                      (b"connection", b"close")]}  # fmt: skip
            await send(message)

        await self.app(scope, limited_receive, guarded_send)
