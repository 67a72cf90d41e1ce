"""What the model is told: the system prompt and the action tool, both derived from the
action registry."""

from __future__ import annotations

import json
from typing import Any

from tracefix_rl.actions import ACTIONS
from tracefix_rl.models import TraceFixAction

THOUGHT_NOTE = ' Include a short "thought" field explaining your reasoning.'


def system_prompt() -> str:
    """The instructions: the reply format, then every action of the registry (an example
    of each form, then what it does)."""
    examples = "\n".join(
        json.dumps({"action_type": action.name, **example})
        for action in ACTIONS
        for example in action.examples
    )
    actions = "\n".join(f"- {action.name}: {action.description}" for action in ACTIONS)
    return (
        "You are fixing a buggy Python program in a debugging environment.\n"
        "The first message gives the task description (the spec). Each turn you receive the "
        "result of your last action, and the latest message shows the current code with line "
        "numbers (earlier turns are summarised). Reply with exactly ONE action as a JSON "
        f"object:\n\n{examples}\n\nThe actions:\n{actions}\n\n"
        "Hidden tests grade the final code, so fix the bug for every input the spec allows, "
        "not just the visible tests. Run the tests before you submit."
    )


def _tool_property(schema: dict[str, Any]) -> dict[str, Any]:
    """One property of the wire schema as a tool parameter: an optional field's
    ``anyOf [X, null]`` becomes X (tool callers omit what they do not give)."""
    options = [o for o in schema.get("anyOf", [schema]) if o.get("type") != "null"]
    kept = options[0] if len(options) == 1 else {"anyOf": options}  # e.g. integer or string
    merged = {**kept, **{k: v for k, v in schema.items() if k == "description"}}
    return {k: v for k, v in merged.items() if k not in ("title", "default")}


def action_tool() -> dict[str, Any]:
    """The one tool offered to the model, ``act``, whose parameters are
    ``TraceFixAction``'s JSON schema (the wire contract) without ``metadata``."""
    schema = TraceFixAction.model_json_schema()
    properties = {
        name: _tool_property(prop)
        for name, prop in schema["properties"].items()
        if name != "metadata"
    }
    return {
        "type": "function",
        "function": {
            "name": "act",
            "description": "Take one action in the debugging environment.",
            "parameters": {
                "type": "object",
                "properties": properties,
                "required": schema.get("required", []),
                "additionalProperties": False,
            },
        },
    }
