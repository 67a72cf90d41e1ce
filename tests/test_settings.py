"""The settings (``settings.py``): the Configuration table (docs/configuration.md) and the
fields agree, bad values give one clear line per variable (also from a real server start), and
no other module reads the environment for configuration."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.conftest import REPO, run_refused_server
from tracefix_rl.models import MAX_STEPS_LIMIT
from tracefix_rl.sandbox import Limits
from tracefix_rl.settings import (
    MAX_STEPS_LIMIT as SETTINGS_MAX_STEPS_LIMIT,
)
from tracefix_rl.settings import (
    Settings,
    SettingsError,
    load_settings,
    variable,
)

VARIABLES = [variable(name) for name in Settings.model_fields]
BACKTICKED = re.compile(r"`([^`]*)`")
# Modules allowed to read os.environ: settings.py (through pydantic-settings), models.py (the
# web UI import guard, before any settings exist; see settings.py) and the baseline agent's
# environment module (it passes its own environment on to a server it starts).
ENVIRONMENT_READERS = {"settings.py", "models.py", "agent/environment.py"}
NOT_PACKAGE_CODE = {"tests", "bench", "build", "scripts", "task_data"}


def configuration_table() -> dict[str, str]:
    """Each variable of the Configuration table (docs/configuration.md), with its default cell."""
    page = (REPO / "docs" / "configuration.md").read_text()
    section = page.split("# Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("| `") or len(cells) < 3:
            continue
        names = BACKTICKED.findall(cells[0])
        defaults = BACKTICKED.findall(cells[1])
        for index, name in enumerate(names):
            shown = defaults[index] if len(names) > 1 else cells[1]
            assert name not in rows, f"{name} is in the table twice"
            rows[name] = shown
    return rows


def agrees(default: object, shown: str) -> bool:
    """Whether the table's default cell ``shown`` says ``default``."""
    if default is None:
        return shown.startswith("unset")
    if default is False:
        return shown.startswith("unset") or shown.startswith(("`false`", "`0`", "false"))
    token = (BACKTICKED.findall(shown) or [shown])[0]
    if isinstance(default, (int, float)):
        try:
            return float(token) == default
        except ValueError:
            return False
    return token == str(default)


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_every_field_is_in_the_configuration_table_with_its_default_and_nothing_else_is():
    table = configuration_table()
    assert sorted(table) == sorted(VARIABLES)
    for name, field in Settings.model_fields.items():
        assert field.description, name
        assert agrees(field.default, table[variable(name)]), (name, field.default, table)


def test_the_defaults_are_those_of_the_libraries(clean_environment):
    settings = load_settings()
    assert Limits.from_settings(settings) == Limits()
    assert SETTINGS_MAX_STEPS_LIMIT == MAX_STEPS_LIMIT
    assert settings.sandbox_workers is None and settings.tracefix_tasks is None


@pytest.mark.parametrize(
    ("environment", "message"),
    [
        ({"SANDBOX_WORKERS": "x"}, "SANDBOX_WORKERS must be an integer ≥ 1, got 'x'"),
        ({"SANDBOX_WORKERS": "0"}, "SANDBOX_WORKERS must be an integer ≥ 1, got '0'"),
        ({"PORT": "70000"}, "PORT must be an integer from 1 to 65535, got '70000'"),
        ({"MAX_STEPS": "2.5"}, "MAX_STEPS must be an integer from 1 to 1000, got '2.5'"),
        ({"SESSION_TIMEOUT_S": "nan"}, "SESSION_TIMEOUT_S must be a finite number > 0, got 'nan'"),
        ({"HTTP_EPISODE_TTL_S": "-5"}, "HTTP_EPISODE_TTL_S must be a finite number > 0, got '-5'"),
        ({"SANDBOX_MAX_QUEUE": "-1"}, "SANDBOX_MAX_QUEUE must be an integer ≥ 0, got '-1'"),
        ({"LOG_LEVEL": "loud"},
         "LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'loud'"),
        ({"WS_COMPRESSION": "on"}, "WS_COMPRESSION must be 1, true or yes (on), or 0, false or "
                                   "no (off), in any case, got 'on'"),
        ({"TRACEFIX_TASKS": "/no/such/pack.jsonl"},
         "TRACEFIX_TASKS must be an existing file or folder, got '/no/such/pack.jsonl'"),
    ],
)  # fmt: skip
def test_a_bad_value_names_the_variable_and_what_it_must_be(clean_environment, environment,
                                                            message):  # fmt: skip
    for name, value in environment.items():
        clean_environment.setenv(name, value)
    with pytest.raises(SettingsError) as error:
        load_settings()
    assert str(error.value) == message


def test_every_bad_variable_is_reported_at_once(clean_environment):
    clean_environment.setenv("SANDBOX_CPU_S", "fast")
    clean_environment.setenv("MAX_CONCURRENT_ENVS", "0")
    with pytest.raises(SettingsError) as error:
        load_settings()
    assert sorted(error.value.problems) == [
        "MAX_CONCURRENT_ENVS must be an integer ≥ 1, got '0'",
        "SANDBOX_CPU_S must be an integer ≥ 1, got 'fast'",
    ]


def test_values_are_parsed_and_empty_means_unset(clean_environment, tmp_path: Path):
    pack = tmp_path / "pack.jsonl"
    pack.write_text("")
    environment = {"SANDBOX_WORKERS": "", "WS_COMPRESSION": "YES", "LOG_LEVEL": "debug",
                   "SANDBOX_ALLOW_DEGRADED": "0", "SESSION_TIMEOUT_S": "1.5",
                   "TRACEFIX_TASKS": str(pack), "SANDBOX_ROOT": str(tmp_path)}  # fmt: skip
    for name, value in environment.items():
        clean_environment.setenv(name, value)
    settings = load_settings({"port": "9001"})
    assert settings.sandbox_workers is None and settings.ws_compression is True
    assert settings.log_level == "DEBUG" and settings.sandbox_allow_degraded is False
    assert settings.session_timeout_s == 1.5 and settings.port == 9001
    assert settings.tracefix_tasks == pack and settings.sandbox_root == tmp_path


def test_a_server_with_a_bad_value_exits_with_the_message_and_no_traceback():
    started = run_refused_server({"SANDBOX_WORKERS": "x"}, timeout=60)
    assert started.returncode != 0
    assert "SANDBOX_WORKERS must be an integer ≥ 1, got 'x'" in started.stderr
    assert "Traceback" not in started.stderr, started.stderr


def package_modules() -> list[Path]:
    return [
        path for path in REPO.rglob("*.py")
        if not set(path.relative_to(REPO).parts[:-1]) & NOT_PACKAGE_CODE
        and not any(part.startswith(".") for part in path.relative_to(REPO).parts)
    ]  # fmt: skip


def reads_environment(tree: ast.AST) -> bool:
    """Whether a module touches ``os.environ``/``os.getenv`` (as attributes or imported)."""
    names = {"environ", "environb", "getenv", "getenvb"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in names:
            return True
        if isinstance(node, ast.ImportFrom) and {alias.name for alias in node.names} & names:
            return True
    return False


def test_no_other_module_reads_the_environment():
    modules = package_modules()
    assert REPO / "server" / "app.py" in modules and REPO / "sandbox" / "pool.py" in modules
    readers = sorted(
        str(path.relative_to(REPO)) for path in modules
        if reads_environment(ast.parse(path.read_text()))
    )  # fmt: skip
    assert set(readers) <= ENVIRONMENT_READERS, readers
