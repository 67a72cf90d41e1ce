"""The baseline agent's settings: ``AgentSettings`` (its environment variables) and defaults."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from tracefix_rl.models import TraceFixAction

REPO = Path(__file__).resolve().parent.parent  # the repository root (the package)
BENCHMARK = "tracefix_rl"
DEFAULT_API_BASE_URL = "https://router.huggingface.co/v1"
DEFAULT_MODEL = "Qwen/Qwen2.5-72B-Instruct"
DEFAULT_ENV_URL = "http://127.0.0.1:8000"
DEFAULT_MAX_STEPS = 20
DEFAULT_BUDGET_S = 18 * 60
DEFAULT_MAX_TOKENS = 2048  # a whole-file rewrite of the largest hard task is ~1,000 tokens
DEFAULT_CONTEXT_TOKENS = 8192
SCORE_FLOOR, SCORE_CEILING = 0.01, 0.99
SERVER_START_TIMEOUT_S = 120.0
SERVER_STOP_GRACE_S = 20.0
ENDPOINT_CHECK_TIMEOUT_S = 10.0
FALLBACK_ACTION = TraceFixAction(action_type="VIEW_CODE")

EXIT_OK, EXIT_ALL_FAILED, EXIT_BAD_CONFIG = 0, 1, 2
SIGNAL_EXIT_BASE = 128  # exit status 128 + signal number: 130 for SIGINT, 143 for SIGTERM


class AgentSettings(BaseSettings):
    """The agent's environment variables (the README's table under "Baseline agent"); unset
    or empty variables take the defaults."""

    model_config = SettingsConfigDict(case_sensitive=False, env_ignore_empty=True, extra="ignore")

    api_base_url: str = Field(
        default=DEFAULT_API_BASE_URL, description="OpenAI-compatible endpoint"
    )
    model_name: str = Field(default=DEFAULT_MODEL, description="model to evaluate")
    hf_token: str | None = Field(default=None, description="API key")
    api_key: str | None = Field(default=None, description="API key when HF_TOKEN is unset")
    env_url: str = Field(default=DEFAULT_ENV_URL, description="a running tracefix_rl server")
    local_image_name: str | None = Field(
        default=None, description="start the environment from this Docker image"
    )
    llm_timeout_s: float = Field(
        default=60.0, gt=0, allow_inf_nan=False, description="per-call timeout"
    )
    llm_max_retries: int = Field(
        default=3,
        ge=0,
        description="retries of one LLM call on timeouts, connection errors, 408/409/429 and "
        "5xx, with exponential backoff, within --budget-s",
    )
    llm_retry_backoff_s: float = Field(
        default=2.0,
        ge=0,
        allow_inf_nan=False,
        description="delay before the first retry; it doubles at each retry (at most 30 s)",
    )
    llm_max_tokens: int = Field(
        default=DEFAULT_MAX_TOKENS,
        ge=16,
        description="max_tokens of each reply; a reply cut off there is reported to the model",
    )
    llm_context_tokens: int = Field(
        default=DEFAULT_CONTEXT_TOKENS,
        ge=256,
        description="the model's context window: prompts are kept within it minus "
        "LLM_MAX_TOKENS (estimated at 3 characters a token), and trimmed further when the "
        "server says a prompt is too long",
    )


MAX_BACKOFF_S = 30.0


def settings_help() -> str:
    """``--help``'s list of the environment variables, with their defaults."""
    rows = ["environment variables (unset or empty: the default):"]
    for name, info in AgentSettings.model_fields.items():
        default = "unset" if info.default is None else info.default
        rows.append(f"  {name.upper():<20} {info.description} (default: {default})")
    return "\n".join(rows)
