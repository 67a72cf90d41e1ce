"""The base class of every action: what it is called, what the agent is told, what it takes,
and what it does.

One module in this package per action, holding one :class:`Action` subclass. The wire model
``TraceFixAction``, the environment's dispatch, the tool list given to LLMs and the README's
action table are all derived from those classes (see :mod:`tracefix_rl.actions`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from tracefix_rl.episode.errors import ActionError

if TYPE_CHECKING:
    from tracefix_rl.episode.state import Episode


class ActionParams(BaseModel):
    """Base of every action's ``Params``: the fields it reads from the wire action (the
    fields of other actions are ignored). Without fields: an action that takes none."""

    model_config = ConfigDict(extra="ignore")


NoParams = ActionParams


class Action(ABC):
    """One thing an agent can do in an episode.

    A subclass sets the class attributes and implements :meth:`apply`:

    * ``name`` — the ``action_type`` on the wire (upper snake case);
    * ``order`` — its place in every list shown to agents and people;
    * ``description`` — what an agent is told about it (the prompt, tool descriptions, the
      README's action table);
    * ``Params`` — an :class:`ActionParams` subclass (``int`` or ``str`` fields, each with a
      ``description``; a field without a default is required). The wire model has the union
      of every action's fields, each optional, so a field two actions share must have one
      type;
    * ``examples`` — parameter sets to show agents (each must validate).
    """

    name: ClassVar[str]
    order: ClassVar[int]
    description: ClassVar[str]
    Params: ClassVar[type[ActionParams]] = NoParams
    examples: ClassVar[tuple[dict[str, Any], ...]] = ({},)

    @abstractmethod
    def apply(self, episode: Episode, params: Any) -> float:
        """Do the action on ``episode``; return its reward on top of the step cost.

        Raise :class:`ActionError` to reject it (nothing may have changed then); a
        ``SandboxFailure`` means the step did not happen and must leave ``episode`` as it
        was."""

    def parse(self, fields: dict[str, Any]) -> ActionParams:
        """``Params`` from the wire action's fields (None meaning "not given"); a missing or
        invalid parameter is an :class:`ActionError` naming it."""
        given = {key: value for key, value in fields.items() if value is not None}
        try:
            return self.Params.model_validate(given)
        except ValidationError as exc:
            errors = exc.errors()
            missing = [str(e["loc"][0]) for e in errors if e["type"] == "missing"]
            if missing:
                hints = "; ".join(
                    f"{name}: {self.Params.model_fields[name].description}" for name in missing
                )
                raise ActionError(f"{self.name} needs {' and '.join(missing)} ({hints})") from None
            where = ".".join(str(part) for part in errors[0]["loc"])
            raise ActionError(f"{self.name}: {where}: {errors[0]['msg']}") from None

    def tool_schema(self) -> dict[str, Any]:
        """The JSON schema of this action's parameters alone (one tool per action, as MCP
        clients and tool-calling trainers expect)."""
        schema = self.Params.model_json_schema()
        schema.pop("title", None)
        schema.pop("description", None)  # the Params class's docstring: for developers
        for prop in schema.get("properties", {}).values():
            prop.pop("title", None)
        return schema

    def __repr__(self) -> str:
        return f"<action {self.name}>"
