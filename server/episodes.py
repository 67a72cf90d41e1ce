"""The store of stateful HTTP episodes, keyed by ``episode_id``.

Upstream OpenEnv builds a new environment per HTTP request; here ``/reset`` stores the
episode and ``/step`` continues it. The store is bounded and idle episodes expire.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from fastapi import HTTPException

from environment import TraceFixEnvironment


class EpisodeStoreFull(RuntimeError):
    """Every HTTP episode slot holds a live, unfinished episode."""


@dataclass
class _Episode:
    env: TraceFixEnvironment
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_used: float = field(default_factory=lambda: time.monotonic())


class HttpEpisodes:
    """Bounded store of HTTP episodes keyed by ``episode_id``, expiring when idle."""

    def __init__(self, capacity: int, ttl_s: float) -> None:
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._episodes: OrderedDict[str, _Episode] = OrderedDict()
        self._latest: str | None = None

    def __len__(self) -> int:
        return len(self._episodes)

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.ttl_s
        for episode_id in [k for k, e in self._episodes.items() if e.last_used < cutoff]:
            self._drop(episode_id)

    def _drop(self, episode_id: str) -> None:
        episode = self._episodes.pop(episode_id)
        episode.env.close()
        if self._latest == episode_id:
            self._latest = None

    def add(self, env: TraceFixEnvironment) -> None:
        """Store a freshly reset episode (replacing one with the same id)."""
        episode_id = env.state.episode_id
        assert episode_id is not None
        self._expire()
        if episode_id in self._episodes:
            self._drop(episode_id)
        if len(self._episodes) >= self.capacity:
            finished = next((k for k, e in self._episodes.items() if e.env.state.done), None)
            if finished is None:
                raise EpisodeStoreFull(
                    f"all {self.capacity} HTTP episode slots hold unfinished episodes; finish "
                    f"one (SUBMIT), wait {self.ttl_s:.0f}s for idle ones to expire, raise "
                    "HTTP_MAX_EPISODES, or use the WebSocket endpoint /ws"
                )
            self._drop(finished)
        self._episodes[episode_id] = _Episode(env)
        self._latest = episode_id

    def get(self, episode_id: str | None) -> _Episode:
        """The named episode, else the most recent one; 404 when there is none."""
        self._expire()
        key = episode_id if episode_id is not None else self._latest
        if key is None:
            raise HTTPException(404, "no HTTP episode is running: POST /reset first")
        episode = self._episodes.get(key)
        if episode is None:
            raise HTTPException(
                404,
                f"unknown or expired episode_id {key!r} (HTTP episodes expire after "
                f"{self.ttl_s:.0f}s idle); POST /reset to start one",
            )
        episode.last_used = time.monotonic()
        self._episodes.move_to_end(key)
        return episode

    def latest(self) -> _Episode | None:
        self._expire()
        return self._episodes.get(self._latest) if self._latest else None

    def close(self) -> None:
        for episode_id in list(self._episodes):
            self._drop(episode_id)
