"""HTTP and WebSocket server for tracefix_rl.

Built on openenv-core's ``create_app`` (``/mcp``, ``/metadata``, ``/docs``, and the
``/web`` playground when ``ENABLE_WEB_INTERFACE`` is set), with these routes replaced or added:

* ``/ws``: WebSocket sessions (``server.ws``), openenv's protocol with a hard session cap,
  idle reaping that closes the socket, a message size limit, and cancellation of a
  disconnected client's evaluation.

* ``POST /reset``, ``POST /step``, ``GET /state``: *stateful* HTTP episodes. Upstream
  builds a new environment per HTTP request; here ``/reset`` stores the episode under its
  ``episode_id`` and ``/step`` continues the episode named by ``episode_id`` in the body
  (or, when absent, the one named by the cookie ``/reset`` set for this client; else 400).
* Every HTTP body over ``MAX_REQUEST_BYTES`` is answered 413 unread (``BodyLimit``), and
  every error answer is encodable JSON, never a 5xx for a bad request (``server.responses``).
* ``GET /schema`` with the real state schema, ``GET /health`` with sandbox and task facts,
  ``GET /tasks`` listing task ids for building datasets of reset arguments.

Configuration (environment variables): ``PORT`` (8000), ``HOST`` (0.0.0.0),
``MAX_CONCURRENT_ENVS`` (64 WebSocket sessions), ``SESSION_TIMEOUT_S`` (600, idle WS
sessions are reaped), ``HTTP_MAX_EPISODES`` (256), ``HTTP_EPISODE_TTL_S`` (600),
``HTTP_EPISODE_GRACE_S`` (300), ``MAX_REQUEST_BYTES`` (1 MiB),
``LOG_LEVEL`` (INFO); see also ``tasks.py`` and ``sandbox.py``.

Modules: ``routes`` (the HTTP routes), ``episodes`` (the HTTP episode store),
``middleware``, ``loader`` (tasks and sandbox load while the app is built), ``startup``,
``ws`` (the WebSocket sessions), ``serve`` (uvicorn and the graceful shutdown).
"""

from tracefix_rl import sandbox  # light; tracefix_rl.server already deferred the MCP runtime

sandbox.prewarm()  # the zygote workers boot while openenv and fastapi import below

from tracefix_rl import models  # noqa: F401  (before openenv: keeps gradio out, see models.py)

# isort: split

import argparse
import logging
import os
import sys

from fastapi import FastAPI
from openenv.core.env_server.http_server import create_app
from openenv.core.env_server.types import ConcurrencyConfig

from tracefix_rl.environment import TraceFixEnvironment
from tracefix_rl.models import TraceFixAction, TraceFixObservation
from tracefix_rl.server import serve, startup
from tracefix_rl.server.episodes import HttpEpisodes
from tracefix_rl.server.loader import TaskLoader
from tracefix_rl.server.middleware import BodyLimit, QuietWebSocketClose
from tracefix_rl.server.responses import install_error_handlers
from tracefix_rl.server.routes import register_http_routes
from tracefix_rl.server.ws import WebSocketSessions, register_ws_route

log = logging.getLogger("tracefix_rl.server")

DEFAULT_PORT = 8000
DEFAULT_HOST = "0.0.0.0"
DEFAULT_MAX_CONCURRENT_ENVS = 64
DEFAULT_SESSION_TIMEOUT_S = 600.0
DEFAULT_HTTP_MAX_EPISODES = 256
DEFAULT_HTTP_EPISODE_TTL_S = 600.0
# A full store evicts an unfinished episode only after this long without a step. It must
# outlast an agent's slowest normal pause between steps: inference.py's worst case is
# LLM_TIMEOUT_S 60 s x (1 + LLM_MAX_RETRIES 3) plus backoff, about 245 s. Evicting loses an
# agent's episode for good, while a 503 carries Retry-After and costs a retry, so the grace
# errs long; at half the TTL it still bounds a lockout by idle episodes to 5 minutes.
DEFAULT_HTTP_EPISODE_GRACE_S = 300.0
DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SystemExit(f"{name} must be a number, got {raw!r}") from None
    if value <= 0:
        raise SystemExit(f"{name} must be positive, got {raw!r}")
    return value


def create_tracefix_app() -> FastAPI:
    """Build the ASGI app and register every route; tasks and sandbox load meanwhile and
    are ready before the server accepts its first connection."""
    loader = TaskLoader()
    concurrency = ConcurrencyConfig(
        max_concurrent_envs=int(_env_number("MAX_CONCURRENT_ENVS", DEFAULT_MAX_CONCURRENT_ENVS)),
        session_timeout=_env_number("SESSION_TIMEOUT_S", DEFAULT_SESSION_TIMEOUT_S),
    )
    app = create_app(
        TraceFixEnvironment,
        TraceFixAction,
        TraceFixObservation,
        env_name="tracefix_rl",
        concurrency_config=concurrency,
    )
    ttl_s = _env_number("HTTP_EPISODE_TTL_S", DEFAULT_HTTP_EPISODE_TTL_S)
    episodes = HttpEpisodes(
        capacity=int(_env_number("HTTP_MAX_EPISODES", DEFAULT_HTTP_MAX_EPISODES)),
        ttl_s=ttl_s,
        grace_s=min(ttl_s, _env_number("HTTP_EPISODE_GRACE_S", DEFAULT_HTTP_EPISODE_GRACE_S)),
    )
    app.state.http_episodes = episodes
    # Largest HTTP body or WebSocket message accepted (the code file itself is capped at
    # 20,000 characters, so 1 MiB leaves ample room for JSON escaping).
    app.state.max_request_bytes = int(_env_number("MAX_REQUEST_BYTES", DEFAULT_MAX_REQUEST_BYTES))
    app.router.on_startup.insert(0, loader.wait)
    app.add_middleware(QuietWebSocketClose)
    app.add_middleware(BodyLimit, max_bytes=app.state.max_request_bytes)
    install_error_handlers(app)
    register_http_routes(app, episodes)
    sessions = WebSocketSessions(
        capacity=concurrency.max_concurrent_envs,
        idle_timeout_s=concurrency.session_timeout or DEFAULT_SESSION_TIMEOUT_S,
        max_message_bytes=app.state.max_request_bytes,
    )
    register_ws_route(app, sessions)
    app.openapi_schema = None
    return app


with startup.no_pydantic_v1():
    app = create_tracefix_app()


def main() -> None:
    """Console entry point: ``server [--host H] [--port P]``."""
    parser = argparse.ArgumentParser(prog="server", description="Run the tracefix_rl server.")
    parser.add_argument("--host", default=os.environ.get("HOST", DEFAULT_HOST))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", DEFAULT_PORT)))
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO").upper())
    args = parser.parse_args()
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    log.info("starting on %s:%d", args.host, args.port)
    serve.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level.lower(),
        max_message_bytes=app.state.max_request_bytes,
        ws_compression=os.environ.get("WS_COMPRESSION", "").strip().lower() in ("1", "true", "yes"),
        sessions=app.state.ws_sessions,
        close_episodes=app.state.http_episodes.close,
        close_sandbox=sandbox.close_sandbox,
    )


if __name__ == "__main__":
    main()
