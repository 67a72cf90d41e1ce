"""Typed client for tracefix_rl over WebSocket (openenv's ``EnvClient``).

    from client import TraceFixEnv
    from models import TraceFixAction

    with TraceFixEnv(base_url="http://127.0.0.1:8000").sync() as env:
        result = env.reset(seed=7, difficulty="easy")
        result = env.step(TraceFixAction(action_type="RUN_TESTS"))
        print(result.observation.tests_passed, result.reward, result.done)

``TraceFixEnv.from_docker_image("tracefix_rl:latest")`` starts a container (port 8000).
"""

import models  # noqa: F401  (first: keeps gradio out of client processes)

# isort: split

from typing import Any

from openenv.core.client_types import StepResult
from openenv.core.env_client import EnvClient

from models import TraceFixAction, TraceFixObservation, TraceFixState


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
