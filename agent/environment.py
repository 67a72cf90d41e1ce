"""The environment server the agent plays against: found at ENV_URL, or started and stopped."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tracefix_rl.agent.config import REPO, SERVER_START_TIMEOUT_S, SERVER_STOP_GRACE_S
from tracefix_rl.agent.output import log
from tracefix_rl.client import TraceFixEnv
from tracefix_rl.procs import free_port, stop_process_group
from tracefix_rl.server import SERVER_MODULE

# -- environment lifecycle ----------------------------------------------------------------------


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


class Environment:
    """Where episodes run: ENV_URL, a Docker image, or a local server started for this run
    (in a process group of its own, stopped by :meth:`close`)."""

    def __init__(self, env_url: str, image: str | None) -> None:
        self.url = env_url.rstrip("/")
        self._server: subprocess.Popen[bytes] | None = None
        self._provider: Any = None
        if image:
            self.url, self._provider = asyncio.run(_start_image(image))
            log(f"started {image} at {self.url}")
        elif not _healthy(self.url):
            self._start_local_server()

    def _start_local_server(self) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        handle_fd, name = tempfile.mkstemp(prefix="tracefix-inference-server-", suffix=".log")
        log_file = Path(name)
        with os.fdopen(handle_fd, "wb") as handle:
            self._server = subprocess.Popen(
                [sys.executable, "-m", SERVER_MODULE, "--host", "127.0.0.1", "--port", str(port)],
                cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "LOG_LEVEL": "WARNING"},
            )  # fmt: skip
        log(f"no server at ENV_URL; starting one at {self.url} (pid {self._server.pid}, "
            f"log: {log_file})")  # fmt: skip
        try:
            deadline = time.monotonic() + SERVER_START_TIMEOUT_S
            while not _healthy(self.url):
                if self._server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"local server did not start; see {log_file}")
                time.sleep(0.25)
        except BaseException:  # a signal too: never leave the server behind
            self.close()
            raise

    def tasks(self, difficulty: str) -> list[str]:
        """The curated tasks of one tier (the generated corpus is for training)."""
        params = {"difficulty": difficulty, "source": "curated", "limit": 1000}
        response = httpx.get(f"{self.url}/tasks", params=params, timeout=30)
        response.raise_for_status()
        return [row["task_id"] for row in response.json()["tasks"]]

    def session(self):
        return TraceFixEnv(base_url=self.url, message_timeout_s=300).sync()

    def close(self) -> None:
        """Stop what this run started: the local server's process group, or the container."""
        if self._server is not None:
            stop_process_group(self._server, grace_s=SERVER_STOP_GRACE_S)
        if self._provider is not None:
            self._provider.stop_container()
            self._provider = None


async def _start_image(image: str) -> tuple[str, Any]:
    """Start the container through the client's ``from_docker_image``; keep its URL."""
    client = await TraceFixEnv.from_docker_image(image)
    url = client._ws_url.removesuffix("/ws").replace("ws://", "http://", 1)
    url = url.replace("wss://", "https://", 1)
    provider = client._provider
    await client.disconnect()
    return url, provider
