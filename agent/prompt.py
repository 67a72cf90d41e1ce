"""What the model is shown each turn: the latest observation, earlier steps summarised, and
the conversation kept within the context budget."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tracefix_rl.agent.model import Reply, prompt_chars
from tracefix_rl.agent.output import clip, one_line
from tracefix_rl.episode.render import clip_output
from tracefix_rl.models import TraceFixAction, TraceFixObservation

# -- what the model is shown --------------------------------------------------------------------

HISTORY_TURNS = 6  # earlier steps shown as turns, at most
OUTPUT_CHARS = 1500  # of the last action's output in the latest message
SHORT_OUTPUT_CHARS = 400  # when the budget is tight
SUMMARY_CHARS = 300  # of an earlier step's output
OLD_REPLY_CHARS = 600  # an earlier reply longer than this is shown compacted
OLD_BLOCK_CHARS = 200  # a longer new_code_block of an earlier reply is left out
OMITTED_NAMES = 30  # steps named in the "not shown" note, at most
EMPTY_REPLY = "(empty reply)"  # an assistant message is never empty


def tests_line(obs: TraceFixObservation) -> str:
    """The visible tests' status: "not run yet" before the first run, else the last run's."""
    if not obs.test_results:
        return "Visible tests passing: not run yet."
    return f"Visible tests passing: {obs.tests_passed}/{obs.tests_total} (last run)."


def render(obs: TraceFixObservation, notice: str | None = None,
           output_chars: int = OUTPUT_CHARS) -> str:  # fmt: skip
    """The latest observation in full: the note about the last reply, the rejection, the
    last action's output (head and tail, ``output_chars`` at most), the whole code with line
    numbers."""
    lines = [obs.code_dict[k] for k in sorted(obs.code_dict)]
    parts = []
    if notice:
        parts.append(notice)
    if obs.last_action_error:
        parts.append(f"Your last action was rejected: {obs.last_action_error}")
    output = obs.last_execution_output
    if output_chars > 0 and output:
        parts.append(f"Result of the last action:\n{clip_output(output, output_chars)}")
    numbered = "\n".join(f"{n:4d} | {text}" for n, text in enumerate(lines, 1))
    parts.append(f"Code ({len(lines)} lines):\n{numbered}")
    if obs.syntax_error:
        parts.append("The code currently has a syntax error.")
    parts.append(f"{tests_line(obs)} Steps left: {obs.steps_remaining}. "
                 "Reply with one JSON action.")  # fmt: skip
    return "\n\n".join(parts)


def summarize(obs: TraceFixObservation, notice: str | None = None) -> str:
    """An earlier observation in brief (no code): the note, the rejection, the start of the
    output, the tests."""
    parts = []
    if notice:
        parts.append(notice)
    if obs.last_action_error:
        parts.append(f"Rejected: {clip(one_line(obs.last_action_error), SUMMARY_CHARS)}")
    if obs.last_execution_output:
        parts.append(f"Result: {clip(obs.last_execution_output.strip(), SUMMARY_CHARS)}")
    parts.append(f"{tests_line(obs)} (Code not repeated: the latest message shows it.)")
    return "\n".join(parts)


def feedback(reply: Reply, max_tokens: int) -> str | None:
    """What the next message tells the model about its reply: that it held no action and
    why (a VIEW_CODE was done instead), or that it was cut off at the token limit."""
    if reply.action is None:
        return (
            f"Your last reply was not a valid action ({reply.error}), so VIEW_CODE was done "
            'instead. Reply with exactly one JSON object, e.g. {"action_type": "RUN_TESTS"}.'
        )
    if reply.cut_off:
        return (
            f"Your last reply was cut off at the {max_tokens}-token limit (its action was "
            "still read). Keep replies short: replace only the lines that change."
        )
    return None


def describe_action(action: TraceFixAction) -> str:
    """Compact, single-token rendering for the [STEP] line (no spaces)."""
    kind = action.action_type
    if kind == "REPLACE_LINES":
        block = action.new_code_block or ""
        count = len(block.split("\n")) if block else 0
        return f"REPLACE_LINES({action.start_line}-{action.end_line},{count}_lines)"
    if kind == "VIEW_CODE" and action.start_line is not None:
        end = action.end_line if action.end_line is not None else ""
        return f"VIEW_CODE({action.start_line}-{end})"
    return kind


@dataclass
class Turn:
    """One step as the model sees it again: its reply, the action sent, whether the reply
    held that action, and the observation after it in brief."""

    reply: str
    action: TraceFixAction
    parsed: bool
    summary: str

    def shown(self) -> str:
        """The reply as the last turn shows it: whole ("(empty reply)" for none)."""
        return self.reply if self.reply.strip() else EMPTY_REPLY

    def compact(self) -> str:
        """The reply as an earlier turn shows it: whole when short, else the action with a
        long ``new_code_block`` left out (the latest message shows the code)."""
        if len(self.reply) <= OLD_REPLY_CHARS:
            return self.shown()
        if not self.parsed:
            return clip(self.reply, OLD_REPLY_CHARS)
        data = self.action.model_dump(exclude={"metadata", "thought"}, exclude_none=True)
        block = data.get("new_code_block")
        if isinstance(block, str) and len(block) > OLD_BLOCK_CHARS:
            data["new_code_block"] = f"... ({len(block.splitlines())} lines, left out here)"
        return json.dumps(data)


class Conversation:
    """What the model is shown: the system prompt, the task, the recent turns (replies and
    brief results, at most ``HISTORY_TURNS``), and the latest observation in full: the only
    message with the code. :meth:`messages` fits it into a size budget."""

    def __init__(self, system: str, obs: TraceFixObservation) -> None:
        self.system = system
        self.header = f"Task {obs.task_id} ({obs.difficulty}).\nSpec:\n{obs.description}"
        self.turns: list[Turn] = []
        self.latest = obs
        self.notice: str | None = None

    def record(self, reply: Reply, action: TraceFixAction, obs: TraceFixObservation,
               notice: str | None) -> None:  # fmt: skip
        """Add a step: the model's ``reply``, the ``action`` sent, the observation after it,
        and the note for the model about its reply."""
        summary = summarize(obs, notice)
        self.turns.append(Turn(reply.raw, action, reply.action is not None, summary))
        self.latest, self.notice = obs, notice

    def first_message(self) -> str:
        """The first user message: the task, then the first observation in full."""
        return f"{self.header}\n\n{self.latest_text()}"

    def latest_text(self, output_chars: int = OUTPUT_CHARS) -> str:
        """The latest observation in full (see :func:`render`)."""
        return render(self.latest, self.notice, output_chars)

    def messages(self, budget: int) -> list[dict[str, Any]]:
        """The richest prompt within ``budget`` characters (as :func:`prompt_chars` counts
        them): older turns go first, then the last reply's code, then the output; the
        smallest form when none fits."""
        candidate: list[dict[str, Any]] = []
        for output_chars in (OUTPUT_CHARS, SHORT_OUTPUT_CHARS, 0):
            latest = self.latest_text(output_chars)
            for candidate in self._forms(latest):
                if prompt_chars(candidate, None) <= budget:
                    return candidate
        return candidate

    def _forms(self, latest: str) -> Iterator[list[dict[str, Any]]]:
        """The prompt's forms, from the longest to the shortest."""
        if not self.turns:
            yield self._assemble(latest, [], None, 0)
            return
        last = self.turns[-1]
        for keep in range(min(len(self.turns) - 1, HISTORY_TURNS - 1), -1, -1):
            older = self.turns[len(self.turns) - 1 - keep : -1]
            omitted = len(self.turns) - 1 - keep
            yield self._assemble(latest, older, last.shown(), omitted)
        yield self._assemble(latest, [], last.compact(), len(self.turns) - 1)
        yield self._assemble(latest, [], None, len(self.turns))

    def _assemble(self, latest: str, older: list[Turn], last_reply: str | None,
                  omitted: int) -> list[dict[str, Any]]:  # fmt: skip
        """system, the task (with a note naming ``omitted`` earlier steps), the ``older``
        turns, the last reply and the latest observation; with no last reply, the latest
        observation joins the task message (roles alternate user/assistant)."""
        header = self.header
        if omitted:
            names = [describe_action(t.action) for t in self.turns[:omitted]][-OMITTED_NAMES:]
            header += f"\n\n({omitted} earlier steps are not shown: {', '.join(names)}.)"
        messages = [{"role": "system", "content": self.system}]
        if last_reply is None:
            messages.append({"role": "user", "content": f"{header}\n\n{latest}"})
            return messages
        messages.append({"role": "user", "content": header})
        for turn in older:
            messages.append({"role": "assistant", "content": turn.compact()})
            messages.append({"role": "user", "content": turn.summary})
        messages.append({"role": "assistant", "content": last_reply})
        messages.append({"role": "user", "content": latest})
        return messages


def clamp_view(action: TraceFixAction, line_count: int) -> TraceFixAction:
    """A VIEW_CODE whose ``end_line`` lies past the end of the file shows up to its last
    line (the environment rejects such a range); any other action is returned as it is."""
    if (action.action_type == "VIEW_CODE" and action.end_line is not None
            and line_count and action.end_line > line_count
            and (action.start_line or 1) <= line_count):  # fmt: skip
        return action.model_copy(update={"end_line": line_count})
    return action
