"""The server's configuration: every environment variable it reads, in one validated object.

:class:`Settings` holds each variable of docs/configuration.md's table (the one place
they are documented; ``tests/test_settings.py`` holds the two to each other) with its type,
default and bounds. :func:`load_settings` reads the environment and validates every value at
once; a bad value raises :class:`SettingsError`, whose message names each variable and says
what it must be, e.g. ``SANDBOX_WORKERS must be an integer ≥ 1, got 'x'``.

Who reads it, and when:

* the server reads it once, in ``server.app.main()`` (or, under another ASGI server, when
  ``server.app.app`` is first used), and passes the values down: the sandbox pool, the task
  registry, the episode length, the HTTP and WebSocket limits. A bad value ends the server
  before it starts anything, with the message and no traceback;
* library code that runs without a server (the tasks CLI, tests, benchmarks) and starts the
  process-wide sandbox or task registry without passing settings gets
  :func:`environment_settings`: the same variables, read and validated once per process.

No other module reads these variables, with one exception: ``models.py``, which keeps gradio
out of processes that do not serve the web UI, also lets it in when ``ENABLE_WEB_INTERFACE``
is on (``1``, ``true`` or ``yes``, any case, as :data:`Flag` reads it), for OpenEnv's own
``create_app``, which reads that variable itself. This server tells it through
``models.allow_web_interface()`` when its settings enable the web UI.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_args, get_origin
from urllib.parse import urlsplit, urlunsplit

from pydantic import AfterValidator, BeforeValidator, Field, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

FLAG_ON = ("1", "true", "yes")
FLAG_OFF = ("0", "false", "no")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MAX_PORT = 65535
MEBIBYTE = 1024 * 1024
EPISODE_STORE_SCHEMES = ("redis://", "rediss://", "unix://")
URL_FIELDS = frozenset({"episode_store"})  # may hold a password: shown redacted
# The largest max_steps a reset may ask for (models.MAX_STEPS_LIMIT; a test holds them equal):
# the default episode length may not exceed it either.
MAX_STEPS_LIMIT = 1000


def _flag(value: Any) -> Any:
    """``1``/``true``/``yes`` (any case) is on, ``0``/``false``/``no`` off; others are errors."""
    if not isinstance(value, str):
        return value
    if value.lower() in FLAG_ON:
        return True
    if value.lower() in FLAG_OFF:
        return False
    raise ValueError("not a flag")


def _log_level(value: str) -> str:
    """A level name of ``logging``, in any case (stored in upper case)."""
    if value.upper() not in LOG_LEVELS:
        raise ValueError("not a log level")
    return value.upper()


Flag = Annotated[bool, BeforeValidator(_flag)]
LogLevel = Annotated[str, AfterValidator(_log_level)]


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


class SettingsError(ValueError):
    """Some variables have bad values; the message has one line per variable."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class Settings(BaseSettings):
    """Every server-side environment variable (field ``max_steps`` is ``MAX_STEPS``, and so
    on); unset or empty variables take the defaults. Immutable once read."""

    model_config = SettingsConfigDict(
        case_sensitive=False, env_ignore_empty=True, extra="ignore", frozen=True
    )

    # -- serving ------------------------------------------------------------------------------
    port: int = Field(
        default=8000, ge=1, le=MAX_PORT, description="TCP port `server` listens on (--port)."
    )
    host: str = Field(
        default="0.0.0.0", min_length=1, description="Address `server` listens on (--host)."
    )
    max_concurrent_envs: int = Field(
        default=64, ge=1, description="WebSocket sessions at once; one more is refused (1013)."
    )
    session_timeout_s: float = Field(
        default=600.0,
        gt=0,
        allow_inf_nan=False,
        description="A WebSocket session without a frame for this long is closed (4408).",
    )
    mcp_max_sessions: int = Field(
        default=64,
        ge=1,
        description="MCP sessions at once (every transport); one more is refused with a "
        "JSON-RPC error. They never take WebSocket or HTTP episode slots.",
    )
    mcp_idle_timeout_s: float = Field(
        default=60.0,
        gt=0,
        allow_inf_nan=False,
        description="An MCP session in which no episode has started is closed after this "
        "long without a request (with an episode: SESSION_TIMEOUT_S).",
    )
    http_max_episodes: int = Field(
        default=256, ge=1, description="Stateful HTTP episodes kept at once."
    )
    http_episode_ttl_s: float = Field(
        default=600.0,
        gt=0,
        allow_inf_nan=False,
        description="An HTTP episode not stepped or reset for this long expires.",
    )
    http_episode_grace_s: float = Field(
        default=300.0,
        gt=0,
        allow_inf_nan=False,
        description="With every HTTP slot taken, an unfinished episode not stepped for this "
        "long may be evicted (at most the TTL is used).",
    )
    episode_store: str = Field(
        default="memory",
        description="Where HTTP episodes live: memory (this process), or a Redis URL "
        "(redis://, rediss:// or unix://) shared by every replica.",
    )
    max_request_bytes: int = Field(
        default=MEBIBYTE, ge=1, description="Largest HTTP body or WebSocket message."
    )
    ws_compression: Flag = Field(
        default=False, description="WebSocket permessage-deflate (off: it costs server CPU)."
    )
    enable_web_interface: Flag = Field(
        default=False,
        description="Serve the playground (server/playground.py, Gradio) at /web; / redirects "
        "to it (to /docs without it).",
    )
    log_level: LogLevel = Field(default="INFO", description="Server log level (stderr).")

    # -- episodes and tasks -------------------------------------------------------------------
    max_steps: int = Field(
        default=50, ge=1, le=MAX_STEPS_LIMIT, description="Default episode length."
    )
    tracefix_tasks: Path | None = Field(
        default=None, description="Extra tasks: a .jsonl/.json/.toml file or a folder of them."
    )

    # -- sandbox --------------------------------------------------------------------------------
    sandbox_wall_timeout_s: float = Field(
        default=5.0, gt=0, allow_inf_nan=False, description="Wall-clock limit per evaluation."
    )
    sandbox_test_timeout_s: float = Field(
        default=1.0, gt=0, allow_inf_nan=False, description="Time per test inside a run."
    )
    sandbox_cpu_s: int = Field(default=5, ge=1, description="CPU seconds per evaluation.")
    sandbox_memory_mb: int = Field(
        default=1024, ge=1, description="Address-space limit per evaluation, in MiB."
    )
    sandbox_output_bytes: int = Field(
        default=64 * 1024, ge=1, description="Captured output limit (the file-size rlimit)."
    )
    sandbox_workers: int | None = Field(
        default=None,
        ge=1,
        description="Warm sandbox workers (evaluations at once); unset: CPU count + 1, at "
        "least 2, at most 8.",
    )
    sandbox_queue_timeout_s: float = Field(
        default=30.0,
        gt=0,
        allow_inf_nan=False,
        description="Queue wait before an evaluation is refused as busy.",
    )
    sandbox_max_queue: int = Field(
        default=1024, ge=0, description="Evaluations allowed to wait; beyond that, busy at once."
    )
    sandbox_allow_degraded: Flag = Field(
        default=False, description="Let the server start without the seccomp filter."
    )
    sandbox_disable_landlock: Flag = Field(
        default=False, description="Turn Landlock off (testing the degraded mode)."
    )
    sandbox_disable_seccomp: Flag = Field(
        default=False,
        description="Turn the seccomp filters off (testing the refusal and the degraded mode).",
    )
    sandbox_root: Path | None = Field(
        default=None,
        description="Where each server makes its sandbox root; unset: $TMPDIR/tracefix-sandbox.",
    )

    @field_validator("episode_store")
    @classmethod
    def _store(cls, value: str) -> str:
        if value != "memory" and not value.startswith(EPISODE_STORE_SCHEMES):
            raise ValueError("not memory or a Redis URL")
        return value

    @field_validator("tracefix_tasks")
    @classmethod
    def _existing_path(cls, value: Path | None) -> Path | None:
        if value is not None and not value.exists():
            raise ValueError("no such file or folder")
        return value


def variable(field: str) -> str:
    """The environment variable of a :class:`Settings` field (``max_steps`` → ``MAX_STEPS``)."""
    return field.upper()


def requirement(field: str, model: type[BaseSettings] | None = None) -> str:
    """What a valid value of ``model``'s ``field`` (default: :class:`Settings`) is, in words
    (``an integer ≥ 1``)."""
    info: FieldInfo = (model or Settings).model_fields[field]
    annotation = info.annotation
    if get_origin(annotation) is not None and type(None) in get_args(annotation):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    if field == "tracefix_tasks":
        return "an existing file or folder"
    if field == "episode_store":
        return f"memory or a Redis URL ({', '.join(EPISODE_STORE_SCHEMES)}...)"
    if annotation is bool:
        return "1, true or yes (on), or 0, false or no (off), in any case"
    if field == "log_level":
        return f"one of {', '.join(LOG_LEVELS)}"
    if annotation is str:
        return "non-empty"
    if annotation is Path:
        return "a path"
    words = "an integer" if annotation is int else "a finite number"
    bounds = {type(limit).__name__.lower(): limit for limit in info.metadata}
    if "ge" in bounds and "le" in bounds:
        return f"{words} from {bounds['ge'].ge} to {bounds['le'].le}"
    for name, sign in (("ge", "≥"), ("gt", ">")):
        if name in bounds:
            return f"{words} {sign} {getattr(bounds[name], name)}"
    return words


def redacted(url: str) -> str:
    """``url`` without its password (``redis://user:secret@host`` → ``redis://user:***@host``),
    for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


def _problems(error: ValidationError, model: type[BaseSettings]) -> list[str]:
    problems: dict[str, str] = {}
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else ""
        if field not in model.model_fields:
            problems.setdefault(field, f"{field or 'settings'}: {item['msg']}")
            continue
        shown = item["input"]
        if isinstance(shown, str) and field in URL_FIELDS:
            shown = redacted(shown)
        problems.setdefault(
            field,
            f"{variable(field)} must be {requirement(field, model)}, got {shown!r}",
        )
    return list(problems.values())


def load_settings(
    overrides: Mapping[str, Any] | None = None, model: type[SettingsT] = Settings
) -> SettingsT:
    """Read every variable of ``model`` (default: the server's :class:`Settings`) from the
    environment and validate it; ``overrides`` (field names to values, e.g. command-line
    options) take precedence. Raises :class:`SettingsError` naming every bad variable."""
    try:
        return model(**dict(overrides or {}))
    except ValidationError as exc:
        raise SettingsError(_problems(exc, model)) from None


@functools.cache
def environment_settings() -> Settings:
    """The settings of this process's environment, read once: what the process-wide sandbox
    and task registry use when they are started without settings (library use; a server
    passes its own)."""
    return load_settings()
