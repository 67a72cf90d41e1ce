"""The tracefix_rl HTTP/WebSocket server (see ``tracefix_rl.server.app``)."""

from tracefix_rl.server import startup

startup.defer_mcp_runtime()

SERVER_MODULE = "tracefix_rl.server.app"  # run it with ``python -m``
