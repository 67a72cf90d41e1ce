"""The ``/web`` playground: a page where a person plays an episode from start to ``solved``.

Mounted by ``server.app`` through openenv's supported hook
(``create_web_interface_app(..., gradio_builder=Playground.build, show_default_tab=False)``),
only when ``ENABLE_WEB_INTERFACE`` is on; importing this module imports gradio.

The contract:

* **Same rules, same code.** Every browser session plays in a :class:`TraceFixEnvironment`
  made by the factory the server uses for ``/ws`` and HTTP episodes (the loader's task
  registry and sandbox, ``MAX_STEPS``). The page only turns form fields into a
  ``TraceFixAction`` and an observation into widgets; the environment validates, applies,
  rewards and grades, as for any agent.
* **Controls derive from the action registry.** :func:`control_specs` lists one control per
  action of :data:`tracefix_rl.actions.ACTIONS`, in order, with exactly that action's
  ``Params`` fields: a Python editor for a code field, else a text box read as the field's
  type (``int``, ``list[int]``, ``list[str]``, ``int | str``; gradio's number box cannot be
  left empty, which an optional line number must be). Adding an action module adds its
  control. An action whose fields are ``start_line``, ``end_line`` and
  a code field (REPLACE_LINES) gets that field prefilled with the lines of the range, so a fix
  is an edit of the shown text.
* **One episode per browser session**, in a ``gr.State`` holding a :class:`PlaySession`.
  :class:`PlaySessions` bounds them (:data:`MAX_SESSIONS`; when full, the least recently
  used one idle for :data:`EVICT_IDLE_S` makes room, else the page says the playground is
  full) and closes each environment when its session ends: the tab closes (gradio's
  ``unload``), the state expires after ``idle_timeout_s`` without an event (``gr.State``'s
  ``time_to_live`` and ``delete_callback``), it is evicted, or the server shuts down.
* **Nothing reaches the server as an error.** Every handler catches what it does not expect,
  logs it (stderr) and shows a message in the page; a bad input (a missing field, ``x`` for a
  line number) is a message too, and costs no step.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import html
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gradio as gr
from pydantic import ValidationError

from tracefix_rl.actions import ACTIONS, Action, parameter_kind
from tracefix_rl.environment import TraceFixEnvironment
from tracefix_rl.episode.render import FOCUS_MARK
from tracefix_rl.models import TraceFixAction, TraceFixObservation
from tracefix_rl.tasks import TaskRegistry, TaskSelectionError
from tracefix_rl.tasks.schema import SOURCE_GENERATED
from tracefix_rl.tasks.vocabulary import DIFFICULTIES, SPLITS

log = logging.getLogger("tracefix_rl.server.playground")

TITLE = "tracefix_rl playground"
MAX_SESSIONS = 32  # browser sessions holding an environment at once
EVICT_IDLE_S = 120.0  # when full, a session idle this long may be closed to make room
ANY = "any"
README_PATH = Path(__file__).resolve().parents[1] / "README.md"
RANGE_FIELDS = ("start_line", "end_line")  # with a code field: prefilled from the range
TEST_HEADERS = ["test", "result", "reason"]
HISTORY_HEADERS = ["step", "action", "parameters", "reward", "return", "note"]
HISTORY_WIDTHS = ["6%", "14%", "34%", "8%", "8%", "30%"]
NO_EPISODE = "No episode yet: pick a task above and press a Play button."
NOT_RUNNING = ("No episode is running (none was started, or it was closed after being idle): "
               "pick a task above and press a Play button.")  # fmt: skip
CLOSED = "This episode was closed (idle too long, or to make room): start a new one."

RegistrySource = Callable[[], TaskRegistry | None]
Controls = dict[str, tuple[Any, list[Any]]]  # action -> (its button, its field widgets)
EnvironmentFactory = Callable[[], TraceFixEnvironment]


# openenv's generic web UI's backend: one episode shared by every visitor (and its broadcast
# socket), answering 500 to a bad reset or action. The playground does not use them.
GENERIC_UI_ROUTES = frozenset({"/web/reset", "/web/step", "/web/state", "/ws/ui"})


def remove_generic_ui_routes(app: Any) -> None:
    """Drop :data:`GENERIC_UI_ROUTES` from ``app`` (``/web/metadata`` stays)."""
    app.router.routes[:] = [route for route in app.router.routes
                            if getattr(route, "path", None) not in GENERIC_UI_ROUTES]  # fmt: skip


class PlaygroundError(Exception):
    """A problem to show in the page instead of acting (bad input, no episode, full)."""


# -- the controls, from the action registry -------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One parameter of one action, as the page asks for it."""

    name: str
    kind: Any  # one of actions.WIRE_KINDS
    required: bool
    description: str

    @property
    def is_code(self) -> bool:
        """A ``str`` field that holds code (shown in a Python editor)."""
        return self.kind is str and "code" in self.name


@dataclasses.dataclass(frozen=True)
class ControlSpec:
    """One action's control: its button and the fields of its ``Params``."""

    action: str
    description: str
    fields: tuple[FieldSpec, ...]

    @property
    def range_prefill(self) -> FieldSpec | None:
        """The code field prefilled from ``start_line``..``end_line``, if this control has
        both and one code field (REPLACE_LINES)."""
        names = {f.name for f in self.fields}
        codes = [f for f in self.fields if f.is_code]
        return codes[0] if set(RANGE_FIELDS) <= names and len(codes) == 1 else None


def control_specs(actions: Sequence[Action] = ACTIONS) -> list[ControlSpec]:
    """One :class:`ControlSpec` per action of ``actions`` (the registry), in its order, with
    exactly the fields of the action's ``Params``."""
    return [
        ControlSpec(
            action=action.name,
            description=action.description,
            fields=tuple(
                FieldSpec(
                    name,
                    parameter_kind(info.annotation),
                    info.is_required(),
                    info.description or "",
                )
                for name, info in action.Params.model_fields.items()
            ),
        )
        for action in actions
    ]


def element_id(action: str, field: str | None = None) -> str:
    """The DOM id of an action's button (``tf-action-run_tests``) or of one of its fields
    (``tf-replace_lines-start_line``)."""
    return f"tf-action-{action.lower()}" if field is None else f"tf-{action.lower()}-{field}"


def parse_field(spec: FieldSpec, raw: Any) -> Any:
    """The wire value of ``raw`` (what the widget holds) for ``spec``; None when left empty.
    Raises :class:`PlaygroundError` naming the field when it cannot be read."""
    if raw is None or (isinstance(raw, str) and not raw.strip() and not spec.is_code):
        return None
    if spec.kind is int:
        if isinstance(raw, float) and not raw.is_integer():
            raise PlaygroundError(f"{spec.name} must be a whole number, not {raw}")
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise PlaygroundError(f"{spec.name} must be a whole number, not {raw!r}") from None
    text = str(raw)
    if spec.kind == list[int]:
        items = [item for item in re.split(r"[\s,]+", text.strip()) if item]
        if not all(re.fullmatch(r"-?\d+", item) for item in items):
            raise PlaygroundError(f"{spec.name}: write whole numbers separated by commas")
        return [int(item) for item in items]
    if spec.kind == list[str]:
        return [line.strip() for line in text.splitlines() if line.strip()]
    if spec.kind == int | str:
        return int(text.strip()) if re.fullmatch(r"\d+", text.strip()) else text.strip()
    return text


def build_action(spec: ControlSpec, values: Sequence[Any]) -> TraceFixAction:
    """The wire action of ``spec``'s control holding ``values`` (one per field, in order).
    A required field left empty, or a value the wire model refuses, raises
    :class:`PlaygroundError`; everything else is the environment's to judge."""
    params: dict[str, Any] = {}
    for field, raw in zip(spec.fields, values, strict=True):
        value = parse_field(field, raw)
        if value is None and field.required:
            raise PlaygroundError(f"{spec.action} needs {field.name}: {field.description}")
        if value is not None:
            params[field.name] = value
    try:
        return TraceFixAction(action_type=spec.action, **params)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise PlaygroundError(f"{spec.action}: {where}: {first['msg']}") from None


# -- sessions ---------------------------------------------------------------------------------


@dataclasses.dataclass
class HistoryRow:
    step: int
    action: str
    parameters: str
    reward: float
    total: float
    note: str


@dataclasses.dataclass
class PlaySession:
    """One browser session's environment and what the page shows of its episode.

    ``lock`` serializes the session's events (a double click must not step the
    environment from two threads); ``closed`` is set once its environment is closed."""

    env: TraceFixEnvironment
    key: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    browser: str | None = None  # gradio's session hash, for the unload event
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    last_used: float = dataclasses.field(default_factory=time.monotonic)
    closed: bool = False
    observation: TraceFixObservation | None = None
    original: list[str] = dataclasses.field(default_factory=list)
    history: list[HistoryRow] = dataclasses.field(default_factory=list)
    total: float = 0.0
    message: str | None = None  # a note of the page's own (bad input, ...)

    def __deepcopy__(self, memo: dict[int, Any]) -> PlaySession:
        return self  # one environment per session: never copied


class PlaySessions:
    """The playground's sessions: at most ``capacity``, each closed when it ends (see the
    module docstring). Thread-safe."""

    def __init__(self, new_environment: EnvironmentFactory, capacity: int = MAX_SESSIONS,
                 evict_idle_s: float = EVICT_IDLE_S) -> None:  # fmt: skip
        self._new_environment = new_environment
        self.capacity = capacity
        self.evict_idle_s = evict_idle_s
        self._sessions: dict[str, PlaySession] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, browser: str | None) -> PlaySession:
        """A new session with its own environment; makes room or raises
        :class:`PlaygroundError` when every slot is in recent use."""
        with self._lock:
            if len(self._sessions) >= self.capacity:
                victim = min(self._sessions.values(), key=lambda s: s.last_used)
                idle = time.monotonic() - victim.last_used
                if idle < self.evict_idle_s:
                    wait = int(self.evict_idle_s - idle) + 1
                    raise PlaygroundError(
                        f"The playground holds {self.capacity} episodes at once and all are in "
                        f"use: try again in {wait} s."
                    )
                self._sessions.pop(victim.key)
            else:
                victim = None
            session = PlaySession(env=self._new_environment(), browser=browser)
            self._sessions[session.key] = session
        if victim is not None:
            log.info("playground session %s closed to make room", victim.key)
            _close_env(victim)
        return session

    def close(self, session: PlaySession | None) -> None:
        """Close ``session``'s environment and forget it (idempotent)."""
        if session is None:
            return
        with self._lock:
            self._sessions.pop(session.key, None)
        _close_env(session)

    def expire(self, session: PlaySession | None) -> None:
        """gr.State's ``delete_callback``: the session's state expired (no event for the idle
        timeout) or gradio dropped it; close it."""
        if session is not None and not session.closed:
            log.info("playground session %s closed: idle", session.key)
        self.close(session)

    def close_browser(self, browser: str | None) -> None:
        """Close the sessions of the browser session ``browser`` (its tab closed)."""
        with self._lock:
            gone = [s for s in self._sessions.values() if browser and s.browser == browser]
        for session in gone:
            log.info("playground session %s closed: its page was closed", session.key)
            self.close(session)

    def close_all(self) -> None:
        """Close every session (the server shuts down)."""
        with self._lock:
            gone = list(self._sessions.values())
        for session in gone:
            self.close(session)


def _close_env(session: PlaySession) -> None:
    session.closed = True
    try:
        session.env.close()
    except Exception:  # noqa: BLE001 - closing must never fail the caller
        log.exception("closing a playground environment failed")


# -- what the page shows ----------------------------------------------------------------------


def focus_line(observation: TraceFixObservation) -> int | None:
    """The line the observation's window marks (``>>``), if any."""
    for row in observation.localized_context.split("\n"):
        if row.startswith(FOCUS_MARK):
            number = row[len(FOCUS_MARK) :].split("|", 1)[0].strip()
            return int(number) if number.isdigit() else None
    return None


def code_lines(observation: TraceFixObservation) -> list[str]:
    return [observation.code_dict[n] for n in sorted(observation.code_dict)]


def changed_lines(original: Sequence[str], current: Sequence[str]) -> list[int]:
    """The lines of ``current`` (1-indexed) that are not lines of ``original`` in place."""
    changed: list[int] = []
    matcher = difflib.SequenceMatcher(a=list(original), b=list(current), autojunk=False)
    for tag, _, _, first, last in matcher.get_opcodes():
        if tag in ("replace", "insert"):
            changed.extend(range(first + 1, last + 1))
    return changed


def diff_text(original: Sequence[str], current: Sequence[str]) -> str:
    """A unified diff of the current program against the original."""
    lines = difflib.unified_diff(list(original), list(current), "original", "current",
                                 lineterm="")  # fmt: skip
    return "\n".join(lines) or "No change: the program is the original."


def _range_lines(lines: Sequence[str]) -> str:
    if not lines:
        return ""
    if len(lines) <= 8:
        return ", ".join(map(str, lines))
    return f"{', '.join(map(str, lines[:8]))} and {len(lines) - 8} more"


def marks_html(observation: TraceFixObservation | None, original: Sequence[str]) -> str:
    """The legend under the program (focus line, lines changed since the original) and the
    style that highlights those lines in the editor."""
    if observation is None:
        return ""
    focus = focus_line(observation)
    changed = changed_lines(original, code_lines(observation))
    rules = [f"#tf-code .cm-content > .cm-line:nth-child({n}) {{ background: #fff3c4; }}"
             for n in changed]  # fmt: skip
    if focus is not None:
        rules.append(f"#tf-code .cm-content > .cm-line:nth-child({focus}) "
                     "{ box-shadow: inset 4px 0 0 #d9480f; }")  # fmt: skip
    parts = [f"<span class='tf-mark-focus'>▶ focus: line {focus}</span>"] if focus else []
    if changed:
        plural = "s" if len(changed) > 1 else ""
        parts.append(f"<span class='tf-mark-changed'>✎ changed since the original: line{plural} "
                     f"{_range_lines(changed)}</span>")  # fmt: skip
    else:
        parts.append("<span class='tf-mark-changed'>unchanged since the original</span>")
    if observation.syntax_error:
        parts.append("<span class='tf-bad'>the program does not parse</span>")
    return (f"<style>{' '.join(rules)}</style>"
            f"<div id='tf-marks' class='tf-marks'>{' · '.join(parts)}</div>")  # fmt: skip


def task_html(session: PlaySession | None, registry: TaskRegistry | None) -> str:
    """The task's id, facts and description (wrapped)."""
    observation = session.observation if session else None
    if observation is None:
        return f"<div id='tf-task' class='tf-task tf-muted'>{html.escape(NO_EPISODE)}</div>"
    task = registry.tasks.get(observation.task_id) if registry else None
    facts = [observation.difficulty]
    if task is not None:
        facts += [f"split {task.split}", f"{task.source}"]
        if task.bug_type:
            facts.append(f"bug type {task.bug_type}")
    facts.append(f"{observation.tests_total} visible tests; hidden ones at SUBMIT")
    return (
        f"<div id='tf-task' class='tf-task'><h3><code>{html.escape(observation.task_id)}"
        f"</code></h3><p class='tf-muted'>{html.escape(' · '.join(facts))} · episode "
        f"<code>{html.escape(observation.episode_id)}</code></p>"
        f"<div id='tf-description' class='tf-description'>"
        f"{inline_code(observation.description.strip())}</div></div>"
    )


def inline_code(text: str) -> str:
    """``text`` as HTML, with its `backticked` parts as code."""
    return re.sub(r"`([^`\n]+)`", r"<code>\1</code>", html.escape(text))


def status_html(session: PlaySession | None) -> str:
    """Steps, reward, return, the page's message or the action's error, and at the end the
    outcome (``data-solved``, ``data-score`` on ``#tf-outcome``)."""
    message = session.message if session else None
    observation = session.observation if session else None
    rows: list[str] = []
    if session is None or observation is None:
        rows.append(f"<p class='tf-muted'>{html.escape(message or NO_EPISODE)}</p>")
        return f"<div id='tf-status' class='tf-status'>{''.join(rows)}</div>"
    if observation.done:
        solved = bool(observation.solved)
        score = observation.score or 0.0
        how = "truncated at max_steps" if observation.truncated else "submitted"
        rows.append(
            f"<div id='tf-outcome' class='tf-outcome {'tf-solved' if solved else 'tf-unsolved'}'"
            f" data-solved='{str(solved).lower()}' data-score='{score:.3f}'>"
            f"{'Solved' if solved else 'Not solved'} · score {score:.3f} · {how} · "
            f"truncated: {str(bool(observation.truncated)).lower()}</div>"
        )
    tests = (f"visible tests {observation.tests_passed}/{observation.tests_total}"
             if observation.test_results else
             f"{observation.tests_total} visible tests, not run yet")  # fmt: skip
    facts = [
        f"step {observation.step_count}",
        f"<b>{observation.steps_remaining}</b> steps left",
        f"reward of the step <b>{observation.reward or 0.0:+.3f}</b>",
        f"return so far <b>{session.total:+.3f}</b>",
        tests,
    ]
    rows.append(f"<p id='tf-facts'>{' · '.join(facts)}</p>")
    if message:
        rows.append(f"<p id='tf-message' class='tf-bad'>{html.escape(message)}</p>")
    elif observation.last_action_error:
        rows.append(f"<p id='tf-message' class='tf-bad'>Rejected: "
                    f"{html.escape(observation.last_action_error)}</p>")  # fmt: skip
    return f"<div id='tf-status' class='tf-status'>{''.join(rows)}</div>"


def test_rows(observation: TraceFixObservation | None) -> list[list[str]]:
    if observation is None:
        return []
    return [[r.test_name, "PASS" if r.passed else "FAIL", r.error_message or ""]
            for r in observation.test_results]  # fmt: skip


def history_rows(session: PlaySession | None) -> list[list[Any]]:
    if session is None:
        return []
    return [[row.step, row.action, row.parameters, f"{row.reward:+.3f}", f"{row.total:+.3f}",
             row.note] for row in reversed(session.history)]  # fmt: skip


def _short(text: str, limit: int = 80) -> str:
    return _cut(" ".join(text.split()), limit)


def _parameters(action: TraceFixAction) -> str:
    fields = action.model_dump(exclude={"action_type", "thought", "metadata"}, exclude_none=True)
    return ", ".join(f"{name}={_cut(repr(value), 60)}" for name, value in fields.items())


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- the page -----------------------------------------------------------------------------------


def _verbatim_code() -> type[gr.Code]:
    """``gr.Code`` showing its text as given. ``gr.Code`` strips what it shows, which would
    drop the first line's indentation from a range prefilled for editing (and then the
    indentation rule of REPLACE_LINES would shift the other lines).

    A subclass, so that it survives gradio rebuilding a component from an update (a patched
    instance would not); ``is_template`` makes the browser use gr.Code's own component.
    Defining a component class makes gradio write a ``.pyi`` stub beside its module, which
    is switched off while this one is defined."""
    from gradio import component_meta

    write_stub = component_meta.create_or_modify_pyi
    component_meta.create_or_modify_pyi = lambda *args, **kwargs: None
    try:

        class VerbatimCode(gr.Code):
            is_template = True

            def postprocess(self, value: str | None) -> str | None:
                return value

    finally:
        component_meta.create_or_modify_pyi = write_stub
    return VerbatimCode


VerbatimCode = _verbatim_code()

CSS = """
.gradio-container { max-width: 1480px !important; }
.tf-small { font-size: 0.85em; }
.tf-description { white-space: pre-wrap; overflow-wrap: anywhere; line-height: 1.5;
  border-left: 3px solid #a5b4fc; padding: 4px 12px; margin-top: 6px; }
.tf-muted { color: #6b7280; }
.tf-bad { color: #b91c1c; font-weight: 600; }
.tf-marks { font-size: 0.9em; margin: 4px 0; }
.tf-mark-focus { color: #d9480f; }
.tf-mark-changed { background: #fff3c4; padding: 0 4px; }
.tf-outcome { font-size: 1.4em; font-weight: 700; padding: 10px 14px; border-radius: 8px;
  margin-bottom: 6px; }
.tf-solved { background: #dcfce7; color: #166534; }
.tf-unsolved { background: #fee2e2; color: #991b1b; }
.tf-task h3 { margin: 0; }
"""

HEADER = (
    f"<style>{CSS}</style><h1 style='margin:0'>{TITLE}</h1><p>Fix the buggy program: read "
    "the description, run the tests, edit lines, submit. Every action is the one an agent "
    "takes, with the same rewards.</p>"
)


@dataclasses.dataclass
class Page:
    """The components the handlers write to, in the order of :meth:`view_outputs`."""

    state: Any
    task_choice: Any
    task: Any
    code: Any
    marks: Any
    status: Any
    tests: Any
    output: Any
    history: Any

    def view_outputs(self) -> list[Any]:
        return [self.state, self.task, self.code, self.marks, self.status, self.tests,
                self.output, self.history]  # fmt: skip


class Playground:
    """The playground of one app: its sessions and its ``gradio_builder`` (:meth:`build`).

    ``new_environment`` is the server's environment factory; ``registry`` returns the
    loader's task registry (None while the tasks load); ``idle_timeout_s`` closes a session
    without events for that long."""

    def __init__(self, new_environment: EnvironmentFactory, registry: RegistrySource,
                 idle_timeout_s: float, capacity: int = MAX_SESSIONS) -> None:  # fmt: skip
        self.sessions = PlaySessions(new_environment, capacity)
        self._registry = registry
        self.idle_timeout_s = idle_timeout_s
        self.controls = control_specs()

    # -- openenv's hook -----------------------------------------------------------------------

    def build(self, web_manager: Any, action_fields: Any, metadata: Any, is_chat_env: bool,
              title: str, quick_start_md: str) -> gr.Blocks:  # fmt: skip
        """openenv's ``gradio_builder``: the page. openenv's generic arguments (its shared
        web manager, its form fields, its Quick Start) are not used."""
        with gr.Blocks(title=TITLE, analytics_enabled=False) as blocks:
            gr.HTML(HEADER, elem_id="tf-header")
            with gr.Tabs():
                with gr.Tab("Play", id="play"):
                    page = self._play_tab()
                with gr.Tab("README", id="readme"):
                    gr.Markdown(readme_markdown(), elem_id="tf-readme")
                with gr.Tab("Quick Start", id="quick-start"):
                    quick_start = gr.Markdown(quick_start_markdown(), elem_id="tf-quick-start")
            blocks.load(self._on_load, outputs=[page.task_choice, quick_start])
            blocks.unload(self._on_unload)
        return blocks

    # -- layout ---------------------------------------------------------------------------------

    def _play_tab(self) -> Page:
        state = gr.State(None, time_to_live=self.idle_timeout_s,
                         delete_callback=self.sessions.expire)  # fmt: skip
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=280):
                task_choice = gr.Dropdown(
                    choices=[], label="Task (type to search)", filterable=True,
                    elem_id="tf-task-id",
                )  # fmt: skip
                by_id = gr.Button("Play this task", variant="primary", elem_id="tf-play-id")
            with gr.Column(scale=4, min_width=320), gr.Row():
                tier = gr.Dropdown([ANY, *DIFFICULTIES], value=ANY, label="Tier",
                                   filterable=False, elem_id="tf-tier")  # fmt: skip
                split = gr.Dropdown([ANY, *SPLITS], value=ANY, label="Split", filterable=False,
                                    elem_id="tf-split")  # fmt: skip
                seed = gr.Textbox("", label="Seed", placeholder="empty: random",
                                  elem_id="tf-seed")  # fmt: skip
                by_draw = gr.Button("Draw by tier / split / seed", elem_id="tf-play-draw")
            with gr.Column(scale=1, min_width=140):
                by_random = gr.Button("Random task", elem_id="tf-play-random")
        task = gr.HTML(task_html(None, None), elem_id="tf-task-panel")
        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                code = VerbatimCode("", language="python", interactive=False, label="Program",
                                    elem_id="tf-code")  # fmt: skip
                marks = gr.HTML("", elem_id="tf-marks-panel")
                with gr.Accordion("Diff against the original", open=False,
                                  elem_id="tf-diff-accordion"):  # fmt: skip
                    diff_button = gr.Button("Show the diff", size="sm", elem_id="tf-diff-show")
                    diff = gr.Code("", language=None, interactive=False, label="Diff",
                                   elem_id="tf-diff")  # fmt: skip
                tests = gr.Dataframe(headers=TEST_HEADERS, value=[], interactive=False,
                                     label="Visible tests (last run)", wrap=True,
                                     elem_id="tf-tests")  # fmt: skip
                output = gr.Code("", language=None, interactive=False, wrap_lines=True,
                                 label="Output of the last action",
                                 elem_id="tf-output")  # fmt: skip
            with gr.Column(scale=4):
                status = gr.HTML(status_html(None), elem_id="tf-status-panel")
                controls = self._action_controls()
        history = gr.Dataframe(headers=HISTORY_HEADERS, value=[], label="History (latest first)",
                               interactive=False, wrap=True, column_widths=HISTORY_WIDTHS,
                               elem_id="tf-history")  # fmt: skip
        page = Page(state, task_choice, task, code, marks, status, tests, output, history)
        self._wire_start(page, by_id, by_draw, by_random, tier, split, seed, controls)
        self._wire_actions(page, controls)
        diff_button.click(self._diff, inputs=[state], outputs=[diff], concurrency_limit=None)
        return page

    def _action_controls(self) -> Controls:
        """One button (and its fields) per action of the registry: each action without
        parameters as a button beside what it does, the others as tabs of fields."""
        made: Controls = {}
        for spec in (s for s in self.controls if not s.fields):
            with gr.Row(equal_height=False):
                variant = "primary" if spec.action == "SUBMIT" else "secondary"
                button = gr.Button(spec.action, variant=variant, size="md", scale=0,
                                   min_width=210, elem_id=element_id(spec.action))  # fmt: skip
                gr.Markdown(_first_sentence(spec.description), elem_classes=["tf-muted"])
                made[spec.action] = (button, [])
        with gr.Tabs(selected=self._default_tab()):
            for spec in (s for s in self.controls if s.fields):
                with gr.Tab(spec.action, id=spec.action):
                    gr.Markdown(spec.description, elem_classes=["tf-muted", "tf-small"])
                    fields = [self._field_input(spec, f) for f in spec.fields]
                    button = gr.Button(spec.action, variant="primary",
                                       elem_id=element_id(spec.action))  # fmt: skip
                    made[spec.action] = (button, fields)
        return made

    def _default_tab(self) -> str | None:
        """The tab shown first: the range editor (REPLACE_LINES), else the first."""
        with_fields = [s for s in self.controls if s.fields]
        chosen = next((s for s in with_fields if s.range_prefill), None)
        return (chosen or with_fields[0]).action if with_fields else None

    @staticmethod
    def _field_input(spec: ControlSpec, field: FieldSpec) -> Any:
        label = f"{field.name}{'' if field.required else ' (optional)'}"
        common = {"label": label, "info": field.description,
                  "elem_id": element_id(spec.action, field.name)}  # fmt: skip
        if field.is_code:
            common.pop("info")
            return VerbatimCode("", language="python", interactive=True, lines=3, **common)
        hints = {int: "a whole number", list[int]: "e.g. 5, 6", list[str]: "one per line",
                 int | str: "a number or a name"}  # fmt: skip
        lines = 3 if field.kind == list[str] else 1
        return gr.Textbox("", placeholder=hints.get(field.kind, ""), lines=lines, **common)

    # -- events ---------------------------------------------------------------------------------

    def _wire_start(self, page: Page, by_id: Any, by_draw: Any, by_random: Any, tier: Any,
                    split: Any, seed: Any, controls: Controls) -> None:  # fmt: skip
        cleared = self._prefill_targets(controls)
        outputs = [*page.view_outputs(), *cleared]
        inputs = [page.state, page.task_choice, tier, split, seed]
        for button, how in ((by_id, "id"), (by_draw, "draw"), (by_random, "random")):
            button.click(self._starter(how, len(cleared)), inputs=inputs, outputs=outputs,
                         concurrency_limit=None)  # fmt: skip

    def _starter(self, how: str, cleared: int) -> Callable[..., list[Any]]:
        """The handler of one Play button (a function, not a partial: gradio finds its
        ``gr.Request`` parameter by annotation)."""

        def start(session: PlaySession | None, task_id: str | None, tier: str | None,
                  split: str | None, seed: Any, request: gr.Request) -> list[Any]:  # fmt: skip
            return self._start(how, cleared, session, task_id, tier, split, seed, request)

        return start

    def _prefill_targets(self, controls: Controls) -> list[Any]:
        """The fields of range editors (cleared when a new episode starts)."""
        return [widget for spec in self.controls if spec.range_prefill
                for widget in controls[spec.action][1]]  # fmt: skip

    def _wire_actions(self, page: Page, controls: Controls) -> None:
        for spec in self.controls:
            button, fields = controls[spec.action]
            button.click(functools.partial(self._act, spec), inputs=[page.state, *fields],
                         outputs=page.view_outputs(), concurrency_limit=None)  # fmt: skip
            target = spec.range_prefill
            if target is None:
                continue
            by_name = dict(zip((f.name for f in spec.fields), fields, strict=True))
            start, end, block = by_name["start_line"], by_name["end_line"], by_name[target.name]
            for source in (start, end):
                source.input(functools.partial(self._prefill, source is start),
                             inputs=[page.state, start, end], outputs=[end, block],
                             concurrency_limit=None)  # fmt: skip

    def _on_load(self, request: gr.Request) -> tuple[Any, str]:
        """The task list (the loader's registry, curated tasks first) and a Quick Start
        with this server's URL."""
        try:
            registry = self._registry()
            tasks = [registry.tasks[task_id] for task_id in registry.ids()] if registry else []
            tasks.sort(key=lambda task: task.source == SOURCE_GENERATED)
            choices = [(f"{task.task_id} ({task.difficulty}, {task.source})", task.task_id)
                       for task in tasks]  # fmt: skip
            return gr.update(choices=choices), quick_start_markdown(base_url(request))
        except Exception:  # noqa: BLE001 - the page still works with the defaults
            log.exception("playground: loading the page failed")
            return gr.update(), quick_start_markdown()

    def _on_unload(self, request: gr.Request) -> None:
        self.sessions.close_browser(getattr(request, "session_hash", None))

    def _start(self, how: str, cleared: int, session: PlaySession | None, task_id: str | None,
               tier: str | None, split: str | None, seed: Any,
               request: gr.Request) -> list[Any]:  # fmt: skip
        """Start an episode in the browser session's environment (made on first use)."""
        blanks = [None] * cleared
        try:
            args = reset_args(how, task_id, tier, split, seed)
            if session is None or session.closed:
                session = self.sessions.open(getattr(request, "session_hash", None))
            with session.lock:
                session.message = None
                try:
                    observation = session.env.reset(**args)
                except (TaskSelectionError, ValidationError) as exc:
                    raise PlaygroundError(f"Cannot start that task: {exc}") from None
                session.observation = observation
                session.original = code_lines(observation)
                session.history.clear()
                session.total = 0.0
                session.last_used = time.monotonic()
            return [*self._view(session), *blanks]
        except PlaygroundError as exc:
            return [*self._view(session, str(exc)), *[gr.update()] * cleared]
        except Exception as exc:  # noqa: BLE001 - the page says it, the server lives on
            log.exception("playground: starting an episode failed")
            return [*self._view(session, f"Could not start: {exc}"), *[gr.update()] * cleared]

    def _act(self, spec: ControlSpec, session: PlaySession | None, *values: Any) -> list[Any]:
        """Take ``spec``'s action with the control's ``values`` in the session's episode."""
        try:
            if session is None:
                raise PlaygroundError(NOT_RUNNING)
            if session.closed:
                raise PlaygroundError(CLOSED)
            action = build_action(spec, values)
            with session.lock:
                session.message = None
                observation = session.env.step(action)
                reward = observation.reward or 0.0
                session.total = round(session.total + reward, 6)
                note = observation.last_action_error or _short(
                    observation.last_execution_output.split("\n", 1)[0]
                )
                session.history.append(HistoryRow(observation.step_count, spec.action,
                                                  _parameters(action), reward, session.total,
                                                  note))  # fmt: skip
                session.observation = observation
                session.last_used = time.monotonic()
            return self._view(session)
        except PlaygroundError as exc:
            return self._view(session, str(exc))
        except Exception as exc:  # noqa: BLE001 - the page says it, the server lives on
            log.exception("playground: %s failed", spec.action)
            return self._view(session, f"{spec.action} failed: {exc}")

    def _prefill(self, from_start: bool, session: PlaySession | None, start: Any,
                 end: Any) -> tuple[Any, Any]:  # fmt: skip
        """The range's lines of the current program, for the code field; ``end_line``
        follows ``start_line`` when it is empty or before it."""
        try:
            observation = session.observation if session else None
            first, last = _whole(start), _whole(end)
            if observation is None or first is None:
                return gr.update(), gr.update()
            if from_start and (last is None or last < first):
                last = first
            shown_end = str(last) if from_start and last is not None else gr.update()
            lines = code_lines(observation)
            if last is None or not 1 <= first <= last <= len(lines):
                return shown_end, gr.update()
            return shown_end, "\n".join(lines[first - 1 : last])
        except Exception:  # noqa: BLE001 - a convenience: never an error
            log.exception("playground: prefill failed")
            return gr.update(), gr.update()

    def _diff(self, session: PlaySession | None) -> str:
        """The diff of the current program against the original."""
        if session is None or session.observation is None:
            return NOT_RUNNING
        return diff_text(session.original, code_lines(session.observation))

    def _view(self, session: PlaySession | None, message: str | None = None) -> list[Any]:
        """The values of :meth:`Page.view_outputs` for ``session``."""
        if session is not None:
            session.message = message
        observation = session.observation if session else None
        registry = self._registry()
        status = status_html(session) if session else status_html_message(message)
        return [
            session,
            task_html(session, registry),
            "\n".join(code_lines(observation)) if observation else "",
            marks_html(observation, session.original if session else []),
            status,
            test_rows(observation),
            observation.last_execution_output if observation else "",
            history_rows(session),
        ]


def status_html_message(message: str | None) -> str:
    """The status panel before any episode: the message, or how to start."""
    return (f"<div id='tf-status' class='tf-status'><p id='tf-message' class="
            f"'{'tf-bad' if message else 'tf-muted'}'>{html.escape(message or NO_EPISODE)}"
            "</p></div>")  # fmt: skip


def reset_args(how: str, task_id: str | None, tier: str | None, split: str | None,
               seed: Any) -> dict[str, Any]:  # fmt: skip
    """``reset``'s arguments for a Play button: ``id`` (the chosen task), ``draw`` (tier,
    split, seed: any of them), ``random``."""
    if how == "random":
        return {}
    if how == "id":
        if not task_id:
            raise PlaygroundError("Choose a task in the list first (type to search).")
        return {"task_id": task_id}
    args: dict[str, Any] = {}
    if tier and tier != ANY:
        args["difficulty"] = tier
    if split and split != ANY:
        args["split"] = split
    if seed is not None and str(seed).strip():
        number = _whole(seed)
        if number is None or number < 0:
            raise PlaygroundError(f"The seed must be a whole number ≥ 0, not {seed!r}")
        args["seed"] = number
    return args


def _whole(value: Any) -> int | None:
    """``value`` (a widget's text or number) as an int, None if it is not one."""
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    text = str(value or "").strip()
    return int(text) if re.fullmatch(r"-?\d{1,9}", text) else None


def _first_sentence(text: str) -> str:
    return text.split(". ", 1)[0].rstrip(".") + "."


def base_url(request: gr.Request | None) -> str:
    """The server's URL as the browser reached it (behind a proxy: its forwarded host)."""
    default = "http://localhost:8000"
    headers = getattr(request, "headers", None)
    if not headers:
        return default
    host = headers.get("x-forwarded-host") or headers.get("host")
    if not host or not re.fullmatch(r"[A-Za-z0-9.\-:\[\]]+", host):
        return default
    scheme = headers.get("x-forwarded-proto") or "http"
    return f"{'https' if scheme == 'https' else 'http'}://{host}"


def readme_markdown(path: Path = README_PATH) -> str:
    """The README without its Space front matter and its local images; links to files of
    the repository (``docs/…``), which this page cannot open, become their text and path."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return "The README is not installed with this server."
    text = re.sub(r"\A---\n.*?\n---\n", "", text, flags=re.S)
    text = re.sub(r"!\[[^\]]*\]\((?!https?:)[^)]*\)", "", text)
    return re.sub(
        r"\[([^\]]+)\]\((?!https?:|#)([^)#]+)(#[^)]*)?\)", r"\1 (`\2` in the repository)", text
    )


def quick_start_markdown(url: str = "http://localhost:8000") -> str:
    """How to play this environment from Python and over HTTP, with its actions (from the
    registry)."""
    rows = []
    for spec in control_specs():
        names = ", ".join(f"`{f.name}`" + ("" if f.required else "?") for f in spec.fields)
        rows.append(f"| `{spec.action}` | {names or '—'} | {_first_sentence(spec.description)} |")
    return f"""### Connect to this environment

The client is this repository's package (in a checkout: `uv sync`, or `pip install .`).

```python
from tracefix_rl import TraceFixAction, TraceFixEnv

with TraceFixEnv(base_url="{url}").sync() as env:
    result = env.reset(task_id="sum_of_evens_wrong_modulus")  # or seed=7, difficulty="easy"
    print(result.observation.description)
    result = env.step(TraceFixAction(action_type="RUN_TESTS"))
    print(result.observation.tests_passed, "/", result.observation.tests_total)
    # a flush-left block is indented like the line it replaces
    result = env.step(TraceFixAction(action_type="REPLACE_LINES", start_line=5, end_line=5,
                                     new_code_block="if n % 2 == 0:"))
    result = env.step(TraceFixAction(action_type="SUBMIT"))
    print(result.observation.score, result.observation.solved, result.reward)
```

Over HTTP (episodes are stateful, keyed by `episode_id`):

```sh
curl -s -X POST {url}/reset -H 'content-type: application/json' \\
     -d '{{"task_id": "sum_of_evens_wrong_modulus", "episode_id": "ep-1"}}'
curl -s -X POST {url}/step -H 'content-type: application/json' \\
     -d '{{"episode_id": "ep-1", "action": {{"action_type": "RUN_TESTS"}}}}'
```

### Actions (`action_type` and its fields; `?` is optional)

| action | fields | what it does |
|---|---|---|
{chr(10).join(rows)}

The API's reference is at [`/docs`]({url}/docs); the README tab has everything else.
"""
