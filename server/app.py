"""HTTP and WebSocket server for tracefix_rl.

Built on openenv-core's ``create_app`` (``/ws`` sessions, ``/mcp``, ``/metadata``,
``/docs``, and the ``/web`` playground when ``ENABLE_WEB_INTERFACE`` is set), with
these routes replaced or added:

* ``POST /reset``, ``POST /step``, ``GET /state``: *stateful* HTTP episodes. Upstream
  builds a new environment per HTTP request; here ``/reset`` stores the episode under its
  ``episode_id`` and ``/step`` continues the episode named by ``episode_id`` in the body
  (or, when absent, the most recent HTTP episode).
* ``GET /schema`` with the real state schema, ``GET /health`` with sandbox and task facts,
  ``GET /tasks`` listing task ids for building datasets of reset arguments.

Configuration (environment variables): ``PORT`` (8000), ``HOST`` (0.0.0.0),
``MAX_CONCURRENT_ENVS`` (64 WebSocket sessions), ``SESSION_TIMEOUT_S`` (600, idle WS
sessions are reaped), ``HTTP_MAX_EPISODES`` (256), ``HTTP_EPISODE_TTL_S`` (600),
``LOG_LEVEL`` (INFO); see also ``tasks.py`` and ``sandbox.py``.

Modules: ``routes`` (the HTTP routes), ``episodes`` (the HTTP episode store),
``middleware``, ``loader`` (tasks and sandbox load while the app is built), ``startup``.
"""

import sandbox  # light; the package import also defers the MCP runtime (server/startup.py)

sandbox.prewarm()  # the zygote workers boot while openenv and fastapi import below

import models  # noqa: F401  (before openenv: keeps gradio out unless the web UI is on)

# isort: split

import argparse
import logging
import os
import sys

import uvicorn
from fastapi import FastAPI
from openenv.core.env_server.http_server import create_app
from openenv.core.env_server.types import ConcurrencyConfig

from environment import TraceFixEnvironment
from models import TraceFixAction, TraceFixObservation
from server import startup
from server.episodes import HttpEpisodes
from server.loader import TaskLoader
from server.middleware import QuietWebSocketClose
from server.routes import register_http_routes

log = logging.getLogger("tracefix_rl.server")

DEFAULT_PORT = 8000
DEFAULT_HOST = "0.0.0.0"
DEFAULT_MAX_CONCURRENT_ENVS = 64
DEFAULT_SESSION_TIMEOUT_S = 600.0
DEFAULT_HTTP_MAX_EPISODES = 256
DEFAULT_HTTP_EPISODE_TTL_S = 600.0
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
    episodes = HttpEpisodes(
        capacity=int(_env_number("HTTP_MAX_EPISODES", DEFAULT_HTTP_MAX_EPISODES)),
        ttl_s=_env_number("HTTP_EPISODE_TTL_S", DEFAULT_HTTP_EPISODE_TTL_S),
    )
    app.state.http_episodes = episodes
    # Largest HTTP body or WebSocket message accepted (the code file itself is capped at
    # 20,000 characters, so 1 MiB leaves ample room for JSON escaping).
    app.state.max_request_bytes = int(_env_number("MAX_REQUEST_BYTES", DEFAULT_MAX_REQUEST_BYTES))
    app.router.on_startup.insert(0, loader.wait)
    app.add_middleware(QuietWebSocketClose)
    register_http_routes(app, episodes)
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
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower())


if __name__ == "__main__":
    main()
