"""HTTP routes of tracefix_rl that replace or add to openenv's.

* ``POST /reset``, ``POST /step``, ``GET /state``: *stateful* HTTP episodes (see
  ``server.episodes``).
* ``GET /schema`` with the real state schema, ``GET /health`` with sandbox and task facts,
  ``GET /tasks`` listing task ids for building datasets of reset arguments.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import Body, FastAPI, HTTPException, Query
from fastapi.encoders import jsonable_encoder
from fastapi.routing import APIRoute
from openenv.core.env_server.serialization import deserialize_action, serialize_observation
from openenv.core.env_server.types import (
    ResetResponse,
    StepRequest,
    StepResponse,
)
from pydantic import Field, ValidationError

import models
from environment import TraceFixEnvironment
from models import ResetArgs, TraceFixAction, TraceFixObservation, TraceFixState
from sandbox import SandboxBusy, get_sandbox
from server.episodes import EpisodeStoreFull, HttpEpisodes
from tasks import SPLITS, TaskSelectionError, get_registry

REPLACED_ROUTES = {"/reset", "/step", "/state", "/schema", "/health"}


class EpisodeStepRequest(StepRequest):
    """``/step`` body: the action, plus the HTTP episode to continue."""

    episode_id: str | None = Field(
        default=None,
        max_length=255,
        description="Episode returned by /reset; defaults to the most recent HTTP episode.",
    )


def remove_routes(app: FastAPI, paths: set[str]) -> None:
    app.router.routes[:] = [
        r for r in app.router.routes if not (isinstance(r, APIRoute) and r.path in paths)
    ]


def register_http_routes(app: FastAPI, episodes: HttpEpisodes) -> None:
    """Replace openenv's stateless HTTP routes with stateful ones and add the info routes."""
    remove_routes(app, REPLACED_ROUTES)
    # One thread per HTTP episode slot: a step waiting for the sandbox must not hold up
    # VIEW or REPLACE of other episodes (Starlette's shared thread pool has 40 threads).
    http_threads = ThreadPoolExecutor(max_workers=episodes.capacity,
                                      thread_name_prefix="http-episode")  # fmt: skip

    async def in_thread(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(http_threads, functools.partial(call, *args, **kwargs))

    @app.post("/reset", response_model=ResetResponse, tags=["Environment Control"])
    async def reset(request: ResetArgs = Body(default_factory=ResetArgs)) -> ResetResponse:
        """Start an HTTP episode; its ``episode_id`` is in the observation.

        Body: ``seed``, ``episode_id``, ``task_id`` (or ``task_name``), ``difficulty``,
        ``split``, ``max_steps``; other keys are ignored.
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

    async def close_episodes() -> None:
        episodes.close()
        http_threads.shutdown(wait=False, cancel_futures=True)

    app.router.on_shutdown.append(close_episodes)
