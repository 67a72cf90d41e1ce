"""The action registry: every module of this package (but ``base``) holds one action.

Everything that lists actions derives from :data:`ACTIONS`: the wire model's
``action_type`` and fields (:mod:`tracefix_rl.models`), the environment's dispatch, the
baseline agent's prompt and tool schema (``inference.py``) and the README's action table
(:func:`action_table`, checked by a test). Adding an action is adding a module here with one
:class:`~tracefix_rl.actions.base.Action` subclass; ``python -m tracefix_rl.actions`` prints
the README table.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import operator
import pkgutil
from dataclasses import dataclass
from types import UnionType
from typing import Any, Union, get_args, get_origin

from tracefix_rl.actions.base import Action, ActionParams, NoParams

__all__ = [
    "ACTIONS",
    "Action",
    "ActionParams",
    "NoParams",
    "WIRE_KINDS",
    "WireField",
    "action_table",
    "get_action",
    "parameter_kind",
    "wire_fields",
]


def _discover() -> tuple[Action, ...]:
    """One instance of every concrete :class:`Action` subclass in this package, in order."""
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base" and not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")
    classes, pending = [], list(Action.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if not inspect.isabstract(cls) and cls.__module__.startswith(f"{__name__}."):
            classes.append(cls)
    actions = sorted((cls() for cls in classes), key=lambda action: (action.order, action.name))
    names = [action.name for action in actions]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise TypeError(f"two actions are named {', '.join(duplicated)}")
    for action in actions:
        for example in action.examples:
            action.Params.model_validate(example)
    return tuple(actions)


ACTIONS: tuple[Action, ...] = _discover()
_BY_NAME = {action.name: action for action in ACTIONS}


def get_action(name: str) -> Action:
    """The action called ``name`` (``KeyError`` if none is)."""
    return _BY_NAME[name]


@dataclass(frozen=True)
class WireField:
    """One parameter field of the wire model: its JSON type and what it means to each
    action that takes it."""

    name: str
    type: Any  # one of WIRE_KINDS
    description: str
    actions: tuple[str, ...]


WIRE_KINDS: tuple[Any, ...] = (int, str, list[int], list[str], int | str)
"""The types an action parameter may have (``None`` aside): the wire model accepts each
strictly (``models._WIRE_TYPES``)."""


def parameter_kind(annotation: Any) -> Any:
    """A parameter's type without ``None``: ``int | None`` is ``int``, ``int | str | None``
    is ``int | str``; ``TypeError`` unless it is one of :data:`WIRE_KINDS`."""
    if get_origin(annotation) in (Union, UnionType):
        kinds = [kind for kind in get_args(annotation) if kind is not type(None)]
        annotation = functools.reduce(operator.or_, kinds)
    if annotation not in WIRE_KINDS:
        raise TypeError(f"a parameter's type is one of {WIRE_KINDS} (or None), not {annotation}")
    return annotation


def wire_fields() -> list[WireField]:
    """Every action's parameters merged into one list (first use first): a field two
    actions share must have the same type; its descriptions are joined."""
    seen: dict[str, list[tuple[str, Any, str]]] = {}
    for action in ACTIONS:
        for name, info in action.Params.model_fields.items():
            try:
                kind = parameter_kind(info.annotation)
            except TypeError as exc:
                raise TypeError(f"{action.name}.{name}: {exc}") from None
            seen.setdefault(name, []).append((action.name, kind, info.description or ""))
    fields = []
    for name, uses in seen.items():
        types = {kind for _, kind, _ in uses}
        if len(types) > 1:
            raise TypeError(f"actions give the field {name} different types")
        texts = {text for _, _, text in uses}
        users = tuple(action for action, _, _ in uses)
        if len(texts) == 1:
            description = f"{' / '.join(users)}: {texts.pop()}"
        else:
            description = " ".join(f"{action}: {text}" for action, _, text in uses)
        fields.append(WireField(name, types.pop(), description, users))
    return fields


def action_table() -> str:
    """The README's action table (Markdown)."""
    rows = ["| action | parameters | what it does (as agents are told) |", "|---|---|---|"]
    for action in ACTIONS:
        params = []
        for name, info in action.Params.model_fields.items():
            params.append(f"`{name}`" if info.is_required() else f"`{name}`?")
        rows.append(f"| `{action.name}` | {', '.join(params) or '—'} | {action.description} |")
    return "\n".join(rows)
