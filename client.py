"""Typed client for tracefix_rl over WebSocket (openenv's ``EnvClient``).

    from tracefix_rl.client import TraceFixEnv
    from tracefix_rl.models import TraceFixAction

    with TraceFixEnv(base_url="http://127.0.0.1:8000").sync() as env:
        result = env.reset(seed=7, difficulty="easy")
        result = env.step(TraceFixAction(action_type="RUN_TESTS"))
        print(result.observation.tests_passed, result.reward, result.done)

``TraceFixEnv.from_docker_image("tracefix_rl:latest")`` starts a container (port 8000).

When the server ends the session, calls raise a :class:`SessionClosed` (a
``ConnectionError``) that says why, instead of websockets' bare ``ConnectionClosed``:

* :class:`CapacityError`: the server already runs ``MAX_CONCURRENT_ENVS`` sessions
  (``CAPACITY_REACHED`` error frame, close code 1013); retry later;
* :class:`SessionExpired`: the session was idle for ``SESSION_TIMEOUT_S`` and the server
  closed it (close code 4408); its episode is gone;
* :class:`SessionClosed` itself for any other close, e.g. 1001 when the server shuts down.

The dead connection is dropped, so the next call connects a new session (reset first).
Other error frames raise ``RuntimeError`` as in openenv.
"""

from tracefix_rl import models  # noqa: F401  (first: keeps gradio out of client processes)

# isort: split

from typing import Any

from openenv.core.client_types import StepResult
from openenv.core.env_client import EnvClient
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from tracefix_rl.models import TraceFixAction, TraceFixObservation, TraceFixState

# The server's close codes (server/ws.py; tests/test_ws.py checks they agree).
CLOSE_NORMAL = 1000
CLOSE_TRY_AGAIN = 1013
CLOSE_IDLE = 4408
CAPACITY_REACHED = "CAPACITY_REACHED"


class SessionClosed(ConnectionError):
    """The server closed this WebSocket session; ``code`` and ``reason`` are from its close
    frame (``code`` is None when the connection dropped without one)."""

    def __init__(self, message: str, code: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class CapacityError(SessionClosed):
    """The server refused the session: it already runs ``MAX_CONCURRENT_ENVS`` sessions."""


class SessionExpired(SessionClosed):
    """The server closed the session after ``SESSION_TIMEOUT_S`` without a message."""


def closed_error(code: int | None, reason: str, message: str | None = None) -> SessionClosed:
    """The exception for a session the server closed with ``code`` and ``reason``."""
    if code == CLOSE_TRY_AGAIN:
        return CapacityError(
            message or f"the server refused the session (at capacity): {reason}", code, reason
        )
    if code == CLOSE_IDLE:
        return SessionExpired(
            f"the server closed this idle session ({reason}); its episode is gone, the next "
            "call starts a new session (reset first)",
            code,
            reason,
        )
    what = f"code {code}" + (f": {reason}" if reason else "") if code else "no close frame"
    return SessionClosed(f"the server closed the session ({what})", code, reason)


class TraceFixEnv(EnvClient[TraceFixAction, TraceFixObservation, TraceFixState]):
    """One WebSocket session = one environment instance on the server."""

    def _step_payload(self, action: TraceFixAction) -> dict[str, Any]:
        return action.model_dump(exclude={"metadata"}, exclude_none=True)

    def _parse_result(self, payload: dict[str, Any]) -> StepResult[TraceFixObservation]:
        observation = TraceFixObservation(
            **payload.get("observation", {}),
            done=payload.get("done", False),
            reward=payload.get("reward"),
        )
        return StepResult(
            observation=observation, reward=payload.get("reward"), done=observation.done
        )

    def _parse_state(self, payload: dict[str, Any]) -> TraceFixState:
        return TraceFixState(**payload)

    # -- transport: the server's refusals and closes as clear exceptions ---------------------

    async def _connect_async(self) -> "TraceFixEnv":
        """openenv 0.10 silently replaces a socket the server has closed; a session the server
        *ended* (reaped, refused, shut down) raises instead, once, so the caller knows that
        its episode is gone. The call after that connects a new session."""
        ws = self._ws
        if ws is not None and getattr(ws, "state", State.OPEN) in (State.CLOSING, State.CLOSED):
            code = getattr(ws, "close_code", None)
            if code is not None and code != CLOSE_NORMAL:
                await self._drop_connection()
                raise closed_error(code, getattr(ws, "close_reason", None) or "")
        return await super()._connect_async()

    async def _send(self, message: dict[str, Any]) -> None:
        try:
            await super()._send(message)
        except ConnectionClosed as exc:
            raise await self._lost(exc) from exc

    async def _receive(self) -> dict[str, Any]:
        try:
            return await super()._receive()
        except ConnectionClosed as exc:
            raise await self._lost(exc) from exc

    async def _send_and_receive(self, message: dict[str, Any]) -> dict[str, Any]:
        await self._send(message)
        response = await self._receive()
        if response.get("type") == "error":
            data = response.get("data") or {}
            if data.get("code") == CAPACITY_REACHED:
                await self._drop_connection()
                raise CapacityError(str(data.get("message")), CLOSE_TRY_AGAIN, CAPACITY_REACHED)
            raise RuntimeError(
                f"Server error: {data.get('message', 'Unknown error')} "
                f"(code: {data.get('code', 'UNKNOWN')})"
            )
        return response

    async def _lost(self, exc: ConnectionClosed) -> SessionClosed:
        await self._drop_connection()
        rcvd = exc.rcvd
        return closed_error(rcvd.code if rcvd else None, rcvd.reason if rcvd else "")

    async def _drop_connection(self) -> None:
        """Forget a connection the server has closed, so the next call opens a new one."""
        ws, self._ws = self._ws, None
        self._ws_loop = None
        if ws is not None:
            try:
                await ws.close()
            except Exception:  # noqa: BLE001 - it is closed either way
                pass
