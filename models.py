"""Wire contract of tracefix_rl: the Action, Observation and State models.

The Action accepts TraceFix-RL's JSON unchanged; its ``action_type`` values and parameter
fields are derived from the action registry (:mod:`tracefix_rl.actions`). Everything a
client needs is a declared Observation field. Import this module before any ``openenv``
module (see ``_DeferWebInterface``).
"""

from __future__ import annotations

import importlib.abc
import os
import sys
from typing import Literal

WEB_INTERFACE_ENV = "ENABLE_WEB_INTERFACE"
_WEB_MODULE = "openenv.core.env_server.web_interface"


_web_interface_allowed = False


def allow_web_interface() -> None:
    """Let OpenEnv's Gradio web interface be imported in this process (the server calls it
    when its settings enable the web UI)."""
    global _web_interface_allowed
    _web_interface_allowed = True


def web_interface_enabled() -> bool:
    """True once :func:`allow_web_interface` was called, or when ``ENABLE_WEB_INTERFACE``
    asks for OpenEnv's Gradio playground at /web (for OpenEnv's own ``create_app``, which
    reads that variable itself)."""
    flag = os.environ.get(WEB_INTERFACE_ENV, "false").lower() in ("true", "1", "yes")
    return _web_interface_allowed or flag


class _DeferWebInterface(importlib.abc.MetaPathFinder):
    """Keep gradio out of processes that do not serve the web UI.

    openenv-core 0.3 imports its Gradio web interface eagerly (≈8 s of start-up here) but
    tolerates ``ModuleNotFoundError`` for it. Until the web UI is enabled, this finder
    declines that one module; ``create_app`` imports it lazily when it is enabled.
    """

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> None:
        if fullname == _WEB_MODULE and not web_interface_enabled():
            raise ModuleNotFoundError(f"{_WEB_MODULE} deferred (web UI disabled)", name=fullname)
        return None


if not any(isinstance(f, _DeferWebInterface) for f in sys.meta_path):
    sys.meta_path.insert(0, _DeferWebInterface())

import re  # noqa: E402
from typing import Annotated, Any  # noqa: E402

from openenv.core.env_server.types import Action, Observation, State  # noqa: E402
from pydantic import (  # noqa: E402
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    create_model,
    field_validator,
    model_validator,
)

from tracefix_rl.actions import ACTIONS, wire_fields  # noqa: E402
from tracefix_rl.tasks.vocabulary import DIFFICULTIES, SPLITS, Difficulty, Split  # noqa: E402,F401

ACTION_TYPES: tuple[str, ...] = tuple(action.name for action in ACTIONS)
ActionType = Literal[ACTION_TYPES]  # type: ignore[valid-type]
MAX_STEPS_LIMIT = 1000
ID_MAX_CHARS = 255

# -- text that is safe on every wire -----------------------------------------------------------

_SURROGATE = re.compile("[\ud800-\udfff]")


def escape_surrogates(text: str) -> str:
    """``text`` with every lone surrogate replaced by its backslash escape (``\\udcff``).

    A Python ``str`` may hold surrogate code points (agent code can raise
    ``ValueError('\\udcff')``, JSON can carry ``"\\ud800"``), but UTF-8 cannot encode them, so
    one such character in an observation made every response of its episode a 500. Inside a
    Python string literal the escape means the same character, so code keeps its meaning.
    """
    if text.isascii():
        return text
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def escape_surrogates_in(value: Any) -> Any:
    """:func:`escape_surrogates` applied to every string (and key) inside JSON-like data."""
    if isinstance(value, str):
        return escape_surrogates(value)
    if isinstance(value, dict):
        return {escape_surrogates_in(k): escape_surrogates_in(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [escape_surrogates_in(v) for v in value]
    return value


def _escaped(value: Any) -> Any:
    return escape_surrogates(value) if isinstance(value, str) else value


SafeText = Annotated[str, BeforeValidator(_escaped)]
"""A string that arrived from a client or from agent code, made encodable as UTF-8 (before
its length limits apply: the limits hold for the escaped text that is stored and echoed)."""


def json_integer(value: Any) -> Any:
    """Before-validator of a ``StrictInt`` field: accept a JSON integer as JSON Schema defines
    it, an int or a float with no fractional part (``5.0``), and never a bool or a string.

    Lax ``int`` took ``true`` as 1 and ``"5"`` as 5, which the published schema (``"type":
    "integer"``) refuses; ``StrictInt`` alone refused ``5.0``, which the schema accepts
    (issue 10: schemathesis found both). A field validator, not ``Annotated[...,
    BeforeValidator]``: with the latter pydantic 2.14 publishes ``ge`` as ``"ge"`` instead of
    ``"minimum"`` in the JSON schema.
    """
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):  # a list[int] field: each item alike
        return [int(v) if isinstance(v, float) and v.is_integer() else v for v in value]
    return value


_CHOICE_BLANKS = " \t\r\n"


def _normalized(value: Any) -> Any:
    """Lower-case and strip a string choice; an empty one means "not given".

    ASCII only (letters and the blanks of ``_CHOICE_BLANKS``), so that :func:`choice_schema`
    can publish exactly what is accepted: ``str.strip()`` also strips the separators U+001C
    to U+001F, which a JSON Schema pattern's ``\\s`` does not match (issue 10: schema and
    behaviour agree).
    """
    if isinstance(value, str) and value.isascii():
        return value.strip(_CHOICE_BLANKS).lower() or None
    return value


def choice_schema(choices: tuple[str, ...]) -> dict[str, Any]:
    """JSON schema of an optional choice read by :func:`_normalized`: one of ``choices``,
    or the same in any ASCII case with surrounding blanks, or blank (not given), or null."""
    blanks = "[ \\t\\r\\n]*"
    words = "|".join(
        "".join(f"[{c.upper()}{c}]" if c.isalpha() else re.escape(c) for c in word)
        for word in choices
    )
    return {"anyOf": [
        {"type": "string", "enum": list(choices)},
        {"type": "string", "pattern": f"^{blanks}(?:{words})?{blanks}$"},
        {"type": "null"},
    ]}  # fmt: skip


_WIRE_TYPES: dict[Any, Any] = {
    int: StrictInt,
    str: SafeText,
    list[int]: list[StrictInt],
    list[str]: list[SafeText],
    int | str: StrictInt | SafeText,
}
"""How an action parameter's type is accepted on the wire (see :func:`json_integer` and
:data:`SafeText`)."""

_ACTION_DOC = """One agent action: ``action_type`` names it, and the other fields are the
parameters of the actions that take them (ignored by the others).

{actions}

``thought`` is free text the environment ignores (for transcripts)."""


def _action_model() -> type[Action]:
    """``TraceFixAction``, derived from the action registry: one optional field per action
    parameter (strict JSON integers, surrogate-safe strings), no other field."""
    params = wire_fields()
    fields: dict[str, Any] = {
        "action_type": (
            ActionType,
            Field(description="Which action to take."),
        )
    }
    for param in params:
        fields[param.name] = (
            _WIRE_TYPES[param.type] | None,
            Field(default=None, description=param.description),
        )
    fields["thought"] = (
        SafeText | None,
        Field(
            default=None, description="Optional free-text reasoning; ignored by the environment."
        ),
    )
    integers = [param.name for param in params if param.type in (int, list[int], int | str)]
    validators = {"_json_integers": field_validator(*integers, mode="before")(json_integer)}
    return create_model(
        "TraceFixAction",
        __base__=Action,
        __module__=__name__,
        __doc__=_ACTION_DOC.format(
            actions="\n".join(f"* ``{a.name}``: {a.description}" for a in ACTIONS)
        ),
        __validators__=validators if integers else None,
        **fields,
    )


TraceFixAction = _action_model()


class TestResult(BaseModel):
    """Outcome of one visible test."""

    __test__ = False  # not a pytest test class
    model_config = ConfigDict(extra="forbid")

    test_name: str
    passed: bool
    error_message: str | None = None


class TraceFixObservation(Observation):
    """What the agent sees after every reset and step.

    Every string in it is made encodable (:func:`escape_surrogates`) when it is built, so no
    text that agent code produced can keep an observation, and the score in it, from reaching
    the client.
    """

    @model_validator(mode="before")
    @classmethod
    def _encodable(cls, data: Any) -> Any:
        return escape_surrogates_in(data) if isinstance(data, dict) else data

    task_id: str = ""
    difficulty: str = ""
    description: str = Field(default="", description="The spec the fixed code must satisfy.")
    episode_id: str = ""
    code_dict: dict[int, str] = Field(
        default_factory=dict, description="The current file, line number -> text."
    )
    localized_context: str = Field(
        default="", description="Numbered window around the focus line, marked with '>>'."
    )
    last_execution_output: str = Field(
        default="", description="Test summary and captured output of the last run, or a note."
    )
    syntax_error: bool = False
    test_results: list[TestResult] = Field(
        default_factory=list, description="Visible tests of the last run (hidden never shown)."
    )
    tests_passed: int = Field(default=0, description="Visible tests passing in the last run.")
    tests_total: int = Field(default=0, description="Number of visible tests.")
    step_count: int = 0
    steps_remaining: int = 0
    reward_last_step: float = 0.0
    last_action_error: str | None = Field(
        default=None, description="Why the last action was rejected; null when it was valid."
    )
    score: float | None = Field(
        default=None, description="Final grade in [0, 1] over all tests, set when done."
    )
    gain: float | None = Field(
        default=None,
        description=(
            "Normalised gain over the buggy original, in [0, 1], set when done: 1 when solved; "
            "else (originally failing tests now passing - originally passing tests now "
            "failing) / originally failing tests, over visible and hidden tests, clamped to "
            "[0, 1]; so 0 for code no better than the buggy original."
        ),
    )
    solved: bool | None = Field(default=None, description="Every test passes (set when done).")
    truncated: bool | None = Field(
        default=None, description="The episode ended by reaching max_steps (set when done)."
    )


class TraceFixState(State):
    """Episode bookkeeping returned by ``state``."""

    task_id: str | None = None
    difficulty: str | None = None
    max_steps: int = 0
    done: bool = False


class ResetArgs(BaseModel):
    """Arguments of ``reset``, validated the same way over HTTP, WebSocket and in-process.

    ``task_id`` (alias ``task_name``) picks a task; otherwise ``seed`` picks one
    deterministically among the tasks of ``difficulty`` and ``split``; with neither, one is
    drawn at random. Other keys (e.g. the dataset columns a trainer passes) are ignored.
    """

    model_config = ConfigDict(extra="allow")

    seed: StrictInt | None = Field(
        default=None, ge=0, description="Picks the task deterministically (a non-negative int)."
    )
    episode_id: SafeText | None = Field(
        default=None,
        min_length=1,
        max_length=ID_MAX_CHARS,
        description="Echoed back verbatim in the observation and state; a uuid4 if omitted.",
    )
    task_id: SafeText | None = Field(
        default=None, min_length=1, max_length=ID_MAX_CHARS, description="Play this task."
    )
    task_name: SafeText | None = Field(
        default=None, min_length=1, max_length=ID_MAX_CHARS, description="Alias of task_id."
    )
    difficulty: Annotated[Difficulty | None, BeforeValidator(_normalized)] = Field(
        default=None,
        description="Draw among the tasks of this tier (case and blanks ignored).",
        json_schema_extra=choice_schema(DIFFICULTIES),
    )
    split: Annotated[Split | None, BeforeValidator(_normalized)] = Field(
        default=None,
        description="Draw among the tasks of this split (case and blanks ignored).",
        json_schema_extra=choice_schema(SPLITS),
    )
    max_steps: StrictInt | None = Field(
        default=None,
        ge=1,
        le=MAX_STEPS_LIMIT,
        description="Episode length for this episode (default: MAX_STEPS).",
    )
    index: StrictInt | None = Field(
        default=None,
        ge=0,
        description="Play the task at this index of the split (OpenEnv's Task API order: "
        "POST /tracefix_rl/tasks), among the tasks of `difficulty` if given.",
    )

    _json_integers = field_validator("seed", "max_steps", "index", mode="before")(json_integer)
