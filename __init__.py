"""tracefix_rl: a debugging gym for LLM agents, served as an OpenEnv environment.

    from tracefix_rl import TraceFixEnv, TraceFixAction

    with TraceFixEnv(base_url="http://127.0.0.1:8000").sync() as env:
        result = env.reset(seed=7, difficulty="easy")
        result = env.step(TraceFixAction(action_type="RUN_TESTS"))

The names below are imported on first use, so importing a part of the package (the sandbox,
the task registry) does not import the client's dependencies.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TraceFixEnv": "tracefix_rl.client",
    "CapacityError": "tracefix_rl.client",
    "SessionClosed": "tracefix_rl.client",
    "SessionExpired": "tracefix_rl.client",
    "TraceFixAction": "tracefix_rl.models",
    "TraceFixObservation": "tracefix_rl.models",
    "TraceFixState": "tracefix_rl.models",
    "ResetArgs": "tracefix_rl.models",
    "TraceFixEnvironment": "tracefix_rl.environment",
    "TraceFixToolEnv": "tracefix_rl.tool_env",
    "task_dataset": "tracefix_rl.tool_env",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tracefix_rl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
