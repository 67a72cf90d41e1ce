"""MCP tools for tracefix_rl: one tool per action of the registry plus ``start_episode``,
and the JSON-RPC methods every MCP transport shares.

**The tools** (derived from :data:`tracefix_rl.actions.ACTIONS` when this module is
imported: adding an action module adds its tool, with no other change):

* ``start_episode`` (optional ``task_id``, ``seed``, ``difficulty``, ``split``, ``index``,
  ``max_steps``) is ``TraceFixEnvironment.reset``: it starts an episode in the session and
  shows the task;
* one tool per action, named after the action in lower snake case (``VIEW_CODE`` is
  ``view_code``), described by the action's ``description``, with ``action.tool_schema()``
  as its input schema. A call is ``env.step(TraceFixAction(action_type=..., **arguments))``,
  so it counts, costs and is graded exactly as a step over ``/ws`` or ``/step``.

None of them may be one of OpenEnv's reserved names (``reset``, ``step``, ``state``,
``close``); a clash is a ``TypeError`` at import.

**A tool call answers** an MCP ``CallToolResult``: ``content`` is one text block holding
what the observation says (the output of the action, its error, the code window, the visible
tests, the step count, reward, done, and the score at the end); ``structuredContent`` holds
the observation's fields with ``reward`` and ``done`` (for MCP 2025-06-18 and later, and
always for OpenEnv's JSON-RPC); ``isError`` is true when the call did nothing (arguments
that do not validate, no episode running, the episode is over) or when the environment
rejected the action (which, as on every transport, still counts as a step with its
penalty). OpenEnv's transports also carry the structured observation as ``data``, which is
what ``MCPToolClient.call_tool`` returns.

**JSON-RPC methods** (:func:`dispatch`, for every transport): ``initialize``, ``ping``,
``notifications/*``, ``tools/list``, ``tools/call``, and OpenEnv's ``openenv/session/create``
and ``openenv/session/close``; anything else is ``Method not found``. Errors are JSON-RPC
errors; nothing here raises for client input.

**Sessions** are :mod:`tracefix_rl.server.mcp_sessions`' (one environment each, counted
against ``MCP_MAX_SESSIONS``, never against ``/ws`` or HTTP episode slots).

Transports live elsewhere: ``POST``/``DELETE /mcp`` in ``server.routes``, WebSocket ``/mcp``,
``{"type": "mcp"}`` frames and ``/ws?session_id=`` in ``server.ws``. This module imports no
MCP runtime (fastmcp, the mcp SDK): the protocol is small JSON-RPC, spoken here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from importlib import metadata
from typing import Any, Protocol, TypeVar

from openenv.core.env_server.mcp_types import (
    RESERVED_TOOL_NAMES,
    JsonRpcErrorCode,
    JsonRpcRequest,
    JsonRpcResponse,
)
from pydantic import ValidationError

from tracefix_rl.actions import ACTIONS, Action
from tracefix_rl.environment import TraceFixEnvironment
from tracefix_rl.episode.render import observation_text
from tracefix_rl.models import ResetArgs, TraceFixAction, TraceFixObservation
from tracefix_rl.server.mcp_sessions import McpCapacityError, McpSessionError, McpSessions
from tracefix_rl.tasks import TaskSelectionError

T = TypeVar("T")

SERVER_NAME = "tracefix_rl"
EPISODE_TOOL = "start_episode"
START_FIELDS = ("task_id", "seed", "difficulty", "split", "index", "max_steps")
# MCP protocol revisions this server speaks (the mcp SDK 1.30's list); `initialize` answers
# the client's if it is one of them, else the latest.
PROTOCOL_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
STRUCTURED_SINCE = "2025-06-18"  # the first revision with structuredContent
SESSION_METHODS = ("openenv/session/create", "openenv/session/close")


# -- the tools --------------------------------------------------------------------------------


class ToolArgumentsError(ValueError):
    """Arguments of a tool call that do not validate; nothing was done."""


@dataclass(frozen=True)
class Outcome:
    """What a tool call did: the observation it produced, or why it did nothing."""

    observation: TraceFixObservation | None = None
    error: str | None = None
    started: bool = False  # a new episode: the text shows the task description


Call = Callable[[TraceFixEnvironment], Outcome]


@dataclass(frozen=True)
class Tool:
    """One MCP tool: its listing, and how to turn validated arguments into a call."""

    name: str
    description: str
    input_schema: dict[str, Any]
    prepare: Callable[[dict[str, Any]], Call]

    def listing(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description,
                "inputSchema": self.input_schema}  # fmt: skip


def tool_name(action: Action) -> str:
    """The tool of ``action``: its name in lower snake case (``VIEW_CODE`` -> ``view_code``)."""
    return action.name.lower()


def _summary(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'arguments'}: {e['msg']}"
        for e in exc.errors(include_url=False)[:3]
    )


def _check_names(tool: str, arguments: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = [name for name in arguments if name not in allowed]
    if unknown:
        takes = f"it takes {', '.join(allowed)}" if allowed else "it takes none"
        raise ToolArgumentsError(f"{tool} got unknown argument(s) {', '.join(unknown)}; {takes}")


def _action_tool(action: Action) -> Tool:
    name = tool_name(action)
    allowed = tuple(action.Params.model_fields)

    def prepare(arguments: dict[str, Any]) -> Call:
        _check_names(name, arguments, allowed)
        try:
            wire = TraceFixAction.model_validate({**arguments, "action_type": action.name})
        except ValidationError as exc:
            raise ToolArgumentsError(f"{name}: {_summary(exc)}") from None
        return functools.partial(_step, wire)

    return Tool(name, action.description, action.tool_schema(), prepare)


def _step(action: Any, env: TraceFixEnvironment) -> Outcome:
    if env.episode is None:
        return Outcome(error=f"no episode is running: call {EPISODE_TOOL} first")
    if env.state.done:
        return Outcome(error=f"the episode is over: call {EPISODE_TOOL} to start a new one")
    return Outcome(env.step(action))


def _start_schema() -> dict[str, Any]:
    """``start_episode``'s input schema: ``ResetArgs``' fields of :data:`START_FIELDS`, each
    its non-null form (a choice as its plain ``enum``), with its description."""
    properties = ResetArgs.model_json_schema()["properties"]
    chosen = {}
    for name in START_FIELDS:
        prop = properties[name]
        forms = [f for f in prop.get("anyOf", [prop]) if f.get("type") != "null"]
        form = next((f for f in forms if "enum" in f), forms[0])
        chosen[name] = {**{k: v for k, v in form.items() if k != "title"},
                        "description": prop["description"]}  # fmt: skip
    return {"type": "object", "properties": chosen}


def _start_tool() -> Tool:
    description = (
        "Start a new episode in this session (the current one, if any, ends unscored) and show "
        "the task: its description and the numbered buggy code. task_id plays that task; "
        "otherwise seed picks one deterministically among the tasks of difficulty and split, "
        "index picks the task at that index of the split, and with none of them a task is "
        "drawn at random. max_steps sets this episode's length."
    )

    def prepare(arguments: dict[str, Any]) -> Call:
        _check_names(EPISODE_TOOL, arguments, START_FIELDS)
        try:
            args = ResetArgs.model_validate(arguments)
        except ValidationError as exc:
            raise ToolArgumentsError(f"{EPISODE_TOOL}: {_summary(exc)}") from None
        return functools.partial(_start, args.model_dump(include=set(START_FIELDS)))

    return Tool(EPISODE_TOOL, description, _start_schema(), prepare)


def _start(args: dict[str, Any], env: TraceFixEnvironment) -> Outcome:
    try:
        return Outcome(env.reset(**args), started=True)
    except TaskSelectionError as exc:
        return Outcome(error=str(exc))


def _tools() -> tuple[Tool, ...]:
    tools = (_start_tool(), *(_action_tool(action) for action in ACTIONS))
    names = [tool.name for tool in tools]
    clashes = sorted({n for n in names if names.count(n) > 1 or n in RESERVED_TOOL_NAMES})
    if clashes:
        raise TypeError(f"MCP tool names clash with each other or OpenEnv's: {clashes}")
    return tools


TOOLS: tuple[Tool, ...] = _tools()
TOOLS_BY_NAME = {tool.name: tool for tool in TOOLS}
INSTRUCTIONS = (
    "A debugging gym: fix a buggy Python program so that it satisfies its description. Call "
    f"{EPISODE_TOOL} first: it shows the task and the numbered code. Every other tool is one "
    f"step of the episode: {', '.join(tool.name for tool in TOOLS[1:])}."
)


def tool_table() -> str:
    """The tool table of docs/mcp.md (Markdown), from :data:`TOOLS`."""
    rows = ["| tool | arguments | what it does (as agents are told) |", "|---|---|---|"]
    for tool in TOOLS:
        required = set(tool.input_schema.get("required", ()))
        args = [f"`{n}`" if n in required else f"`{n}`?" for n in tool.input_schema["properties"]]
        rows.append(f"| `{tool.name}` | {', '.join(args) or '—'} | {tool.description} |")
    return "\n".join(rows)


# -- what a tool call answers -------------------------------------------------------------------


def call_result(outcome: Outcome, structured: bool = True, data: bool = False) -> dict[str, Any]:
    """The ``CallToolResult`` of ``outcome``: the text, and the observation's fields as
    ``structuredContent`` (when ``structured``) and as ``data`` (when ``data``)."""
    obs = outcome.observation
    if obs is None:
        return {"content": [{"type": "text", "text": f"Error: {outcome.error}"}], "isError": True}
    text = observation_text(obs, outcome.started)
    result: dict[str, Any] = {"content": [{"type": "text", "text": text}],
                              "isError": obs.last_action_error is not None}  # fmt: skip
    fields = obs.model_dump(mode="json")
    if structured:
        result["structuredContent"] = fields
    if data:
        result["data"] = fields
    return result


# -- JSON-RPC -------------------------------------------------------------------------------------


class Transport(Enum):
    """Who asks: what a session method means, and what a tool result carries."""

    OPENENV_HTTP = "openenv-http"  # POST /mcp without Mcp-Session-Id: params.session_id
    STREAMABLE_HTTP = "streamable-http"  # POST /mcp with Mcp-Session-Id (MCP's transport)
    WEBSOCKET = "websocket"  # {"type": "mcp"} frames on /ws, and WebSocket /mcp


class Context(Protocol):
    """The session a request runs in, as its transport provides it."""

    session_id: str
    env: TraceFixEnvironment
    protocol_version: str | None

    async def run_call(self, function: Callable[[], T]) -> T: ...


def unknown_tool(name: Any) -> str:
    return f"Unknown tool: {name}; the tools are {', '.join(TOOLS_BY_NAME)}"


def rpc_error(code: JsonRpcErrorCode, message: str, request_id: Any = None,
              data: Any = None) -> JsonRpcResponse:  # fmt: skip
    return JsonRpcResponse.error_response(code, message, data=data, request_id=request_id)


def negotiate(requested: Any) -> str:
    """The protocol revision answered to ``initialize``: the client's, if this server
    speaks it, else the latest."""
    return requested if requested in PROTOCOL_VERSIONS else PROTOCOL_VERSIONS[-1]


@functools.cache
def _server_version() -> str:
    try:
        return metadata.version("tracefix-rl")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def initialize_result(version: str) -> dict[str, Any]:
    return {
        "protocolVersion": version,
        "capabilities": {"tools": {"listChanged": False}},
        "serverInfo": {"name": SERVER_NAME, "version": _server_version()},
        "instructions": INSTRUCTIONS,
    }


async def dispatch(
    request: JsonRpcRequest,
    context: Context | None,
    transport: Transport,
    sessions: McpSessions | None = None,
) -> JsonRpcResponse:
    """The answer to one JSON-RPC request. ``context`` is the session the transport found
    (None: a request of OpenEnv's HTTP JSON-RPC without ``params.session_id``); ``sessions``
    is the store that ``openenv/session/*`` create in and close. Never raises for client
    input; exceptions out of ``context.run_call`` (the transport's) pass through."""
    method, rid, params = request.method, request.id, request.params
    if method == "initialize":
        version = negotiate(params.get("protocolVersion"))
        if context is not None:
            context.protocol_version = version
        return JsonRpcResponse.success(initialize_result(version), request_id=rid)
    if method == "ping" or method.startswith("notifications/"):
        return JsonRpcResponse.success({}, request_id=rid)
    if method == "tools/list":
        return JsonRpcResponse.success({"tools": [t.listing() for t in TOOLS]}, request_id=rid)
    if method == "tools/call":
        return await _call(request, context, transport)
    if method == "openenv/session/create":
        if context is not None:
            return JsonRpcResponse.success({"session_id": context.session_id}, request_id=rid)
        if sessions is None:
            return rpc_error(JsonRpcErrorCode.METHOD_NOT_FOUND, f"Method not found: {method}",
                             rid)  # fmt: skip
        try:
            session = sessions.create(transport.value)
        except McpCapacityError as exc:
            return exc.response(rid)
        except McpSessionError as exc:
            return rpc_error(JsonRpcErrorCode.SERVER_ERROR, str(exc), rid)
        return JsonRpcResponse.success({"session_id": session.session_id}, request_id=rid)
    if method == "openenv/session/close":
        return _close(request, context, transport, sessions)
    return rpc_error(JsonRpcErrorCode.METHOD_NOT_FOUND, f"Method not found: {method}", rid)


def _close(
    request: JsonRpcRequest, context: Context | None, transport: Transport,
    sessions: McpSessions | None,
) -> JsonRpcResponse:  # fmt: skip
    rid, target = request.id, request.params.get("session_id")
    if not target:
        return rpc_error(JsonRpcErrorCode.INVALID_PARAMS,
                         "Invalid params - 'session_id' is required", rid)  # fmt: skip
    if not isinstance(target, str):
        return rpc_error(JsonRpcErrorCode.INVALID_PARAMS, "params.session_id must be a string",
                         rid)  # fmt: skip
    if transport is Transport.WEBSOCKET and context is not None and target == context.session_id:
        message = "Cannot close active WebSocket-managed session via MCP method"
        return rpc_error(JsonRpcErrorCode.INVALID_REQUEST, message, rid)
    state = sessions.close(target) if sessions is not None else "unknown"
    if state == "unknown":
        return rpc_error(JsonRpcErrorCode.INVALID_PARAMS, f"Unknown session_id: {target}", rid)
    result = {"session_id": target, "closed": state == "closed"}
    if state == "closing":
        result["closing"] = True
    return JsonRpcResponse.success(result, request_id=rid)


async def _call(
    request: JsonRpcRequest, context: Context | None, transport: Transport
) -> JsonRpcResponse:
    rid, params = request.id, request.params
    name = params.get("name")
    if not name:
        return rpc_error(JsonRpcErrorCode.INVALID_PARAMS, "Missing 'name' in params", rid)
    tool = TOOLS_BY_NAME.get(name) if isinstance(name, str) else None
    if tool is None:
        return rpc_error(JsonRpcErrorCode.INVALID_PARAMS, unknown_tool(name), rid)
    arguments = params.get("arguments")
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return rpc_error(JsonRpcErrorCode.INVALID_PARAMS, "params.arguments must be an object",
                         rid)  # fmt: skip
    if context is None:
        return rpc_error(
            JsonRpcErrorCode.INVALID_PARAMS,
            "tools/call needs a session: create one with openenv/session/create and pass its "
            "params.session_id, or connect with an MCP client (initialize, then Mcp-Session-Id)",
            rid,
        )
    version = context.protocol_version
    structured = version is None or version >= STRUCTURED_SINCE
    data = transport is not Transport.STREAMABLE_HTTP
    try:
        call = tool.prepare(arguments)
    except ToolArgumentsError as exc:
        return JsonRpcResponse.success(call_result(Outcome(error=str(exc))), request_id=rid)
    env = context.env
    outcome = await context.run_call(functools.partial(call, env))
    return JsonRpcResponse.success(call_result(outcome, structured, data), request_id=rid)


async def call_tool(context: Context, name: str, arguments: dict[str, Any]) -> tuple[
    dict[str, Any] | None, str | None, TraceFixObservation | None
]:  # fmt: skip
    """One tool call as a ``step`` of OpenEnv's ``CallToolAction`` (``/ws``): the result, or
    why the tool could not be called, and the observation, if any (for reward and done)."""
    tool = TOOLS_BY_NAME.get(name)
    if tool is None:
        return None, unknown_tool(name), None
    try:
        call = tool.prepare(arguments)
    except ToolArgumentsError as exc:
        return call_result(Outcome(error=str(exc))), None, None
    env = context.env
    outcome = await context.run_call(functools.partial(call, env))
    return call_result(outcome, data=True), None, outcome.observation


if __name__ == "__main__":
    print(tool_table())
