"""The app's lifespan: start the sandbox and load the tasks before serving; close the sandbox.

:class:`TaskLoader` starts the process-wide sandbox workers and loads the process-wide task
registry (oracle checks included), configured by the server's settings, in a background
thread. :func:`install_lifespan` makes the app's lifespan start it and wait for it, so the
server accepts its first connection only once the tasks are ready, and close the sandbox
when the app shuts down.

``server.app.main()`` starts the loader itself, before it imports and builds the app: the
workers boot and the oracle checks run meanwhile, which is most of a cold start. An app
served any other way (``uvicorn tracefix_rl.server.app:app``, a test client) starts it in
its lifespan. Either way, importing or building the app starts nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from tracefix_rl.sandbox import SandboxBackend, SandboxUnavailable, close_sandbox, get_sandbox
from tracefix_rl.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

    from tracefix_rl.tasks import TaskRegistry

log = logging.getLogger("tracefix_rl.server")


class TaskLoader:
    """Starts the sandbox and loads the task registry of ``settings`` in a thread; see the
    module docstring."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.error: BaseException | None = None
        self.sandbox: SandboxBackend | None = None  # once started
        self.registry: TaskRegistry | None = None  # once loaded
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Begin loading in a background thread and return at once; later calls do nothing."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._load, name="task-loader",
                                                daemon=True)  # fmt: skip
                self._thread.start()

    def _load(self) -> None:
        try:
            self.sandbox = get_sandbox(self.settings)
            # Imported here, in this thread: the task modules import while the app's do.
            from tracefix_rl.tasks import get_registry

            self.registry = get_registry(self.settings)
        except BaseException as exc:  # noqa: BLE001 - reported by ready()
            self.error = exc

    async def ready(self) -> None:
        """Start loading if nothing has, and wait for it. Raises ``SystemExit`` with the reason
        when the sandbox cannot isolate as required, and any other error of the load."""
        self.start()
        assert self._thread is not None
        await asyncio.to_thread(self._thread.join)
        if isinstance(self.error, SandboxUnavailable):
            log.critical("%s", self.error)
            raise SystemExit(f"tracefix_rl: {self.error}")
        if self.error is not None:
            raise self.error
        registry = self.registry
        assert registry is not None
        log.info("serving %d tasks (%d skipped)", len(registry.tasks), len(registry.problems))

    def close(self) -> None:
        """Close the sandbox (idempotent; the graceful shutdown of ``server.serve`` has
        usually closed it already)."""
        close_sandbox()


def install_lifespan(
    app: FastAPI, loader: TaskLoader, checks: Sequence[Callable[[], Awaitable[None]]] = ()
) -> None:
    """Wrap ``app``'s lifespan: ``loader`` is ready and every start-up check has passed (e.g.
    Redis answers) before the app's own startup handlers run, and the sandbox is closed
    after its shutdown handlers (or a failed startup)."""
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(asgi_app: Any) -> AsyncIterator[Any]:
        try:
            await loader.ready()
            for check in checks:
                await check()
            async with inner(asgi_app) as state:
                yield state
        finally:
            loader.close()

    app.router.lifespan_context = lifespan
