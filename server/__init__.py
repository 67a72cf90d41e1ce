"""The tracefix_rl HTTP/WebSocket server (see ``server.app``)."""

from server import startup

startup.defer_mcp_runtime()
