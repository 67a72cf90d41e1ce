"""Shared fixtures: the task registry, environments, and real server subprocesses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tracefix_rl import models  # noqa: E402,F401  (first: keeps gradio out of the test process)

# isort: split

from tracefix_rl.environment import TraceFixEnvironment  # noqa: E402
from tracefix_rl.procs import (  # noqa: E402,F401  (re-exported)
    REDIS_SERVER,
    free_port,
    start_redis,
    stop_process_group,
)
from tracefix_rl.server import SERVER_MODULE  # noqa: E402
from tracefix_rl.tasks import TaskRegistry, get_registry  # noqa: E402

FAKE_SECRET = "hf_FAKE_SECRET_TOKEN_3f9a1c"
SERVER_START_TIMEOUT_S = 120.0


@pytest.fixture(scope="session")
def registry() -> TaskRegistry:
    return get_registry()


@pytest.fixture
def make_env(registry: TaskRegistry):
    def factory() -> TraceFixEnvironment:
        return TraceFixEnvironment(registry=registry)

    return factory


class ServerProcess:
    """A ``python -m tracefix_rl.server.app`` subprocess on a free 127.0.0.1 port."""

    def __init__(
        self,
        extra_env: dict[str, str] | None = None,
        argv: list[str] | None = None,
        cwd: Path = REPO,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "TRACEFIX_FAKE_SECRET": FAKE_SECRET, "LOG_LEVEL": "WARNING"}
        env.pop("ENABLE_WEB_INTERFACE", None)
        env.update(extra_env or {})
        command = argv or [sys.executable, "-m", SERVER_MODULE]
        handle, name = tempfile.mkstemp(prefix=f"tracefix-test-server-{self.port}-", suffix=".log")
        self.log_path = Path(name)
        self._log = os.fdopen(handle, "wb")
        self.proc = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=cwd,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not become healthy:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process_group(self.proc)
        self._log.close()
        self.log_path.unlink(missing_ok=True)


PACKAGE_FOLDERS = ("actions", "agent", "episode", "sandbox", "server", "tasks")


def run_in_package_copy(tmp_path: Path, new_modules: dict[str, str], task: str, probe: str,
                        *args: str) -> subprocess.CompletedProcess:  # fmt: skip
    """Run ``probe`` (Python source; its argv: the copy's path, ``task``, ``args``) against a
    copy of the package at ``tmp_path/tracefix_rl`` that holds ``new_modules`` (relative
    path -> source) and, as its only curated task, ``task``."""
    package = tmp_path / "tracefix_rl"
    package.mkdir()
    for path in REPO.glob("*.py"):
        shutil.copy2(path, package / path.name)
    for folder in PACKAGE_FOLDERS:
        shutil.copytree(REPO / folder, package / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    curated = package / "task_data" / "curated"
    curated.mkdir(parents=True)
    shutil.copy2(REPO / "task_data" / "curated" / f"{task}.toml", curated)
    for relative, source in new_modules.items():
        (package / relative).write_text(source)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "LOG_LEVEL": "WARNING"}
    return subprocess.run(
        [sys.executable, "-c", probe, str(package), task, *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def run_refused_server(
    env_changes: dict[str, str | None], timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run a server expected to refuse to start; ``None`` values unset a variable."""
    env = {**os.environ, "LOG_LEVEL": "WARNING"}
    for name, value in env_changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return subprocess.run(
        [sys.executable, "-m", SERVER_MODULE, "--host", "127.0.0.1", "--port", str(free_port())],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    proc = ServerProcess()
    yield proc
    proc.stop()


@pytest.fixture
def start_server() -> Iterator:
    started: list[ServerProcess] = []

    def start(**kwargs) -> ServerProcess:
        proc = ServerProcess(**kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def require_program(program: str, package: str) -> None:
    """Skip when ``program`` is missing, except under CI (``.ci/run`` installs ``package``),
    where that is a failure."""
    if shutil.which(program) is None:
        message = f"{program} is not installed (apt-get install {package})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """A throwaway Redis (Debian's redis-server) on a free loopback port: its URL's base."""
    require_program(REDIS_SERVER, "redis-server")
    port = free_port()
    proc = start_redis(port)
    yield f"redis://127.0.0.1:{port}"
    stop_process_group(proc)


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """The URL of an emptied Redis database for one test."""
    import redis

    client = redis.Redis.from_url(f"{redis_server}/0")
    client.flushdb()
    client.close()
    return f"{redis_server}/0"
