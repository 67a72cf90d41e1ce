"""HTTP routes of tracefix_rl that replace or add to openenv's.

* ``POST /reset``, ``POST /step``, ``GET /state``: *stateful* HTTP episodes (the store is
  ``server.episodes``). ``/reset`` answers with the observation (which carries the
  ``episode_id``) and sets the cookie :data:`EPISODE_COOKIE` naming the episode. ``/step``
  continues the episode named by ``episode_id`` in its body, else the one its cookie names
  (an episode this client created), else answers 400. ``GET /state`` likewise, except that
  with neither it reports an empty state, as upstream's stateless ``/state`` does.
  Explicit ids work from any client: an id is the capability (generated ones are uuid4).
* ``GET /schema`` with the real state schema, ``GET /health`` (503 with a ``reason`` when
  the sandbox cannot serve at full strength), ``GET /tasks`` listing task ids,
  ``GET /metadata``.
* ``GET /``: a redirect to ``/docs``, unless the web UI serves ``/`` already (openenv's
  redirect to the playground at ``/web/``); left out of the OpenAPI schema.
* ``POST /mcp`` and ``DELETE /mcp`` (:func:`register_mcp_routes`): the HTTP transports of the
  MCP tools of ``server.mcp``. A request with an ``Mcp-Session-Id`` header, or an
  ``initialize``, speaks MCP's streamable HTTP (JSON answers, no SSE); any other request
  speaks OpenEnv's JSON-RPC (``openenv/session/create``, ``params.session_id``). Answers are
  JSON-RPC, with HTTP 200 for JSON-RPC errors, whatever the body (``openenv validate`` posts
  ``{}``).

Every status a route can answer is in its OpenAPI ``responses`` (``tests/test_contract.py``
holds the server to it with schemathesis); error bodies come from ``server.responses``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal
from urllib.parse import quote, unquote

from fastapi import Body, Cookie, FastAPI, HTTPException, Query, Request
from fastapi.openapi.constants import REF_PREFIX
from fastapi.routing import APIRoute
from openenv.core.env_server.mcp_types import JsonRpcErrorCode, JsonRpcRequest, JsonRpcResponse
from openenv.core.env_server.serialization import serialize_observation
from openenv.core.env_server.types import EnvironmentMetadata, SchemaResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import RedirectResponse, Response

from tracefix_rl.environment import TraceFixEnvironment
from tracefix_rl.models import (
    ID_MAX_CHARS,
    Difficulty,
    ResetArgs,
    SafeText,
    Split,
    TraceFixAction,
    TraceFixObservation,
    TraceFixState,
)
from tracefix_rl.sandbox import get_sandbox
from tracefix_rl.server.episodes import (
    EpisodeStore,
    EpisodeStoreFull,
    EpisodeStoreUnavailable,
    UnknownEpisode,
)
from tracefix_rl.server.mcp import SESSION_METHODS, Transport, dispatch
from tracefix_rl.server.mcp_sessions import McpCapacityError, McpSessionError, McpSessions
from tracefix_rl.server.responses import (
    RETRY_AFTER_HEADER,
    SHUTTING_DOWN,
    ErrorDetail,
    SafeJSONResponse,
    documented,
    validation_response,
)
from tracefix_rl.tasks import TaskSelectionError, get_registry

log = logging.getLogger("tracefix_rl.server")

REPLACED_ROUTES = {"/reset", "/step", "/state", "/schema", "/health", "/metadata", "/mcp"}
EPISODE_COOKIE = "tracefix_episode"
# The cookie holds the percent-encoded id: at most 12 ASCII characters per character of it.
# It is left out of the OpenAPI parameters (the routes' descriptions and /reset's Set-Cookie
# document it): the server sets it, and a generated value cannot round-trip through a Cookie
# header (a ';' in it cuts it short), so schemathesis' negative cookies were sent truncated.
COOKIE_MAX_CHARS = ID_MAX_CHARS * 12
MCP_SESSION_HEADER = "mcp-session-id"  # MCP's streamable HTTP transport
MCP_METHODS = ("DELETE", "POST")
_EPISODE_OF_RESET = "$response.body#/observation/episode_id"
# OpenAPI links: what a client (and schemathesis' stateful phase) can do with a new episode.
RESET_LINKS = {
    "StepEpisode": {"operationId": "step", "requestBody": {"episode_id": _EPISODE_OF_RESET}},
    "ReadState": {"operationId": "state", "parameters": {"query.episode_id": _EPISODE_OF_RESET}},
}
NO_EPISODE = (
    "no episode_id: send the episode_id that POST /reset returned, or step from the client "
    f"that called /reset (its {EPISODE_COOKIE} cookie names its latest episode)"
)


# -- wire models (the OpenAPI schema documents these) ---------------------------------------


class EpisodeStepRequest(BaseModel):
    """``/step`` body: the action, plus the HTTP episode to continue.

    Keys other than these are accepted and ignored, as in openenv's ``StepRequest``; the
    action itself admits only its declared fields.
    """

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={"examples": [
            {"action": {"action_type": "VIEW_CODE"}, "episode_id": "ep-1"},
            {"action": {"action_type": "REPLACE_LINES", "start_line": 5, "end_line": 5,
                        "new_code_block": "if n % 2 == 0:"}},
        ]},
    )  # fmt: skip

    action: TraceFixAction = Field(description="The action; see GET /schema.")
    episode_id: SafeText | None = Field(
        default=None,
        min_length=1,
        max_length=ID_MAX_CHARS,
        description=f"Episode returned by /reset; defaults to the one the {EPISODE_COOKIE} "
        "cookie (set by /reset) names.",
    )
    timeout_s: float | None = Field(
        default=None, gt=0, description="Accepted for OpenEnv compatibility; unused."
    )
    request_id: SafeText | None = Field(
        default=None,
        min_length=1,
        max_length=ID_MAX_CHARS,
        description="An id of this step, new for each step: a retry of the step with the same "
        "request_id (after a timeout or a 502) gets the first answer back instead of the step "
        "being applied twice. Only the episode's last step is remembered.",
    )


def _without_envelope_fields(schema: dict[str, Any]) -> None:
    for name in ("reward", "done"):
        schema.get("properties", {}).pop(name, None)


class WireObservation(TraceFixObservation):
    """The observation as sent: ``reward`` and ``done`` travel in the envelope (openenv
    0.10 keeps ``metadata`` in it and repeats it in the envelope when it is not empty)."""

    model_config = ConfigDict(
        title="TraceFixObservation", json_schema_extra=_without_envelope_fields
    )


class ObservationResponse(BaseModel):
    """OpenEnv's envelope of every ``/reset`` and ``/step`` answer."""

    observation: WireObservation
    reward: float | None = None
    done: bool = False
    metadata: dict[str, Any] | None = Field(
        default=None, description="The observation's metadata, when it has any."
    )


class HealthReport(BaseModel):
    """``GET /health``; ``status`` is ``unhealthy`` (HTTP 503) when ``reason`` says why."""

    model_config = ConfigDict(extra="allow")

    status: Literal["healthy", "unhealthy"]
    reason: str | None = Field(default=None, description="Why the server is unhealthy.")
    tasks: int
    tasks_skipped: int
    http_episodes: int | None = Field(
        description="HTTP episodes stored (null when the episode store cannot be reached)."
    )
    episode_store: dict[str, Any] = Field(
        description="Where HTTP episodes live (EPISODE_STORE): kind, capacity, and for Redis "
        "whether it answers."
    )
    server: dict[str, Any]
    sandbox: dict[str, Any]


class TaskRow(BaseModel):
    task_id: str
    difficulty: str
    split: str
    source: str
    bug_type: str | None


class TaskPage(BaseModel):
    total: int
    offset: int
    limit: int
    tasks: list[TaskRow]
    by_source: dict[str, int] = Field(
        description="Tasks per source (curated, generated, an imported pack's source such as "
        "quixbugs) among those of the difficulty and split asked for, whatever the source "
        "filter."
    )


STORE_RETRY_AFTER_S = 2  # Retry-After of a 503 answered while the episode store is down

# -- helpers ----------------------------------------------------------------------------------


def cookie_value(episode_id: str) -> str:
    """The cookie naming ``episode_id``: percent-encoded UTF-8, i.e. legal cookie ASCII."""
    return quote(episode_id, safe="")


def remove_routes(app: FastAPI, paths: set[str]) -> None:
    app.router.routes[:] = [
        r for r in app.router.routes if not (isinstance(r, APIRoute) and r.path in paths)
    ]


TASK_API_TAG = "Task API"


def document_task_api(app: FastAPI) -> None:
    """openenv 0.10's Task API routes (``/list_environments``, ``/tracefix_rl/splits``,
    ``/tracefix_rl/tasks``, ...) stay openenv's; their errors go into the schema: 404 for
    another environment's name, 400 for an index outside the split, 422 for a bad body."""
    for route in app.router.routes:
        if isinstance(route, APIRoute) and TASK_API_TAG in (route.tags or []):
            statuses = (400, 404, 422) if "{env_name}" in route.path else ()
            route.responses = {**route.responses, **documented(*statuses)}


def register_root_redirect(app: FastAPI) -> None:
    """``GET /`` redirects to the API docs, unless a route for ``/`` exists already (the web
    UI's redirect to its playground)."""
    if any(getattr(route, "path", None) == "/" for route in app.router.routes):
        return

    async def root() -> Response:
        return RedirectResponse("/docs")

    app.add_api_route("/", root, methods=["GET"], include_in_schema=False)


def _rpc_error(code: JsonRpcErrorCode, message: str, request_id: Any = None,
               status: int = 200, data: Any = None) -> Response:  # fmt: skip
    reply = JsonRpcResponse.error_response(code, message, data=data, request_id=request_id)
    return SafeJSONResponse(reply.model_dump(), status_code=status)


def _unknown_session(session_id: str, request_id: Any = None) -> Response:
    """404, as MCP's streamable HTTP has it: the client must ``initialize`` again."""
    shown = session_id if len(session_id) <= ID_MAX_CHARS else f"{session_id[:ID_MAX_CHARS]}..."
    return _rpc_error(JsonRpcErrorCode.INVALID_REQUEST, f"Unknown or closed MCP session "
                      f"{shown!r}: initialize a new one", request_id, 404)  # fmt: skip


# -- routes -----------------------------------------------------------------------------------


def register_http_routes(
    app: FastAPI,
    episodes: EpisodeStore,
    new_environment: Callable[[], TraceFixEnvironment] = TraceFixEnvironment,
) -> None:
    """Replace openenv's stateless HTTP routes with stateful ones and add the info routes;
    ``/reset`` plays each episode in an environment made by ``new_environment``."""
    remove_routes(app, REPLACED_ROUTES)  # openenv's /mcp too: register_mcp_routes serves it
    document_task_api(app)
    register_root_redirect(app)
    # One thread per HTTP episode slot: a step waiting for the sandbox must not hold up
    # VIEW or REPLACE of other episodes (Starlette's shared thread pool has 40 threads).
    http_threads = ThreadPoolExecutor(max_workers=episodes.capacity,
                                      thread_name_prefix="http-episode")  # fmt: skip
    json_route = functools.partial(app.api_route, response_class=SafeJSONResponse)

    async def in_thread(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(http_threads, functools.partial(call, *args, **kwargs))

    def store_full(exc: EpisodeStoreFull) -> HTTPException:
        return HTTPException(503, str(exc), headers={"Retry-After": str(exc.retry_after_s)})

    def store_down(exc: EpisodeStoreUnavailable) -> HTTPException:
        return HTTPException(503, str(exc), headers={"Retry-After": str(STORE_RETRY_AFTER_S)})

    async def count_episodes() -> int | None:
        try:
            return await episodes.count()
        except EpisodeStoreUnavailable:
            return None

    @json_route(
        "/reset",
        methods=["POST"],
        tags=["Environment Control"],
        responses=documented(
            400, 422,
            s503={"model": ErrorDetail, "headers": RETRY_AFTER_HEADER, "description": "Every "
                  "HTTP episode slot is in use (with Retry-After), or " + SHUTTING_DOWN + "."},
            s200={"model": ObservationResponse, "description": "The first observation; the "
                  f"{EPISODE_COOKIE} cookie names the episode.",
                  "headers": {"Set-Cookie": {"schema": {"type": "string"}}},
                  "links": RESET_LINKS},
        ),
        operation_id="reset",
    )  # fmt: skip
    async def reset(args: ResetArgs = Body(default_factory=ResetArgs)) -> Response:
        """Start an HTTP episode; its ``episode_id`` is in the observation and in the cookie.

        Body: ``seed``, ``episode_id``, ``task_id`` (or ``task_name``), ``difficulty``,
        ``split``, ``max_steps``; other keys are ignored. 503 with ``Retry-After`` when every
        episode slot is in use (see ``server.episodes``).
        """
        try:
            await episodes.reserve()  # refuse before doing the work
        except EpisodeStoreFull as exc:
            raise store_full(exc) from None
        except EpisodeStoreUnavailable as exc:
            raise store_down(exc) from None
        env = new_environment()
        try:
            observation = await in_thread(
                env.reset, **args.model_dump(include=set(ResetArgs.model_fields))
            )
        except TaskSelectionError as exc:
            raise HTTPException(400, str(exc)) from None
        except ValidationError as exc:  # env.reset validates its arguments again
            return validation_response(
                {**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)
            )
        try:
            episode_id = await episodes.start(env)
        except EpisodeStoreFull as exc:
            raise store_full(exc) from None
        except EpisodeStoreUnavailable as exc:
            raise store_down(exc) from None
        response = SafeJSONResponse(serialize_observation(observation))
        response.set_cookie(EPISODE_COOKIE, cookie_value(episode_id), path="/",
                            httponly=True, samesite="lax")  # fmt: skip
        return response

    @json_route(
        "/step",
        methods=["POST"],
        tags=["Environment Control"],
        responses=documented(
            400, 404, 422,
            s200={"model": ObservationResponse, "description": "The observation after the action."},
        ),
        operation_id="step",
    )  # fmt: skip
    async def step(
        body: EpisodeStepRequest,
        tracefix_episode: str | None = Cookie(
            default=None, max_length=COOKIE_MAX_CHARS, include_in_schema=False
        ),
    ) -> Response:
        """Apply one action to the episode named by ``episode_id``, else by the cookie that
        ``/reset`` set; 400 with neither, 404 for an unknown or expired episode."""
        episode_id = body.episode_id or (unquote(tracefix_episode) if tracefix_episode else None)
        if not episode_id:
            raise HTTPException(400, NO_EPISODE)
        try:
            observation = await episodes.step(
                episode_id, lambda env: in_thread(env.step, body.action), body.request_id
            )
        except UnknownEpisode as exc:
            raise HTTPException(404, str(exc)) from None
        except EpisodeStoreUnavailable as exc:
            raise store_down(exc) from None
        return SafeJSONResponse(serialize_observation(observation))

    @json_route(
        "/state",
        methods=["GET"],
        tags=["State Management"],
        responses=documented(404, 422, s200={"model": TraceFixState, "description": "The state."}),
        operation_id="state",
    )
    async def state(
        episode_id: SafeText | None = Query(default=None, min_length=1, max_length=ID_MAX_CHARS),
        tracefix_episode: str | None = Cookie(
            default=None, max_length=COOKIE_MAX_CHARS, include_in_schema=False
        ),
    ) -> Response:
        """State of the episode named by ``episode_id``, else by the cookie; with neither,
        the empty state (as upstream's stateless ``/state``). Reading does not keep an
        episode alive."""
        key = episode_id or (unquote(tracefix_episode) if tracefix_episode else None)
        if not key:
            return SafeJSONResponse(TraceFixState().model_dump())
        try:
            found = await episodes.state(key)
        except UnknownEpisode as exc:
            raise HTTPException(404, str(exc)) from None
        except EpisodeStoreUnavailable as exc:
            raise store_down(exc) from None
        return SafeJSONResponse(found.model_dump())

    @json_route("/schema", methods=["GET"], tags=["Schema"], response_model=SchemaResponse,
                responses=documented())  # fmt: skip
    async def schema() -> dict[str, Any]:
        """JSON schemas of the action, observation and state."""
        return {
            "action": TraceFixAction.model_json_schema(),
            "observation": TraceFixObservation.model_json_schema(),
            "state": TraceFixState.model_json_schema(),
        }

    @json_route(
        "/health",
        methods=["GET"],
        tags=["Health"],
        responses=documented(
            s200={"model": HealthReport, "description": "Healthy."},
            s503={"description": "Unhealthy (`reason` says why), or " + SHUTTING_DOWN + ".",
                  "content": {"application/json": {"schema": {"anyOf": [
                      {"$ref": f"{REF_PREFIX}HealthReport"},
                      {"$ref": f"{REF_PREFIX}ErrorDetail"}]}}}},
        ),
    )  # fmt: skip
    async def health() -> Response:
        """Liveness plus the facts an operator needs: tasks, sandbox, sessions. 503 when the
        sandbox cannot serve at full strength (e.g. fewer workers alive than configured)."""
        registry = get_registry()
        report: dict[str, Any] = {"status": "healthy"}
        try:
            sandbox = get_sandbox()
            problem = sandbox.health_problem()
            facts = sandbox.describe()
        except Exception as exc:  # noqa: BLE001 - an unhealthy answer, never a 500
            log.exception("sandbox health check failed")
            problem, facts = f"the sandbox health check failed: {exc}", {}
        if problem is not None:
            report = {"status": "unhealthy", "reason": problem}
        report |= {
            "tasks": len(registry.tasks),
            "tasks_skipped": len(registry.problems),
            "http_episodes": await count_episodes(),
            "episode_store": episodes.describe(),
            "server": {"pid": os.getpid(), "open_fds": len(os.listdir("/proc/self/fd"))},
            "sandbox": facts,
        }
        return SafeJSONResponse(report, status_code=503 if problem is not None else 200)

    @json_route("/tasks", methods=["GET"], tags=["Environment Info"], response_model=TaskPage,
                responses=documented(422))  # fmt: skip
    async def list_tasks(
        difficulty: Difficulty | None = None,
        split: Split | None = None,
        source: str | None = Query(default=None, max_length=ID_MAX_CHARS),
        offset: int = Query(default=0, ge=0),
        limit: int = Query(default=100, ge=1, le=1000),
    ) -> dict[str, Any]:
        """Task ids with tier, split, source and bug type, paginated and filterable.

        Use it to build a trainer's dataset of reset arguments, e.g.
        ``{"task_id": ...}`` rows, or ``{"difficulty": ..., "split": ..., "seed": ...}``.
        """
        registry = get_registry()
        ids = registry.ids(difficulty, split, source)
        by_source = Counter(registry.tasks[i].source for i in registry.ids(difficulty, split))
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
        return {"total": len(ids), "offset": offset, "limit": limit, "tasks": rows,
                "by_source": dict(sorted(by_source.items()))}  # fmt: skip

    metadata_doc = new_environment().get_metadata()  # needs neither tasks nor sandbox

    @json_route("/metadata", methods=["GET"], tags=["Environment Info"],
                response_model=EnvironmentMetadata, responses=documented())  # fmt: skip
    async def metadata() -> EnvironmentMetadata:
        """Name, description and version of the environment."""
        return metadata_doc

    async def close_episodes() -> None:
        episodes.close()
        http_threads.shutdown(wait=False, cancel_futures=True)

    app.router.on_shutdown.append(close_episodes)


# -- /mcp -------------------------------------------------------------------------------------

_RPC_ANSWER = {"model": JsonRpcResponse, "description": "A JSON-RPC 2.0 answer; errors are "
               "JSON-RPC errors (HTTP 200), whatever the body."}  # fmt: skip
_SESSION_GONE = {"model": JsonRpcResponse, "description": "The `Mcp-Session-Id` names no open "
                 "MCP session (closed, or reaped when idle): initialize a new one."}  # fmt: skip


def _session_header(required: bool) -> dict[str, Any]:
    return {"name": "Mcp-Session-Id", "in": "header", "required": required,
            "schema": {"type": "string"},
            "description": "The MCP session, as `initialize` returned it in this header "
                           "(MCP's streamable HTTP transport)."}  # fmt: skip


class _McpRoute(APIRoute):
    """A ``/mcp`` route whose 405 names every method of ``/mcp`` in ``Allow`` (Starlette's
    names only those of the first route with the path)."""

    async def handle(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self.methods and scope["method"] not in self.methods:
            raise HTTPException(405, headers={"Allow": ", ".join(MCP_METHODS)})
        await super().handle(scope, receive, send)


def register_mcp_routes(app: FastAPI, sessions: McpSessions) -> None:
    """``POST /mcp`` and ``DELETE /mcp``, the HTTP transports of ``server.mcp``.

    ``POST /mcp`` reads the body as JSON-RPC first (a bad one is a JSON-RPC error, HTTP 200:
    parse error, invalid request, a ``params.session_id`` that is not a string), then:

    * with an ``Mcp-Session-Id`` header: MCP's streamable HTTP in that session; an unknown or
      closed one is a 404 (the client initializes again); a notification is answered 202
      with no body;
    * ``initialize`` without the header: a new session (``McpSessions.create``, refused with
      a JSON-RPC error over ``MCP_MAX_SESSIONS``), named in the ``Mcp-Session-Id`` answer
      header;
    * anything else: OpenEnv's JSON-RPC (``MCPToolClient``'s production mode): sessions are
      made with ``openenv/session/create`` and named by ``params.session_id``; every request
      gets an answer.

    ``DELETE /mcp`` closes the session its header names (204; 404 if there is none; 400
    without the header). ``GET /mcp`` (a stream of server messages) is 405: this server
    sends none.
    """

    async def mcp(request: Request) -> Response:
        """MCP over HTTP: streamable HTTP (``initialize``, then ``Mcp-Session-Id``) and
        OpenEnv's JSON-RPC (``openenv/session/create``, then ``params.session_id``). Tools:
        ``start_episode`` and one per action; see docs/mcp.md."""
        try:
            data = json.loads(await request.body())
        except (ValueError, RecursionError):
            return _rpc_error(JsonRpcErrorCode.PARSE_ERROR, "Parse error")
        try:
            rpc = JsonRpcRequest.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "request"
            return _rpc_error(JsonRpcErrorCode.INVALID_REQUEST, f"Invalid request: {where}: "
                              f"{first['msg']}")  # fmt: skip
        if not isinstance(rpc.params.get("session_id", ""), str):
            return _rpc_error(JsonRpcErrorCode.INVALID_PARAMS, "params.session_id must be a "
                              "string", rpc.id)  # fmt: skip
        header = (request.headers.get(MCP_SESSION_HEADER) or "").strip()
        try:
            return await _answer(rpc, header)
        except McpSessionError as exc:  # the server is shutting down
            return _rpc_error(JsonRpcErrorCode.SERVER_ERROR, str(exc), rpc.id)
        except Exception:  # noqa: BLE001 - a JSON-RPC error, never a 500
            log.exception("POST /mcp %s failed", rpc.method)
            return _rpc_error(JsonRpcErrorCode.INTERNAL_ERROR, "Internal error", rpc.id)

    async def _answer(rpc: JsonRpcRequest, header: str) -> Response:
        if header:
            session = sessions.get(header)
            if session is None:
                return _unknown_session(header, rpc.id)
            reply = await dispatch(rpc, session, Transport.STREAMABLE_HTTP, sessions)
            if rpc.id is None:  # a notification: nothing to answer
                return Response(status_code=202)
            return SafeJSONResponse(reply.model_dump())
        if rpc.method == "initialize":
            try:
                session = sessions.create(Transport.STREAMABLE_HTTP.value)
            except McpCapacityError as exc:
                return SafeJSONResponse(exc.response(rpc.id).model_dump())
            reply = await dispatch(rpc, session, Transport.STREAMABLE_HTTP, sessions)
            return SafeJSONResponse(reply.model_dump(),
                                    headers={MCP_SESSION_HEADER: session.session_id})  # fmt: skip
        context = None
        requested = rpc.params.get("session_id")
        if requested and rpc.method not in SESSION_METHODS:
            context = sessions.get(requested)
            if context is None:
                return _rpc_error(JsonRpcErrorCode.INVALID_PARAMS, f"Unknown session_id: "
                                  f"{requested}", rpc.id)  # fmt: skip
        reply = await dispatch(rpc, context, Transport.OPENENV_HTTP, sessions)
        return SafeJSONResponse(reply.model_dump())

    async def close_mcp_session(request: Request) -> Response:
        """Close the MCP session named by ``Mcp-Session-Id`` (MCP's session termination)."""
        header = request.headers.get(MCP_SESSION_HEADER)
        if header is None:
            return _rpc_error(JsonRpcErrorCode.INVALID_REQUEST, "DELETE /mcp closes the MCP "
                              "session named by the Mcp-Session-Id header; none was sent",
                              status=400)  # fmt: skip
        if sessions.close(header.strip()) == "unknown":
            return _unknown_session(header.strip())
        return Response(status_code=204)

    route = functools.partial(
        app.router.add_api_route,
        "/mcp",
        tags=["MCP"],
        response_class=SafeJSONResponse,
        route_class_override=_McpRoute,
    )
    route(
        mcp,
        methods=["POST"],
        responses=documented(
            s200=_RPC_ANSWER,
            s404=_SESSION_GONE,
            s202={"description": "A notification in an MCP session: accepted, no body."},
        ),
        openapi_extra={
            "parameters": [_session_header(required=False)],
            "requestBody": {
                "description": "A JSON-RPC 2.0 request; any other body gets a JSON-RPC error.",
                "content": {"application/json": {"schema": {}}},
            },
        },
    )
    route(
        close_mcp_session, methods=["DELETE"], status_code=204,
        responses=documented(
            s204={"description": "The session is closed (or closes when its WebSocket does)."},
            s400={"model": JsonRpcResponse, "description": "No `Mcp-Session-Id` header."},
            s404=_SESSION_GONE,
        ),
        openapi_extra={"parameters": [_session_header(required=True)]},
    )  # fmt: skip
