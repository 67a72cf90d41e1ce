"""The tracefix_rl environment: OpenEnv's reset / step / state over one episode at a time.

It only sequences; each concern lives in its own module:

* the actions (what each does, its parameters, what agents are told): :mod:`tracefix_rl.actions`,
  one module per action, dispatched here by ``action_type``;
* the episode (:mod:`tracefix_rl.episode`): its state, the editor buffer, grading (syntax
  check, sandbox, judge), the reward and the observation's texts.

A step is: find the action, validate its parameters, apply it to the episode (a rejected
action costs ``INVALID_ACTION_PENALTY``; a sandbox that cannot evaluate leaves the step
undone), count it, and grade the episode when it reaches ``max_steps``.
"""

from tracefix_rl import models  # noqa: F401  (first: keeps gradio out unless the web UI is on)

# isort: split

import random
import uuid
from importlib import metadata
from typing import Any

from openenv.core.env_server.interfaces import Environment
from openenv.core.env_server.types import EnvironmentMetadata

from tracefix_rl.actions import get_action
from tracefix_rl.episode.errors import ActionError
from tracefix_rl.episode.grading import Grader
from tracefix_rl.episode.reward import INVALID_ACTION_PENALTY, STEP_COST
from tracefix_rl.episode.state import Episode
from tracefix_rl.models import ResetArgs, TraceFixAction, TraceFixObservation, TraceFixState
from tracefix_rl.sandbox import SandboxBackend, SandboxFailure
from tracefix_rl.tasks import TaskRegistry, get_registry

DEFAULT_MAX_STEPS = 50
SNAPSHOT_FORMAT = 1  # of TraceFixEnvironment.snapshot(); bump when its content changes
_NOT_PARAMETERS = {"action_type", "thought", "metadata"}


class TraceFixEnvironment(Environment[TraceFixAction, TraceFixObservation, TraceFixState]):
    """A debugging episode: fix the buggy program so that every test passes.

    ``registry`` and ``sandbox`` default to the process-wide ones; ``max_steps`` is the
    episode length when ``reset`` does not give one (the server passes its setting).
    """

    SUPPORTS_CONCURRENT_SESSIONS = True

    def __init__(
        self,
        registry: TaskRegistry | None = None,
        sandbox: SandboxBackend | None = None,
        max_steps: int | None = None,
    ) -> None:
        super().__init__()
        self._registry = registry
        self._grader = Grader(sandbox)
        self._max_steps = DEFAULT_MAX_STEPS if max_steps is None else max_steps
        self._rng = random.Random()
        self._episode: Episode | None = None

    # -- public API ---------------------------------------------------------------------

    @property
    def registry(self) -> TaskRegistry:
        if self._registry is None:
            self._registry = get_registry()
        return self._registry

    @property
    def episode(self) -> Episode | None:
        """The episode being played (None before the first ``reset``)."""
        return self._episode

    @property
    def state(self) -> TraceFixState:
        if self._episode is None:
            return TraceFixState(max_steps=self._max_steps)
        return self._episode.state

    def reset(
        self,
        seed: int | None = None,
        episode_id: str | None = None,
        task_id: str | None = None,
        difficulty: str | None = None,
        task_name: str | None = None,
        max_steps: int | None = None,
        split: str | None = None,
        index: int | None = None,
        **kwargs: Any,
    ) -> TraceFixObservation:
        """Start an episode; the arguments are those of :class:`models.ResetArgs` (validated
        here, so every transport gets the same errors: a wrong type raises pydantic's
        ``ValidationError`` naming the field, an unknown task ``TaskSelectionError``).
        Unknown keyword arguments (e.g. dataset columns) are ignored.
        """
        args = ResetArgs(
            seed=seed, episode_id=episode_id, task_id=task_id, difficulty=difficulty,
            task_name=task_name, max_steps=max_steps, split=split, index=index,
        )  # fmt: skip
        task = self.registry.select(
            seed=args.seed, task_id=args.task_id or args.task_name, difficulty=args.difficulty,
            rng=self._rng, split=args.split, index=args.index,
        )  # fmt: skip
        state = TraceFixState(
            episode_id=args.episode_id if args.episode_id is not None else str(uuid.uuid4()),
            step_count=0,
            task_id=task.task_id,
            difficulty=task.difficulty,
            max_steps=self._max_steps if args.max_steps is None else args.max_steps,
            done=False,
        )
        self._episode = Episode(task, state, self._grader)
        self._reset_rubric()
        return self._episode.observe(0.0)

    def step(
        self, action: TraceFixAction, timeout_s: float | None = None, **kwargs: Any
    ) -> TraceFixObservation:
        """Apply one action; invalid actions are reported, never raised.

        When the sandbox cannot evaluate (busy, a fault of its own, or the evaluation was
        cancelled) the step does not happen: nothing changes, it is not counted, its reward
        is 0, and ``last_action_error`` says why, so the agent can retry. If that happens to
        the final grading at ``max_steps``, the episode stays open and the next step retries
        the grading instead of applying its action.
        """
        episode = self._episode
        if episode is None:
            return TraceFixObservation(
                done=False, reward=0.0, reward_last_step=0.0,
                last_action_error="no episode is running: call reset first",
            )  # fmt: skip
        state = episode.state
        if state.done:
            episode.error = "the episode is over: call reset to start a new one"
            return episode.observe(-INVALID_ACTION_PENALTY)
        episode.error = None
        if state.step_count >= state.max_steps:  # the final grading failed: retry it
            return episode.observe(self._grade_at_limit(episode))
        handler = get_action(action.action_type)
        reward = -STEP_COST
        try:
            params = handler.parse(action.model_dump(exclude=_NOT_PARAMETERS))
            reward += handler.apply(episode, params)
        except ActionError as exc:
            episode.error = str(exc)
            reward -= INVALID_ACTION_PENALTY
        except SandboxFailure as exc:
            episode.error = f"{exc} (the step was not counted and changed nothing)"
            return episode.observe(0.0)
        state.step_count += 1
        if not state.done and state.step_count >= state.max_steps:
            reward += self._grade_at_limit(episode)
        return episode.observe(reward)

    def _grade_at_limit(self, episode: Episode) -> float:
        """The final grading when ``max_steps`` is reached, as SUBMIT grades (busy sandboxes
        retried). If it cannot be done, the episode stays open and says so: 0 reward."""
        try:
            return episode.finish(truncated=True)
        except (SandboxFailure, ActionError) as exc:
            episode.error = (
                f"max_steps reached, but the final grading failed: {exc}; the episode stays "
                "open: send any action to retry the grading"
            )
            return 0.0

    def snapshot(self) -> dict[str, Any]:
        """The running episode as JSON data (``SNAPSHOT_FORMAT``), from which :meth:`restore`
        continues it in any process serving the same tasks (``server.redis_episodes``)."""
        if self._episode is None:
            raise ValueError("no episode is running: call reset first")
        return {"format": SNAPSHOT_FORMAT, "episode": self._episode.snapshot()}

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Continue the episode :meth:`snapshot` saved. ``ValueError`` for a snapshot of
        another format or another version of its task; ``TaskSelectionError`` for a task
        this process does not serve."""
        found = snapshot.get("format")
        if found != SNAPSHOT_FORMAT:
            raise ValueError(f"episode snapshot format {found!r} is not {SNAPSHOT_FORMAT} "
                             "(a replica of another version saved it)")  # fmt: skip
        data = snapshot["episode"]
        task = self.registry.get(data["task_id"])
        self._episode = Episode.restore(task, data, self._grader)

    def cancel(self) -> None:
        """Cancel this episode's evaluation in flight, if any (thread-safe): a queued one is
        dropped, a running one is killed, and its step reports the cancellation."""
        self._grader.cancel()

    def close(self) -> None:
        """Release the episode: the evaluation in flight is cancelled, later ones refused."""
        self._grader.close()

    # -- OpenEnv's Task API (GET /tracefix_rl/splits, POST /tracefix_rl/tasks, ...) ---------

    def list_splits(self) -> list[dict[str, str]]:
        """The splits: ``train``, and ``eval`` (programs held out of training)."""
        return [{"name": "train", "type": "train"}, {"name": "eval", "type": "test"}]

    def list_tasks(self, split: str) -> list[dict[str, object]]:
        """Every task of ``split``; ``reset(split=..., index=...)`` plays the one at ``index``."""
        return self.registry.task_specs(split)

    def num_tasks(self, split: str) -> int:
        return len(self.registry.task_specs(split))

    def get_task(self, split: str, index: int) -> dict[str, object]:
        """The task at ``index`` of ``split``; ``IndexError`` (HTTP 400) outside it."""
        found = self.registry.task_specs(split, index, index + 1) if index >= 0 else []
        if not found:
            raise IndexError(f"no task {index} in split {split!r}")
        return found[0]

    def get_task_range(
        self, split: str, start: int | None, stop: int | None
    ) -> list[dict[str, object]]:
        return self.registry.task_specs(split, start, stop)

    def get_metadata(self) -> EnvironmentMetadata:
        try:
            version = metadata.version("tracefix-rl")
        except metadata.PackageNotFoundError:
            version = "0.0.0"
        return EnvironmentMetadata(
            name="tracefix_rl",
            description=(
                "A debugging gym: fix a buggy Python program by viewing it, running its "
                "visible tests and replacing lines; graded in a sandbox on hidden tests."
            ),
            version=version,
            author="tracefix_rl",
        )
