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
"""

import sandbox  # light; the package import also defers the MCP runtime (server/startup.py)

sandbox.prewarm()  # the zygote workers boot while openenv and fastapi import below

import models  # noqa: F401  (before openenv: keeps gradio out unless the web UI is on)

# isort: split

import argparse
import asyncio
import functools
import logging
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import Body, FastAPI, HTTPException, Query
from fastapi.encoders import jsonable_encoder
from fastapi.routing import APIRoute
from openenv.core.env_server.http_server import create_app
from openenv.core.env_server.serialization import deserialize_action, serialize_observation
from openenv.core.env_server.types import (
    ConcurrencyConfig,
    ResetRequest,
    ResetResponse,
    StepRequest,
    StepResponse,
)
from pydantic import Field, ValidationError
from starlette.websockets import WebSocketDisconnect
from uvicorn.protocols.utils import ClientDisconnected

from environment import TraceFixEnvironment
from models import TraceFixAction, TraceFixObservation, TraceFixState
from sandbox import SandboxBusy, SandboxUnavailable, get_sandbox
from server import startup
from tasks import SPLITS, TaskSelectionError, get_registry

log = logging.getLogger("tracefix_rl.server")

DEFAULT_PORT = 8000
DEFAULT_HOST = "0.0.0.0"
DEFAULT_MAX_CONCURRENT_ENVS = 64
DEFAULT_SESSION_TIMEOUT_S = 600.0
DEFAULT_HTTP_MAX_EPISODES = 256
DEFAULT_HTTP_EPISODE_TTL_S = 600.0
REPLACED_ROUTES = {"/reset", "/step", "/state", "/schema", "/health"}


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


class EpisodeStepRequest(StepRequest):
    """``/step`` body: the action, plus the HTTP episode to continue."""

    episode_id: str | None = Field(
        default=None,
        max_length=255,
        description="Episode returned by /reset; defaults to the most recent HTTP episode.",
    )


class EpisodeStoreFull(RuntimeError):
    """Every HTTP episode slot holds a live, unfinished episode."""


@dataclass
class _Episode:
    env: TraceFixEnvironment
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_used: float = field(default_factory=lambda: time.monotonic())


class HttpEpisodes:
    """Bounded store of HTTP episodes keyed by ``episode_id``, expiring when idle."""

    def __init__(self, capacity: int, ttl_s: float) -> None:
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._episodes: OrderedDict[str, _Episode] = OrderedDict()
        self._latest: str | None = None

    def __len__(self) -> int:
        return len(self._episodes)

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.ttl_s
        for episode_id in [k for k, e in self._episodes.items() if e.last_used < cutoff]:
            self._drop(episode_id)

    def _drop(self, episode_id: str) -> None:
        episode = self._episodes.pop(episode_id)
        episode.env.close()
        if self._latest == episode_id:
            self._latest = None

    def add(self, env: TraceFixEnvironment) -> None:
        """Store a freshly reset episode (replacing one with the same id)."""
        episode_id = env.state.episode_id
        assert episode_id is not None
        self._expire()
        if episode_id in self._episodes:
            self._drop(episode_id)
        if len(self._episodes) >= self.capacity:
            finished = next((k for k, e in self._episodes.items() if e.env.state.done), None)
            if finished is None:
                raise EpisodeStoreFull(
                    f"all {self.capacity} HTTP episode slots hold unfinished episodes; finish "
                    f"one (SUBMIT), wait {self.ttl_s:.0f}s for idle ones to expire, raise "
                    "HTTP_MAX_EPISODES, or use the WebSocket endpoint /ws"
                )
            self._drop(finished)
        self._episodes[episode_id] = _Episode(env)
        self._latest = episode_id

    def get(self, episode_id: str | None) -> _Episode:
        """The named episode, else the most recent one; 404 when there is none."""
        self._expire()
        key = episode_id if episode_id is not None else self._latest
        if key is None:
            raise HTTPException(404, "no HTTP episode is running: POST /reset first")
        episode = self._episodes.get(key)
        if episode is None:
            raise HTTPException(
                404,
                f"unknown or expired episode_id {key!r} (HTTP episodes expire after "
                f"{self.ttl_s:.0f}s idle); POST /reset to start one",
            )
        episode.last_used = time.monotonic()
        self._episodes.move_to_end(key)
        return episode

    def latest(self) -> _Episode | None:
        self._expire()
        return self._episodes.get(self._latest) if self._latest else None

    def close(self) -> None:
        for episode_id in list(self._episodes):
            self._drop(episode_id)


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


def _remove_routes(app: FastAPI, paths: set[str]) -> None:
    app.router.routes[:] = [
        r for r in app.router.routes if not (isinstance(r, APIRoute) and r.path in paths)
    ]


class _TaskLoader:
    """Loads the sandbox and the task registry in a thread while the app is built.

    The oracle checks mostly wait on the sandbox workers, so building routes and starting
    uvicorn overlap with them; the app's startup hook waits for the result, and uvicorn
    accepts connections only after that, so no request ever sees a half-loaded registry.
    """

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._load, name="task-loader", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        try:
            get_sandbox()
            get_registry()
        except BaseException as exc:  # noqa: BLE001 - reported by wait()
            self.error = exc

    async def wait(self) -> None:
        """Startup hook: block startup until the tasks are loaded; fail it if they cannot be."""
        await asyncio.to_thread(self._thread.join)
        if isinstance(self.error, SandboxUnavailable):
            log.critical("%s", self.error)
            raise SystemExit(f"tracefix_rl: {self.error}")
        if self.error is not None:
            raise self.error
        registry = get_registry()
        log.info("serving %d tasks (%d skipped)", len(registry.tasks), len(registry.problems))


def create_tracefix_app() -> FastAPI:
    """Build the ASGI app and register every route; tasks and sandbox load meanwhile and
    are ready before the server accepts its first connection."""
    loader = _TaskLoader()
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
    # One thread per HTTP episode slot: a step waiting for the sandbox must not hold up
    # VIEW or REPLACE of other episodes (Starlette's shared thread pool has 40 threads).
    http_threads = ThreadPoolExecutor(max_workers=episodes.capacity,
                                      thread_name_prefix="http-episode")  # fmt: skip

    async def in_thread(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(http_threads, functools.partial(call, *args, **kwargs))

    app.router.on_startup.insert(0, loader.wait)
    app.add_middleware(QuietWebSocketClose)
    _remove_routes(app, REPLACED_ROUTES)

    @app.post("/reset", response_model=ResetResponse, tags=["Environment Control"])
    async def reset(request: ResetRequest = Body(default_factory=ResetRequest)) -> ResetResponse:
        """Start an HTTP episode; its ``episode_id`` is in the observation.

        Body: ``seed``, ``episode_id``, ``task_id`` (or ``task_name``), ``difficulty``,
        ``max_steps``; other keys are ignored.
        """
        env = TraceFixEnvironment(registry=get_registry(), sandbox=get_sandbox())
        try:
            observation = await in_thread(env.reset, **request.model_dump())
        except TaskSelectionError as exc:
            raise HTTPException(400, str(exc)) from None
        try:
            episodes.add(env)
        except EpisodeStoreFull as exc:
            raise HTTPException(503, str(exc)) from None
        return ResetResponse(**serialize_observation(observation))

    @app.post("/step", response_model=StepResponse, tags=["Environment Control"])
    async def step(request: EpisodeStepRequest) -> StepResponse:
        """Apply one action to the HTTP episode named by ``episode_id`` (or the latest)."""
        try:
            action = deserialize_action(request.action, TraceFixAction)
        except ValidationError as exc:
            raise HTTPException(422, jsonable_encoder(exc.errors(include_url=False))) from None
        episode = episodes.get(request.episode_id)
        async with episode.lock:
            try:
                observation = await in_thread(episode.env.step, action)
            except SandboxBusy as exc:
                raise HTTPException(503, str(exc)) from None
        episode.last_used = time.monotonic()
        return StepResponse(**serialize_observation(observation))

    @app.get("/state", tags=["State Management"])
    async def state(
        episode_id: str | None = Query(default=None, max_length=255),
    ) -> dict[str, Any]:
        """State of the named HTTP episode (or the latest; empty before any reset)."""
        if episode_id is None and (latest := episodes.latest()) is None:
            return TraceFixState().model_dump()
        episode = episodes.get(episode_id) if episode_id is not None else latest
        return episode.env.state.model_dump()

    @app.get("/schema", tags=["Schema"])
    async def schema() -> dict[str, Any]:
        """JSON schemas of the action, observation and state."""
        return {
            "action": TraceFixAction.model_json_schema(),
            "observation": TraceFixObservation.model_json_schema(),
            "state": TraceFixState.model_json_schema(),
        }

    @app.get("/health", tags=["Health"])
    async def health() -> dict[str, Any]:
        """Liveness plus the facts an operator needs: tasks, sandbox, sessions."""
        registry = get_registry()
        return {
            "status": "healthy",
            "tasks": len(registry.tasks),
            "tasks_skipped": len(registry.problems),
            "http_episodes": len(episodes),
            "server": {"pid": os.getpid(), "open_fds": len(os.listdir("/proc/self/fd"))},
            "sandbox": get_sandbox().describe(),
        }

    @app.get("/tasks", tags=["Environment Info"])
    async def list_tasks(
        difficulty: str | None = None,
        split: str | None = None,
        source: str | None = None,
        offset: int = Query(default=0, ge=0),
        limit: int = Query(default=100, ge=1, le=1000),
    ) -> dict[str, Any]:
        """Task ids with tier, split, source and bug type, paginated and filterable.

        Use it to build a trainer's dataset of reset arguments, e.g.
        ``{"task_id": ...}`` rows, or ``{"difficulty": ..., "split": ..., "seed": ...}``.
        """
        if difficulty is not None and difficulty not in models.DIFFICULTIES:
            raise HTTPException(400, f"unknown difficulty {difficulty!r}")
        if split is not None and split not in SPLITS:
            raise HTTPException(400, f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        registry = get_registry()
        ids = registry.ids(difficulty, split, source)
        rows = [
            {
                "task_id": task.task_id,
                "difficulty": task.difficulty,
                "split": task.split,
                "source": task.source,
                "bug_type": task.bug_type,
            }
            for task in (registry.tasks[i] for i in ids[offset : offset + limit])
        ]
        return {"total": len(ids), "offset": offset, "limit": limit, "tasks": rows}

    async def _close_episodes() -> None:
        episodes.close()
        http_threads.shutdown(wait=False, cancel_futures=True)

    app.router.on_shutdown.append(_close_episodes)

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
