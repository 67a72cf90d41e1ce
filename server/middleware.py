"""ASGI middleware of the tracefix_rl server."""

from __future__ import annotations

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
