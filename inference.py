"""Baseline agent: evaluates an OpenAI-compatible model on the tracefix_rl gym.

    python inference.py                 # the benchmark set (the tasks listed in openenv.yaml)
    python inference.py --medium        # every medium task
    python inference.py --task ID --episodes 3 --trajectories runs.jsonl

stdout carries exactly these lines, each flushed (everything else goes to stderr):

    [START] task=<task_id> env=tracefix_rl model=<MODEL_NAME>
    [STEP] step=<n> action=<action> reward=<r:.2f> done=<true|false> error=<msg|null>
    [END] success=<true|false> steps=<n> score=<s:.3f> rewards=<r1,r2,...>

``score`` is the episode's normalised gain (the observation's ``gain``: 0 for code no better
than the buggy original, 1 when solved), clamped into [0.01, 0.99]. Every ``[START]`` gets its
``[END]``, also on SIGINT or SIGTERM: the episode in progress ends, a self-started environment
server is stopped, and the exit status is 130 or 143. The status is 1 when every episode
failed with an error (e.g. the LLM endpoint is unreachable), 2 for a bad variable, else 0.

The environment variables are :class:`AgentSettings`' fields (``--help`` lists them with
their defaults). When no server answers at ``ENV_URL`` and no image is given, a local server
is started on a free port and stopped at the end.

The agent lives in :mod:`tracefix_rl.agent`, one module per concern: ``config`` (the
variables), ``instructions`` (system prompt and action tool, from the action registry),
``parsing`` (actions out of replies), ``model`` (the OpenAI-compatible client), ``prompt``
(what each turn shows), ``environment`` (the server), ``signals``, ``output`` (the lines
above) and ``runner`` (episodes and the command line). The names below are re-exported for
scripts and tests that import them from here.
"""

from tracefix_rl import models  # noqa: F401  (first: keeps gradio out of this process)

# isort: split

import sys

from tracefix_rl.agent.config import AgentSettings
from tracefix_rl.agent.environment import Environment
from tracefix_rl.agent.instructions import action_tool, system_prompt
from tracefix_rl.agent.model import (
    CHARS_PER_TOKEN,
    CONTEXT_SHRINK,
    MIN_SHRINK,
    Model,
    Reply,
    classify_rejection,
    context_shrink,
    prompt_chars,
)
from tracefix_rl.agent.output import two_decimals
from tracefix_rl.agent.parsing import ParseError, parse_action, parse_arguments
from tracefix_rl.agent.prompt import (
    HISTORY_TURNS,
    OLD_REPLY_CHARS,
    Conversation,
    clamp_view,
    describe_action,
    feedback,
    render,
)
from tracefix_rl.agent.runner import main
from tracefix_rl.client import TraceFixEnv

__all__ = [
    "CHARS_PER_TOKEN", "CONTEXT_SHRINK", "HISTORY_TURNS", "MIN_SHRINK", "OLD_REPLY_CHARS",
    "AgentSettings", "Conversation", "Environment", "Model", "ParseError", "Reply",
    "TraceFixEnv", "action_tool", "clamp_view", "classify_rejection", "context_shrink",
    "describe_action", "feedback", "main", "parse_action", "parse_arguments", "prompt_chars",
    "render", "system_prompt", "two_decimals",
]  # fmt: skip

if __name__ == "__main__":
    sys.exit(main())
