"""SIGINT and SIGTERM: the episode in progress ends with its [END] line, then the agent exits."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

from tracefix_rl.agent.output import log

# -- signals ------------------------------------------------------------------------------------


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived (a BaseException, like KeyboardInterrupt, so that no
    ``except Exception`` takes it for an episode's failure)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """SIGINT and SIGTERM as :class:`Interrupted`, raised at most once, in the main thread,
    and only inside :meth:`armed` sections (waiting on the model or the environment) and
    outside :meth:`shielded` ones (a [STEP] line and its record). A signal that arrives
    elsewhere (while [START] or [END] is written, during cleanup) is only recorded:
    :attr:`pending` tells the caller, and the next armed section raises it at its start.
    Once raised, later signals are only logged, so cleanup runs to its end."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._raised = False
        self._armed = 0
        self._shielded = 0
        self._previous: dict[int, Any] = {}

    @property
    def pending(self) -> bool:
        """A signal arrived: stop after the episode in progress."""
        return self.signum is not None

    def install(self) -> None:
        """Take over SIGINT and SIGTERM (from the main thread only; elsewhere it does
        nothing)."""
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        """Give SIGINT and SIGTERM back their previous handlers."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            log(f"received {name}: ending the episode in progress, then stopping")
        else:
            log(f"received {name} again; still stopping")
        self._raise_pending()

    def _raise_pending(self) -> None:
        if self.signum is not None and not self._raised and self._armed and not self._shielded:
            self._raised = True
            raise Interrupted(self.signum)

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        """A section a signal interrupts (at once, or at its start if one is pending)."""
        self._armed += 1
        try:
            self._raise_pending()
            yield
        finally:
            self._armed -= 1

    @contextlib.contextmanager
    def shielded(self) -> Iterator[None]:
        """A section inside an armed one that no signal interrupts; one that arrived
        meanwhile is raised at its end."""
        self._shielded += 1
        try:
            yield
        finally:
            self._shielded -= 1
        self._raise_pending()
