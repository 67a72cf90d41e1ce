"""Episodes and the command line: plays each task, prints its lines, sums up."""

from __future__ import annotations

import argparse
import json
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tracefix_rl.agent.config import (
    BENCHMARK,
    DEFAULT_BUDGET_S,
    DEFAULT_MAX_STEPS,
    EXIT_ALL_FAILED,
    EXIT_BAD_CONFIG,
    EXIT_OK,
    FALLBACK_ACTION,
    REPO,
    SCORE_CEILING,
    SCORE_FLOOR,
    SIGNAL_EXIT_BASE,
    AgentSettings,
    settings_help,
)
from tracefix_rl.agent.environment import Environment
from tracefix_rl.agent.instructions import THOUGHT_NOTE, system_prompt
from tracefix_rl.agent.model import Model, check_endpoint
from tracefix_rl.agent.output import emit, log, one_line, two_decimals
from tracefix_rl.agent.prompt import Conversation, clamp_view, describe_action, feedback
from tracefix_rl.agent.signals import Interrupted, StopSignals
from tracefix_rl.settings import SettingsError, load_settings

# -- episodes -----------------------------------------------------------------------------------


@dataclass
class Episode:
    """One episode's record: what the transcript and the trajectories file report.
    ``messages`` is the whole conversation (every observation in full), ``score`` the raw
    pass fraction over all tests and ``gain`` the normalised gain (both set when done)."""

    task_id: str
    seed: int
    rewards: list[float] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    score: float | None = None
    gain: float | None = None
    solved: bool = False
    error: str | None = None

    def end_score(self) -> float:
        """``[END]``'s score: the gain clamped into [SCORE_FLOOR, SCORE_CEILING] (the floor
        when the episode did not end)."""
        return min(max(self.gain or 0.0, SCORE_FLOOR), SCORE_CEILING)


def run_episode(episode: Episode, env: Environment, model: Model, args: argparse.Namespace,
                deadline: float, stop: StopSignals) -> None:  # fmt: skip
    """Play one episode; prints [STEP] lines (the caller prints [START]/[END])."""
    system = system_prompt() + (THOUGHT_NOTE if args.thought else "")
    with env.session() as session:
        result = session.reset(task_id=episode.task_id, seed=episode.seed,
                               max_steps=args.max_steps)  # fmt: skip
        obs = result.observation
        conversation = Conversation(system, obs)
        episode.messages.append({"role": "system", "content": system})
        episode.messages.append({"role": "user", "content": conversation.first_message()})
        step = 0
        while not result.done:
            if time.monotonic() > deadline:
                episode.error = "wall-clock budget exhausted"
                log(f"{episode.task_id}: stopping, wall-clock budget exhausted")
                break
            reply = model.act(conversation.messages, deadline)
            if reply.cut_off:
                log(f"{episode.task_id}: reply cut off at max_tokens={model.max_tokens} "
                    "(finish_reason=length; raise LLM_MAX_TOKENS)")  # fmt: skip
            if reply.action is None:
                log(f"{episode.task_id}: could not parse the reply ({reply.error})")
            action = clamp_view(reply.action or FALLBACK_ACTION, len(obs.code_dict))
            if args.thought and action.thought:
                log(f"thought: {one_line(action.thought)}")
            result = session.step(action)
            obs = result.observation
            notice = feedback(reply, model.max_tokens)
            with stop.shielded():  # the step, its [STEP] line and its record go together
                step += 1
                reward = float(result.reward or 0.0)
                episode.rewards.append(reward)
                episode.actions.append(action.model_dump(exclude={"metadata"}, exclude_none=True))
                error = reply.error or obs.last_action_error
                emit(
                    f"[STEP] step={step} action={describe_action(action)} reward={reward:.2f} "
                    f"done={str(result.done).lower()} error={one_line(error) if error else 'null'}"
                )
                conversation.record(reply, action, obs, notice)
                episode.messages.append({"role": "assistant", "content": reply.raw})
                episode.messages.append({"role": "user", "content": conversation.latest_text()})
        if result.done:
            episode.score = obs.score
            episode.solved = bool(obs.solved)
            episode.gain = obs.gain
            if episode.gain is None:  # a server older than the gain field
                episode.gain = 1.0 if episode.solved else 0.0
                log(f"{episode.task_id}: the server reports no gain; scored {episode.gain}")


def benchmark_tasks() -> list[str]:
    manifest = yaml.safe_load((REPO / "openenv.yaml").read_text())
    return [entry["id"] for entry in manifest["tasks"]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run the baseline agent on tracefix_rl.",
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tier = parser.add_mutually_exclusive_group()
    for name in ("easy", "medium", "hard"):
        tier.add_argument(f"--{name}", dest="tier", action="store_const", const=name,
                          help=f"run every curated {name} task")  # fmt: skip
    parser.add_argument("--task", action="append", default=[], help="task id (repeatable)")
    parser.add_argument("--episodes", type=int, default=1, help="episodes per task")
    parser.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--thought", action="store_true", help="ask for and print thoughts")
    parser.add_argument("--trajectories", type=Path, help="write one JSON line per episode")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="wall-clock budget for the whole run")  # fmt: skip
    args = parser.parse_args(argv)
    if args.episodes < 1 or args.max_steps < 1:
        parser.error("--episodes and --max-steps must be at least 1")
    return args


def end_episode(episode: Episode, model_name: str, trajectories: Any) -> None:
    """Print the episode's [END] line and write its trajectory record."""
    rewards = ",".join(two_decimals(r) for r in episode.rewards)
    emit(
        f"[END] success={str(episode.solved).lower()} steps={len(episode.rewards)} "
        f"score={episode.end_score():.3f} rewards={rewards}"
    )
    if trajectories:
        trajectories.write(json.dumps({
            "task": episode.task_id, "model": model_name, "seed": episode.seed,
            "messages": episode.messages, "actions": episode.actions,
            "rewards": episode.rewards, "score": episode.score, "gain": episode.gain,
            "solved": episode.solved, "error": episode.error,
        }) + "\n")  # fmt: skip
        trajectories.flush()


def summary(episodes: list[Episode]) -> str:
    """The run in one line for stderr: N/M solved, the mean gain, the errors."""
    solved = sum(e.solved for e in episodes)
    errored = sum(e.error is not None for e in episodes)
    gains = [e.gain or 0.0 for e in episodes]
    mean = sum(gains) / len(gains) if gains else 0.0
    return f"{solved}/{len(episodes)} solved, mean gain {mean:.3f}, {errored} with errors"


def main(argv: list[str] | None = None) -> int:
    """Run the agent; returns the exit status (see the module's docstring)."""
    args = parse_args(argv)
    try:
        settings = load_settings(model=AgentSettings)
    except SettingsError as exc:
        log(f"invalid configuration:\n{exc}")
        return EXIT_BAD_CONFIG
    stop = StopSignals()
    stop.install()
    try:
        return run(args, settings, stop)
    finally:
        stop.restore()


def run(args: argparse.Namespace, settings: AgentSettings, stop: StopSignals) -> int:
    """The run: check the endpoint, get an environment, play every episode with its
    [START]/[END], stop what was started. Returns the exit status."""
    model_name = settings.model_name
    model = Model(settings, args.seed)
    deadline = time.monotonic() + args.budget_s
    listing = bool(args.tier and not args.task)
    env: Environment | None = None
    env_error = "no environment"
    episodes: list[Episode] = []
    trajectories = None
    try:
        with stop.armed():
            llm_problem = check_endpoint(settings.api_base_url, settings.llm_timeout_s)
            if llm_problem:
                log(llm_problem)
            if not llm_problem or listing:  # no environment is needed otherwise
                try:
                    env = Environment(settings.env_url, settings.local_image_name)
                except Exception as exc:  # noqa: BLE001 - reported on every episode's [END]
                    problem = f"{type(exc).__name__}: {one_line(str(exc))[:200]}"
                    env_error = f"environment unavailable: {problem}"
                    log(env_error)
            if listing and env is None:
                log("cannot list the tasks of a tier without an environment")
                return EXIT_ALL_FAILED
            tasks = args.task or (env.tasks(args.tier) if listing and env else benchmark_tasks())
        trajectories = args.trajectories.open("w") if args.trajectories else None
        runs = [task_id for task_id in tasks for _ in range(args.episodes)]
        for index, task_id in enumerate(runs):
            if stop.pending:
                break
            episode = Episode(task_id=task_id, seed=args.seed + index)
            emit(f"[START] task={task_id} env={BENCHMARK} model={model_name}")
            episodes.append(episode)
            try:
                with stop.armed():
                    if llm_problem:
                        raise RuntimeError(llm_problem)
                    if env is None:
                        raise RuntimeError(env_error)
                    if time.monotonic() > deadline:
                        raise RuntimeError("wall-clock budget exhausted before this episode")
                    run_episode(episode, env, model, args, deadline, stop)
            except Interrupted as exc:
                episode.error = f"interrupted by {exc}"
            except Exception as exc:  # noqa: BLE001 - every failure still ends with [END]
                episode.error = f"{type(exc).__name__}: {one_line(str(exc))[:300]}"
                log(f"{task_id}: episode failed: {episode.error}")
            end_episode(episode, model_name, trajectories)
    except Interrupted:  # outside any episode: nothing to end
        pass
    finally:
        if trajectories:
            trajectories.close()
        if env is not None:
            env.close()
        if episodes:
            log(summary(episodes))
    if stop.signum is not None:
        log(f"stopped by {signal.Signals(stop.signum).name}")
        return SIGNAL_EXIT_BASE + stop.signum
    if episodes and all(e.error is not None for e in episodes):
        return EXIT_ALL_FAILED
    return EXIT_OK
