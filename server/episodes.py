"""The store of stateful HTTP episodes, keyed by ``episode_id``: the interface
(:class:`EpisodeStore`) and the in-process store (:class:`HttpEpisodes`, the default;
``server.redis_episodes`` keeps them in Redis for several replicas).

Upstream OpenEnv builds a new environment per HTTP request; here ``/reset`` stores the
episode and ``/step`` continues it. Contract of a store:

* **Bounded**: at most ``capacity`` episodes (``HTTP_MAX_EPISODES``).
* **Idle time is time since the last step or reset.** Looking an episode up (``GET /state``,
  :meth:`HttpEpisodes.get`) does not keep it alive, so a client cannot hold slots with
  keep-alive reads. An episode not stepped for ``ttl_s`` (``HTTP_EPISODE_TTL_S``) expires.
* **When full, a new episode evicts, in this order:** the least recently stepped *finished*
  episode; else the least recently stepped unfinished one that has been idle longer than
  ``grace_s`` (``HTTP_EPISODE_GRACE_S``) and has no request in flight; else nothing, and
  :class:`EpisodeStoreFull` says in how many seconds a slot becomes evictable (the HTTP
  layer answers 503 with ``Retry-After``). So one client holding every slot locks others
  out for at most ``grace_s``, unless it keeps stepping every one of its episodes.
* **Steps of one episode are serialised**: here by an ``asyncio.Lock`` per episode (the
  store is used from the event loop only); in Redis by a lease every replica respects.
* **A retried step is answered, not applied again**: a step given a ``request_id`` that the
  episode's last applied step had gets that step's observation back (only the last step is
  remembered), so a client may retry a step whose answer it lost.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from tracefix_rl.environment import TraceFixEnvironment
from tracefix_rl.models import TraceFixObservation, TraceFixState

log = logging.getLogger("tracefix_rl.server")

MIN_RETRY_AFTER_S = 1


class EpisodeStoreFull(RuntimeError):
    """Every HTTP episode slot holds an episode that may not be evicted yet."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UnknownEpisode(LookupError):
    """No stored episode has this id (never created, expired or evicted)."""


class EpisodeStoreUnavailable(RuntimeError):
    """The store cannot be reached (Redis down): the request may be retried (HTTP 503)."""


StepRunner = Callable[[TraceFixEnvironment], Awaitable[TraceFixObservation]]


class EpisodeStore(Protocol):
    """What the HTTP routes need of a store of episodes (see the module docstring)."""

    kind: str
    capacity: int

    async def reserve(self) -> None:
        """Ensure a slot is free before a reset does its work (may evict; raises
        :class:`EpisodeStoreFull`)."""
        ...

    async def start(self, env: TraceFixEnvironment) -> str:
        """Store the freshly reset episode of ``env`` (replacing one with its id); returns
        the id. The store owns ``env`` from now on."""
        ...

    async def step(
        self, episode_id: str, run: StepRunner, request_id: str | None = None
    ) -> TraceFixObservation:
        """Run ``run`` on the episode's environment, its steps serialised, and keep what it
        did; if the episode's last step had ``request_id``, return its observation instead.
        Raises :class:`UnknownEpisode`."""
        ...

    async def state(self, episode_id: str) -> TraceFixState:
        """The episode's state (reading it does not keep the episode alive)."""
        ...

    async def count(self) -> int:
        """Episodes stored (for ``/health``)."""
        ...

    def describe(self) -> dict[str, Any]:
        """Facts for ``/health``: ``kind``, ``capacity`` and the like."""
        ...

    def close(self) -> None:
        """At shutdown: release what this process holds (a shared store keeps the episodes)."""
        ...


@dataclass(eq=False)
class Episode:
    """One stored HTTP episode."""

    env: TraceFixEnvironment
    episode_id: str
    last_stepped: float = field(default_factory=lambda: time.monotonic())
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    in_flight: int = 0  # /step requests holding or waiting for the lock
    dropped: bool = False  # expired or evicted; the env is closed
    last_request: tuple[str, TraceFixObservation] | None = None  # the last step's id, answer


def check_bounds(capacity: int, ttl_s: float, grace_s: float) -> None:
    """``ValueError`` unless a store's bounds make sense (settings.py validates them too)."""
    if capacity < 1:
        raise ValueError(f"capacity must be at least 1, got {capacity}")
    if not 0 <= grace_s <= ttl_s:
        raise ValueError(f"grace_s ({grace_s}) must lie in 0..ttl_s ({ttl_s})")


class HttpEpisodes:
    """Bounded in-process store of HTTP episodes (see the module docstring)."""

    kind = "memory"

    def __init__(self, capacity: int, ttl_s: float, grace_s: float) -> None:
        check_bounds(capacity, ttl_s, grace_s)
        self.capacity = capacity
        self.ttl_s = ttl_s
        self.grace_s = grace_s
        self._episodes: dict[str, Episode] = {}

    def __len__(self) -> int:
        return len(self._episodes)

    # -- lookups ----------------------------------------------------------------------------

    def get(self, episode_id: str) -> Episode:
        """The stored episode (looking it up does not count as use); raises
        :class:`UnknownEpisode`."""
        self._expire()
        episode = self._episodes.get(episode_id)
        if episode is None:
            raise UnknownEpisode(
                f"unknown or expired episode_id {episode_id!r} (HTTP episodes expire "
                f"{self.ttl_s:.0f}s after their last step); POST /reset to start one"
            )
        return episode

    # -- life cycle ---------------------------------------------------------------------------

    def stepped(self, episode: Episode) -> None:
        """Record a step of ``episode`` (at its start and its end): it is not idle."""
        episode.last_stepped = time.monotonic()

    def make_room(self) -> None:
        """Ensure one slot is free, evicting as the contract says; raises
        :class:`EpisodeStoreFull` (with ``retry_after_s``) when no episode may go."""
        self._expire()
        if len(self._episodes) < self.capacity:
            return
        now = time.monotonic()
        by_age = sorted(self._episodes.values(), key=lambda e: e.last_stepped)
        finished = [e for e in by_age if e.env.state.done and not e.in_flight]
        idle = [e for e in by_age if not e.in_flight and now - e.last_stepped > self.grace_s]
        victim = (finished or idle or [None])[0]
        if victim is not None:
            log.info("HTTP episode store full: evicting %s episode %r, idle %.0fs",
                     "finished" if victim.env.state.done else "unfinished",
                     victim.episode_id, now - victim.last_stepped)  # fmt: skip
            self._drop(victim.episode_id)
            return
        # An episode with a step in flight is stepped again when it ends: count from now.
        oldest = min((e.last_stepped for e in by_age if not e.in_flight), default=now)
        retry = max(MIN_RETRY_AFTER_S, math.ceil(oldest + self.grace_s - now))
        raise EpisodeStoreFull(
            f"all {self.capacity} HTTP episode slots hold episodes stepped in the last "
            f"{self.grace_s:.0f}s; retry in {retry}s, finish an episode (SUBMIT), raise "
            "HTTP_MAX_EPISODES, or use the WebSocket endpoint /ws",
            retry_after_s=retry,
        )

    def add(self, env: TraceFixEnvironment) -> Episode:
        """Store a freshly reset episode, replacing one with the same id; may evict another
        (see :meth:`make_room`) or raise :class:`EpisodeStoreFull`."""
        episode_id = env.state.episode_id
        if episode_id is None:
            raise ValueError("the environment has not been reset")
        if episode_id in self._episodes:
            self._drop(episode_id)
        self.make_room()
        episode = Episode(env=env, episode_id=episode_id)
        self._episodes[episode_id] = episode
        return episode

    def close(self) -> None:
        for episode_id in list(self._episodes):
            self._drop(episode_id)

    # -- the EpisodeStore interface ---------------------------------------------------------

    async def reserve(self) -> None:
        self.make_room()

    async def start(self, env: TraceFixEnvironment) -> str:
        return self.add(env).episode_id

    async def step(
        self, episode_id: str, run: StepRunner, request_id: str | None = None
    ) -> TraceFixObservation:
        episode = self.get(episode_id)
        episode.in_flight += 1
        try:
            async with episode.lock:
                if episode.dropped:  # replaced or evicted while this request waited
                    raise UnknownEpisode(f"episode_id {episode_id!r} was reset again or "
                                         "evicted while this step waited")  # fmt: skip
                last = episode.last_request
                if request_id is not None and last is not None and last[0] == request_id:
                    return last[1]  # a retry of the step already applied
                self.stepped(episode)
                result = await run(episode.env)
                self.stepped(episode)
                episode.last_request = (request_id, result) if request_id is not None else None
                return result
        finally:
            episode.in_flight -= 1

    async def state(self, episode_id: str) -> TraceFixState:
        return self.get(episode_id).env.state

    async def count(self) -> int:
        return len(self)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "capacity": self.capacity}

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.ttl_s
        for episode in list(self._episodes.values()):
            if episode.last_stepped < cutoff and not episode.in_flight:
                self._drop(episode.episode_id)

    def _drop(self, episode_id: str) -> None:
        episode = self._episodes.pop(episode_id)
        episode.dropped = True
        episode.env.close()
