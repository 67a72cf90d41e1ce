"""HTTP and WebSocket server for tracefix_rl: the app factory and the ``server`` command.

Built on openenv's FastAPI app (``/metadata``, ``/docs``, the Task API), with these routes
replaced or added:

* ``/web``: the playground (``server.playground``), mounted through openenv's
  ``gradio_builder`` hook when ``ENABLE_WEB_INTERFACE`` is set; ``/`` redirects to it, and to
  ``/docs`` without it (``server.routes``).
* ``/ws``: WebSocket sessions (``server.ws``), openenv's protocol with a hard session cap,
  idle reaping that closes the socket, a message size limit, and cancellation of a
  disconnected client's evaluation.
* ``POST /reset``, ``POST /step``, ``GET /state``: *stateful* HTTP episodes (``server.routes``,
  stored by ``server.episodes``), keyed by ``episode_id`` or the cookie ``/reset`` sets.
* Every HTTP body over ``MAX_REQUEST_BYTES`` is answered 413 unread (``server.middleware``),
  and every error answer is encodable JSON, never a 5xx for a bad request
  (``server.responses``).
* ``GET /schema`` with the real state schema, ``GET /health`` with sandbox and task facts,
  ``GET /tasks`` listing task ids for building datasets of reset arguments.
* ``/mcp``: MCP tools (``server.mcp``: ``start_episode`` and one per action) over HTTP
  (``server.routes``: MCP's streamable HTTP and OpenEnv's JSON-RPC) and WebSocket
  (``server.ws``), in MCP sessions of their own (``MCP_MAX_SESSIONS``), apart from the
  ``/ws`` and HTTP episode slots.

Configuration: ``tracefix_rl.settings`` (docs/configuration.md), read once.

How it starts (``main()``, the ``server`` command and ``python -m tracefix_rl.server.app``):

1. read and validate the settings; a bad value ends the process with a message naming the
   variable (exit status 1, no traceback);
2. start the sandbox workers and the task loading in a thread (``server.loader``);
3. meanwhile import and build the app (:func:`create_tracefix_app`);
4. serve it (``server.serve``): the app's lifespan waits for the tasks before uvicorn
   accepts a connection; SIGTERM/SIGINT shut down gracefully and close the sandbox.

Importing this module starts nothing and imports only light modules (the app's modules are
imported when an app is built). ``app``, the module attribute that ``openenv.yaml``
(``server.app:app``) and ``uvicorn tracefix_rl.server.app:app`` use, is built from the
environment's settings on first access; its lifespan then starts the workers and loads the
tasks, and closes the sandbox at shutdown.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tracefix_rl import sandbox
from tracefix_rl.server.loader import TaskLoader, install_lifespan
from tracefix_rl.settings import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger("tracefix_rl.server")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ENV_NAME = "tracefix_rl"


def create_tracefix_app(settings: Settings, loader: TaskLoader | None = None) -> FastAPI:
    """Build the ASGI app configured by ``settings``; starts nothing.

    Its lifespan starts ``loader`` (a new :class:`TaskLoader` of ``settings`` when None;
    ``main()`` passes the one it already started), waits for the tasks before the server
    accepts connections, and closes the sandbox at shutdown. ``app.state`` holds
    ``http_episodes``, ``ws_sessions`` (which also shuts the MCP sessions down) and
    ``max_request_bytes`` for ``server.serve``.
    """
    # The app's modules are imported here, not at the top: main() starts the sandbox
    # workers first, so they boot while these import (bench/coldstart_bench.py).
    from tracefix_rl import models  # noqa: F401  (before openenv: keeps gradio out)

    # isort: split

    from openenv.core.env_server.types import ConcurrencyConfig

    from tracefix_rl.environment import TraceFixEnvironment
    from tracefix_rl.models import TraceFixAction, TraceFixObservation
    from tracefix_rl.server import startup
    from tracefix_rl.server.episodes import EpisodeStore, HttpEpisodes
    from tracefix_rl.server.mcp_sessions import McpSessions
    from tracefix_rl.server.middleware import BodyLimit, QuietWebSocketClose
    from tracefix_rl.server.responses import install_error_handlers
    from tracefix_rl.server.routes import register_http_routes, register_mcp_routes
    from tracefix_rl.server.ws import WebSocketSessions, register_ws_route

    loader = loader or TaskLoader(settings)

    def new_environment() -> TraceFixEnvironment:
        """An environment of ``settings``' episode length, in the sandbox and task registry
        the lifespan loaded. openenv makes a few while the app is built, to inspect them;
        those have neither (and would fall back to the process-wide ones if used)."""
        return TraceFixEnvironment(registry=loader.registry, sandbox=loader.sandbox,
                                   max_steps=settings.max_steps)  # fmt: skip

    concurrency = ConcurrencyConfig(
        max_concurrent_envs=settings.max_concurrent_envs,
        session_timeout=settings.session_timeout_s,
    )
    with startup.no_pydantic_v1():
        app = _openenv_app(settings, loader, new_environment, TraceFixAction,
                           TraceFixObservation, concurrency)  # fmt: skip
        ttl_s = settings.http_episode_ttl_s
        bounds = {"capacity": settings.http_max_episodes, "ttl_s": ttl_s,
                  "grace_s": min(ttl_s, settings.http_episode_grace_s)}  # fmt: skip
        checks = []
        if settings.episode_store == "memory":
            episodes: EpisodeStore = HttpEpisodes(**bounds)
        else:
            from tracefix_rl.server.redis_episodes import RedisEpisodes

            episodes = RedisEpisodes(settings.episode_store, new_environment=new_environment,
                                     **bounds)  # fmt: skip
            checks.append(episodes.wait_until_reachable)
        app.state.http_episodes = episodes
        app.state.max_request_bytes = settings.max_request_bytes
        install_lifespan(app, loader, checks)
        app.add_middleware(QuietWebSocketClose)
        app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
        install_error_handlers(app)
        register_http_routes(app, episodes, new_environment)
        mcp_sessions = McpSessions(
            capacity=settings.mcp_max_sessions,
            idle_timeout_s=settings.mcp_idle_timeout_s,
            session_timeout_s=settings.session_timeout_s,
            env_factory=new_environment,
        )
        register_mcp_routes(app, mcp_sessions)
        sessions = WebSocketSessions(
            capacity=settings.max_concurrent_envs,
            idle_timeout_s=settings.session_timeout_s,
            max_message_bytes=settings.max_request_bytes,
            env_factory=new_environment,
            mcp=mcp_sessions,
        )
        register_ws_route(app, sessions)
        app.openapi_schema = None
    return app


def _openenv_app(settings: Settings, loader: TaskLoader, new_environment: Any, action: type,
                 observation: type, concurrency: Any) -> FastAPI:  # fmt: skip
    """openenv's app, with the playground (``server.playground``) as its only ``/web`` view
    when ``settings`` enable it (openenv's own ``create_app`` would read
    ``ENABLE_WEB_INTERFACE`` from the environment itself). The playground's environments
    come from ``new_environment``, its task list from ``loader``'s registry; their sessions
    are closed at shutdown. openenv's generic UI's JSON routes (one episode shared by every
    visitor) are removed."""
    if settings.enable_web_interface:
        from tracefix_rl.models import allow_web_interface

        allow_web_interface()
        from openenv.core.env_server.web_interface import create_web_interface_app

        from tracefix_rl.server.playground import TITLE, Playground, remove_generic_ui_routes

        playground = Playground(new_environment, lambda: loader.registry,
                                idle_timeout_s=settings.session_timeout_s)  # fmt: skip
        app = create_web_interface_app(
            new_environment, action, observation, ENV_NAME, concurrency_config=concurrency,
            gradio_builder=playground.build, custom_tab_name="Playground",
            custom_tab_primary=True, show_default_tab=False, title_override=TITLE,
        )  # fmt: skip
        remove_generic_ui_routes(app)
        app.state.playground = playground
        app.router.on_shutdown.append(playground.sessions.close_all)
        return app
    from openenv.core.env_server.http_server import create_fastapi_app

    return create_fastapi_app(new_environment, action, observation, env_name=ENV_NAME,
                              concurrency_config=concurrency)  # fmt: skip


def __getattr__(name: str) -> Any:
    """``app``: built from the environment's settings on first access (see the module
    docstring), then kept."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    built = create_tracefix_app(load_settings())
    globals()["app"] = built
    return built


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``server [--host H] [--port P] [--log-level L]``; options override the settings."""
    parser = argparse.ArgumentParser(prog="server", description="Run the tracefix_rl server.")
    parser.add_argument("--host", help="listen address (default: HOST, else 0.0.0.0)")
    parser.add_argument("--port", help="TCP port (default: PORT, else 8000)")
    parser.add_argument("--log-level", help="log level (default: LOG_LEVEL, else INFO)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: read the settings, start loading, build the app and serve it (see
    the module docstring). A bad setting ends the process with its message on stderr."""
    args = parse_args(argv)
    options = {"host": args.host, "port": args.port, "log_level": args.log_level}
    try:
        settings = load_settings({k: v for k, v in options.items() if v is not None})
    except SettingsError as exc:
        raise SystemExit(f"tracefix_rl: invalid configuration:\n{exc}") from None
    logging.basicConfig(level=settings.log_level, stream=sys.stderr, format=LOG_FORMAT)
    if settings.episode_store != "memory":  # before anything starts: one line if unreachable
        from tracefix_rl.server.redis_episodes import wait_for_redis

        try:
            asyncio.run(wait_for_redis(settings.episode_store))
        except RuntimeError as exc:
            raise SystemExit(f"tracefix_rl: {exc}") from None
    loader = TaskLoader(settings)
    loader.start()
    app = create_tracefix_app(settings, loader)
    from tracefix_rl.server import serve

    log.info("starting on %s:%d", settings.host, settings.port)
    serve.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        max_message_bytes=settings.max_request_bytes,
        ws_compression=settings.ws_compression,
        sessions=app.state.ws_sessions,
        close_episodes=app.state.http_episodes.close,
        close_sandbox=sandbox.close_sandbox,
    )


if __name__ == "__main__":
    main()
