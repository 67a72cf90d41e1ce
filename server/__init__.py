"""The tracefix_rl HTTP/WebSocket server (see ``server.app``)."""

from server import lazy_mcp

lazy_mcp.install()
