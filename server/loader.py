"""Loads the sandbox and the task registry while the app is built."""

from __future__ import annotations

import asyncio
import logging
import threading

from tracefix_rl.sandbox import SandboxUnavailable, get_sandbox
from tracefix_rl.tasks import get_registry

log = logging.getLogger("tracefix_rl.server")


class TaskLoader:
    """Loads the sandbox and the task registry in a thread while the app is built.

    The oracle checks mostly wait on the sandbox workers, so building routes and starting
    uvicorn overlap with them; the app's startup hook waits for the result, and uvicorn
    accepts connections only after that, so no request ever sees a half-loaded registry.
    """

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._load, name="task-loader", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        try:
            get_sandbox()
            get_registry()
        except BaseException as exc:  # noqa: BLE001 - reported by wait()
            self.error = exc

    async def wait(self) -> None:
        """Startup hook: block startup until the tasks are loaded; fail it if they cannot be."""
        await asyncio.to_thread(self._thread.join)
        if isinstance(self.error, SandboxUnavailable):
            log.critical("%s", self.error)
            raise SystemExit(f"tracefix_rl: {self.error}")
        if self.error is not None:
            raise self.error
        registry = get_registry()
        log.info("serving %d tasks (%d skipped)", len(registry.tasks), len(registry.problems))
