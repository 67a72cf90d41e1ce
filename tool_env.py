"""``TraceFixToolEnv``: tracefix_rl as a TRL ``environment_factory`` (TRL 1.16's contract).

    from trl import GRPOConfig, GRPOTrainer
    from tracefix_rl import TraceFixToolEnv, task_dataset

    Env = TraceFixToolEnv.configured(base_url="http://127.0.0.1:8000", reward="return")
    trainer = GRPOTrainer(model=..., args=GRPOConfig(...),
                          train_dataset=task_dataset("http://127.0.0.1:8000", split="train"),
                          environment_factory=Env)

What TRL does with it, and what this class does in return:

* TRL calls the factory with no argument, pools the instances and reuses them across batches,
  and never calls ``close()``. Each instance holds one WebSocket session (one environment on
  the server), opened at the first ``reset`` and kept. A session the server ended between
  rollouts (idle for ``SESSION_TIMEOUT_S``, a restart) is replaced at the next ``reset``
  without the trainer noticing.
* ``reset(**row)`` gets every dataset column (``prompt`` included). Only the reset keys
  (:data:`RESET_KEYS`) are forwarded; the episode's task description and numbered code are
  returned, and TRL appends them to the prompt.
* Every public method but ``reset`` and ``get_reward`` is a tool: one per action of the
  registry (``view_code``, ``run_tests``, ``replace_lines``, ...), built from the action's
  name, description and typed parameters, with a Google-style docstring that
  ``transformers.utils.get_json_schema`` reads. Helpers start with ``_``. A tool returns
  what the step showed; an action the environment rejected, or any call after the episode
  ended, raises ``ValueError``, which TRL hands to the model as ``{"error": ...}`` (and
  counts in ``tools/failure_frequency``).
* ``get_reward()`` is called once per rollout, after the model stopped. There is no
  end-of-rollout hook, so **an episode the model did not submit is submitted there**
  (auto-SUBMIT): it is graded on every test like SUBMIT, and its reward counts.
  What ``get_reward`` returns is chosen by ``reward`` (:data:`REWARD_MODES`).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from tracefix_rl.actions import ACTIONS, Action, parameter_kind
from tracefix_rl.client import CapacityError, SessionClosed, TraceFixEnv
from tracefix_rl.episode.render import observation_text
from tracefix_rl.models import TraceFixAction, TraceFixObservation

if TYPE_CHECKING:
    from datasets import Dataset

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
RESET_KEYS = ("task_id", "seed", "difficulty", "split", "index")  # dataset columns forwarded
RewardMode = Literal["return", "score", "solved"]
REWARD_MODES: dict[str, str] = {
    "return": "the episode's return: the sum of its step rewards, the final grading's "
    "included (dense and potential-based; see the README's Reward section)",
    "score": "the final score: the fraction of all tests (visible and hidden) that pass",
    "solved": "1.0 if every test passes, else 0.0",
}
CAPACITY_RETRY_S = 60.0  # how long reset waits for a free session slot before it raises
CAPACITY_BACKOFF_S = (0.5, 5.0)  # first and largest pause between those attempts
TASK_PAGE = 1000  # tasks asked for per GET /tasks
DEFAULT_INSTRUCTION = (
    "Fix the bug in the Python program below so that it satisfies its description. Use the "
    "tools to look at the code, run the visible tests and replace lines; call submit when "
    "the tests pass (hidden tests grade the submission)."
)


def _tool_name(action: Action) -> str:
    return action.name.lower()


class _TraceFixTools:
    """The tool methods, one per action of the registry (see :func:`_tool_method`)."""


class TraceFixToolEnv(_TraceFixTools):
    """One tracefix_rl episode at a time over one WebSocket session, shaped for TRL's
    ``GRPOTrainer(environment_factory=...)``; see the module docstring.

    Configure a factory with :meth:`configured`; the class attributes are its defaults.
    """

    base_url: ClassVar[str] = DEFAULT_BASE_URL
    reward: ClassVar[RewardMode] = "return"
    message_timeout_s: ClassVar[float] = 120.0  # one reset or step, sandbox queueing included

    @classmethod
    def configured(
        cls,
        base_url: str = DEFAULT_BASE_URL,
        reward: RewardMode = "return",
        message_timeout_s: float = 120.0,
    ) -> type[TraceFixToolEnv]:
        """A zero-argument factory (a subclass, also named ``TraceFixToolEnv``, so TRL logs
        its reward under that name) for the server at ``base_url``."""
        if reward not in REWARD_MODES:
            raise ValueError(f"reward must be one of {', '.join(REWARD_MODES)}, got {reward!r}")
        if message_timeout_s <= 0:
            raise ValueError(f"message_timeout_s must be > 0, got {message_timeout_s!r}")
        attributes = {"base_url": base_url.rstrip("/"), "reward": reward,
                      "message_timeout_s": message_timeout_s, "__module__": cls.__module__,
                      "__qualname__": cls.__qualname__}  # fmt: skip
        return type(cls.__name__, (cls,), attributes)

    def __init__(self) -> None:
        self._client: Any = None  # a SyncEnvClient, connected at the first reset
        self._observation: TraceFixObservation | None = None
        self._return = 0.0
        self._done = True

    # -- TRL's contract ------------------------------------------------------------------------

    def reset(self, **row: Any) -> str:
        """Start an episode with the reset keys of ``row`` (the other columns are ignored);
        returns the task, its description and the numbered code."""
        kwargs = {key: row[key] for key in RESET_KEYS if row.get(key) is not None}
        observation = self._reset(kwargs)
        self._observation, self._return, self._done = observation, 0.0, observation.done
        return _task_text(observation)

    def get_reward(self) -> float:
        """The rollout's reward (``reward`` of :meth:`configured`). An episode the model did
        not submit is submitted first."""
        if not self._done:
            try:
                self._act("SUBMIT", {}, raise_rejected=False)
            except ValueError:  # the session was lost: the return so far stands
                pass
        observation = self._observation
        if observation is None:
            return 0.0
        if self.reward == "score":
            return float(observation.score or 0.0)
        if self.reward == "solved":
            return 1.0 if observation.solved else 0.0
        return self._return

    # -- helpers (private: TRL turns public methods into tools) -----------------------------------

    def _reset(self, kwargs: dict[str, Any]) -> TraceFixObservation:
        """Reset over the session, opening one (again) if there is none or the server ended
        it; waits up to :data:`CAPACITY_RETRY_S` for a slot on a full server."""
        deadline = time.monotonic() + CAPACITY_RETRY_S
        pause, ended_once = CAPACITY_BACKOFF_S[0], False
        while True:
            if self._client is None:
                client = TraceFixEnv(base_url=self.base_url,
                                     message_timeout_s=self.message_timeout_s)  # fmt: skip
                self._client = client.sync()
            try:
                return self._client.reset(**kwargs).observation
            except CapacityError as exc:
                self._close()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RuntimeError(
                        f"the tracefix_rl server at {self.base_url} has no free session after "
                        f"{CAPACITY_RETRY_S:.0f} s: raise its MAX_CONCURRENT_ENVS to at least the "
                        "number of environments the trainer runs at once (the generation batch)"
                    ) from exc
                time.sleep(min(pause, remaining))
                pause = min(2 * pause, CAPACITY_BACKOFF_S[1])
            except (SessionClosed, ConnectionError, OSError, TimeoutError):
                self._close()
                if ended_once:
                    raise
                ended_once = True  # the session ended between rollouts: open a new one

    def _close(self) -> None:
        """End the session (TRL never does; scripts may). A later ``reset`` opens another."""
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - it is gone either way
                pass

    def _act(self, action_type: str, params: dict[str, Any], raise_rejected: bool = True) -> str:
        """Play one action; the text of what it showed. Raises ``ValueError`` (for TRL, an
        error message to the model) after the end, and for a rejected action."""
        if self._done:
            raise ValueError("the episode is over: no more actions")
        given = {key: value for key, value in params.items() if value is not None}
        try:
            result = self._client.step(TraceFixAction(action_type=action_type, **given))
        except (SessionClosed, ConnectionError, OSError, TimeoutError) as exc:
            self._done = True  # the episode is gone with its session; its return stays
            self._close()
            raise ValueError(f"the environment's session was lost ({exc}); episode over") from exc
        observation = result.observation
        self._observation = observation
        self._return += float(result.reward or 0.0)
        self._done = observation.done
        if observation.last_action_error and raise_rejected:
            raise ValueError(observation.last_action_error)
        return observation_text(observation)


def _tool_method(action: Action) -> Callable[..., str]:
    """A method that plays ``action``: its signature and Google-style docstring are built
    from the action's typed parameters (for ``get_json_schema``)."""
    required, optional = [], []
    args_doc = []
    for name, info in action.Params.model_fields.items():
        kind = parameter_kind(info.annotation)
        if info.is_required():
            required.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                              annotation=kind))  # fmt: skip
        else:
            optional.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                              default=None, annotation=kind | None))  # fmt: skip
        args_doc.append(f"    {name}: {' '.join((info.description or name).split())}")
    parameters = required + optional
    self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    signature = inspect.Signature([self_parameter, *parameters], return_annotation=str)

    def tool(self: TraceFixToolEnv, *args: Any, **kwargs: Any) -> str:
        bound = signature.bind_partial(self, *args, **kwargs)  # missing: the env explains
        return self._act(action.name, {k: v for k, v in bound.arguments.items() if k != "self"})

    name = _tool_name(action)
    doc = " ".join(action.description.split())
    if args_doc:
        doc += "\n\nArgs:\n" + "\n".join(args_doc)
    doc += "\n\nReturns:\n    What the step showed: its output, the tests, the reward."
    tool.__name__ = tool.__qualname__ = name
    tool.__doc__ = doc
    tool.__signature__ = signature  # type: ignore[attr-defined]
    tool.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": str}
    return tool


def _install_tools(actions: Iterable[Action]) -> None:
    for action in actions:
        setattr(_TraceFixTools, _tool_name(action), _tool_method(action))


_install_tools(ACTIONS)


# -- what the model reads -----------------------------------------------------------------------


def _numbered(observation: TraceFixObservation) -> str:
    return "\n".join(f"{n:4d} | {observation.code_dict[n]}" for n in sorted(observation.code_dict))


def _task_text(observation: TraceFixObservation) -> str:
    lines = len(observation.code_dict)
    return (
        f"\n\nTask {observation.task_id} ({observation.difficulty}).\n"
        f"Description:\n{observation.description}\n\n"
        f"Code ({lines} lines):\n{_numbered(observation)}\n\n"
        f"Visible tests: {observation.tests_total}. Steps allowed: "
        f"{observation.steps_remaining}."
    )


# -- datasets of tasks ---------------------------------------------------------------------------


def task_rows(
    base_url: str = DEFAULT_BASE_URL,
    split: str | None = "train",
    difficulty: str | None = None,
    source: str | None = None,
) -> list[dict[str, Any]]:
    """The tasks a server offers (``GET /tasks``), filtered: ``task_id``, ``difficulty``,
    ``split``, ``source`` and ``bug_type`` of each, in the registry's order."""
    import httpx

    filters = {"split": split, "difficulty": difficulty, "source": source}
    params = {key: value for key, value in filters.items() if value}
    rows: list[dict[str, Any]] = []
    with httpx.Client(base_url=base_url.rstrip("/"), timeout=30) as http:
        while True:
            reply = http.get("/tasks", params={**params, "offset": len(rows), "limit": TASK_PAGE})
            reply.raise_for_status()
            page = reply.json()
            rows.extend(page["tasks"])
            if not page["tasks"] or len(rows) >= page["total"]:
                return rows


def task_dataset(
    base_url: str = DEFAULT_BASE_URL,
    split: str | None = "train",
    difficulty: str | None = None,
    source: str | None = None,
    repeat: int = 1,
    instruction: str = DEFAULT_INSTRUCTION,
) -> Dataset:
    """A ``datasets.Dataset`` for ``GRPOTrainer``: one row per task of the server's registry
    (filtered by ``split``, ``difficulty`` and ``source``; each ``repeat`` times), with a
    conversational ``prompt`` (``instruction`` as the user message; ``reset`` appends the
    task), ``task_id``, ``difficulty`` and ``split``. Needs the ``datasets`` package."""
    from datasets import Dataset

    if repeat < 1:
        raise ValueError(f"repeat must be ≥ 1, got {repeat}")
    rows = task_rows(base_url, split, difficulty, source)
    if not rows:
        raise ValueError(f"the server at {base_url} has no task with split={split!r}, "
                         f"difficulty={difficulty!r}, source={source!r}")  # fmt: skip
    prompt = [{"role": "user", "content": instruction}]
    rows = [row for row in rows for _ in range(repeat)]
    return Dataset.from_dict({
        "prompt": [prompt] * len(rows),
        "task_id": [row["task_id"] for row in rows],
        "difficulty": [row["difficulty"] for row in rows],
        "split": [row["split"] for row in rows],
    })  # fmt: skip
