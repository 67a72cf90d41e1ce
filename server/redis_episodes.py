"""HTTP episodes kept in Redis (``EPISODE_STORE=redis://...``), so that every replica
behind a load balancer can continue every HTTP episode, and a replica's restart loses none.

The store keeps :class:`server.episodes.EpisodeStore`'s contract (bounded, idle time is
time since the last step or reset, the same eviction order, steps serialised) across
replicas. What lives in Redis, under ``KEY_PREFIX``:

* ``ep:<id>``: a hash of ``meta`` (``<incarnation>:<rev>``: a new incarnation per reset,
  the revision counting its steps), ``data`` (:meth:`TraceFixEnvironment.snapshot` as JSON:
  everything the next step needs: task id, file, undo history, counters, the reward's
  potential, the last measured run), and ``rid`` and ``answer`` (the last step's
  ``request_id`` and observation, when it had one: a retry gets that answer back). At most
  ``MAX_EPISODE_BYTES``; it expires ``ttl_s`` after its last step or reset.
* ``index`` / ``finished``: sorted sets of ids by last-step time (milliseconds), all and
  finished ones, from which the capacity is counted and the eviction victim chosen.
* ``lock:<id>``: the lease of the replica stepping the episode.

**A step** takes the episode's lease (``SET NX PX``, renewed while the step runs, so a
replica that dies holding it frees it within ``LEASE_MS``), reads the episode, rebuilds the
environment from its snapshot, runs the action, and writes the new snapshot only if the
stored ``incarnation`` and ``rev`` are still the ones it read (a Lua compare-and-set), so
two replicas never both apply a step, and a step whose episode was reset or evicted
meanwhile is answered like the in-process store answers it (404). Reserving a slot,
evicting and adding run as one Lua script, so the bound holds across replicas.

Every Redis call goes through :meth:`RedisEpisodes._call`: a connection failure becomes
:class:`EpisodeStoreUnavailable` (HTTP 503 with ``Retry-After``), never a 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as redis
from redis.exceptions import RedisError

from tracefix_rl.environment import TraceFixEnvironment
from tracefix_rl.models import TraceFixObservation, TraceFixState
from tracefix_rl.server.episodes import (
    MIN_RETRY_AFTER_S,
    EpisodeStoreFull,
    EpisodeStoreUnavailable,
    StepRunner,
    UnknownEpisode,
    check_bounds,
)
from tracefix_rl.settings import redacted

log = logging.getLogger("tracefix_rl.server")

KEY_PREFIX = "tracefix:"
MAX_EPISODE_BYTES = 1024 * 1024
"""A stored episode's bound. The file (20,000 characters), its undo history (256 KiB) and
the last output (64 KiB by default) keep a real one far below it (a fresh one is ~3 KB)."""
LEASE_MS = 10_000  # a dead replica's lease on an episode lapses within this
LEASE_RENEW_S = LEASE_MS / 3000  # renewed this often while its step runs
LOCK_WAIT_S = 600.0  # a step waits this long for another step of its episode to end
LOCK_POLL_S = (0.002, 0.05)  # first and longest pause between attempts to take the lease
EVICTION_SCAN = 64  # candidates the eviction script looks at, oldest first
LEASE_LOST = -1  # what the commit script answers when the step no longer holds the lease
NOT_KEPT = ("the episode store (Redis) stalled while this step was saved, and the step was "
            "not kept: retry it")  # fmt: skip
SETTLE_WAIT_S = 30.0  # how long a step whose save went unanswered asks what became of it
SETTLE_POLL_S = 0.5
CONNECT_WAIT_S = 15.0  # at start-up, how long to wait for Redis to answer
SOCKET_TIMEOUT_S = 10.0

Result = TypeVar("Result")

# KEYS: index, finished. ARGV: now_ms, ttl_ms, grace_ms, capacity, prefix, id ('' to only
# reserve), payload, scan, meta. Expires entries older than the TTL, evicts if full (a
# finished episode first, else one idle longer than the grace, never one whose lease is
# held), then stores the payload. Returns {1, victim} on success, {0, retry_after_ms} when
# full.
_ADD = """
local index, finished = KEYS[1], KEYS[2]
local now, ttl, grace = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local capacity, prefix, id, payload = tonumber(ARGV[4]), ARGV[5], ARGV[6], ARGV[7]
local scan = tonumber(ARGV[8])
redis.call('ZREMRANGEBYSCORE', index, '-inf', now - ttl)
redis.call('ZREMRANGEBYSCORE', finished, '-inf', now - ttl)
if id ~= '' then
  redis.call('ZREM', index, id)
  redis.call('ZREM', finished, id)
end
local victim = ''
if redis.call('ZCARD', index) >= capacity then
  local function free(candidates)
    for _, candidate in ipairs(candidates) do
      if redis.call('EXISTS', prefix .. 'lock:' .. candidate) == 0 then return candidate end
    end
    return nil
  end
  victim = free(redis.call('ZRANGE', finished, 0, scan - 1))
  if not victim then
    victim = free(redis.call('ZRANGEBYSCORE', index, '-inf', now - grace, 'LIMIT', 0, scan))
  end
  if not victim then
    local oldest = redis.call('ZRANGE', index, 0, 0, 'WITHSCORES')
    local retry = grace
    if oldest[2] then retry = tonumber(oldest[2]) + grace - now end
    return {0, tostring(retry)}
  end
  redis.call('DEL', prefix .. 'ep:' .. victim)
  redis.call('ZREM', index, victim)
  redis.call('ZREM', finished, victim)
end
if id ~= '' then
  local key = prefix .. 'ep:' .. id
  redis.call('DEL', key)
  redis.call('HSET', key, 'meta', ARGV[9], 'data', payload)
  redis.call('PEXPIRE', key, ttl)
  redis.call('ZADD', index, now, id)
end
return {1, victim}
"""

# KEYS: episode, index, finished, lock. ARGV: meta read, new meta, payload, ttl_ms, now_ms,
# id, done (1/0), lease token, request id ('' for none), answer. Stores the payload if the
# step still holds the lease (else -1; see _SETTLE) and the stored meta is still the one it
# read (else 0: reset or evicted).
_COMMIT = """
if redis.call('GET', KEYS[4]) ~= ARGV[8] then return -1 end
if redis.call('HGET', KEYS[1], 'meta') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'meta', ARGV[2], 'data', ARGV[3])
if ARGV[9] ~= '' then
  redis.call('HSET', KEYS[1], 'rid', ARGV[9], 'answer', ARGV[10])
else
  redis.call('HDEL', KEYS[1], 'rid', 'answer')
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
redis.call('ZADD', KEYS[2], tonumber(ARGV[5]), ARGV[6])
if ARGV[7] == '1' then redis.call('ZADD', KEYS[3], tonumber(ARGV[5]), ARGV[6]) end
return 1
"""

# KEYS: episode, lock. ARGV: new meta, lease token. After a commit whose answer was lost:
# 1 if it was applied; else the step's lease is dropped, so that the commit, should it
# still be on its way, can no longer apply (it checks the lease), and 0.
_SETTLE = """
if redis.call('HGET', KEYS[1], 'meta') == ARGV[1] then return 1 end
if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
return 0
"""

# KEYS: episode, index. ARGV: now_ms, id. Marks the episode as stepped (at a step's start).
_TOUCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('ZADD', KEYS[2], tonumber(ARGV[1]), ARGV[2])
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
end
return 0
"""


async def ping_until(client: redis.Redis, url: str, wait_s: float = CONNECT_WAIT_S) -> None:
    """Return once Redis at ``url`` answers a PING; ``RuntimeError`` naming the URL (its
    password redacted) if it does not within ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            await client.ping()
            return
        except (RedisError, OSError) as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"EPISODE_STORE: Redis at {redacted(url)} did not answer within "
                    f"{wait_s:.0f}s ({type(exc).__name__}: {exc})"
                ) from None
            await asyncio.sleep(0.5)


async def wait_for_redis(url: str, wait_s: float = CONNECT_WAIT_S) -> None:
    """:func:`ping_until` with a client of its own (``server.app.main`` checks the store
    before it starts anything, so a wrong URL ends the process with one line)."""
    client = redis.from_url(url, socket_timeout=SOCKET_TIMEOUT_S,
                            socket_connect_timeout=SOCKET_TIMEOUT_S)  # fmt: skip
    try:
        await ping_until(client, url, wait_s)
    finally:
        await client.aclose()


def _now_ms() -> int:
    return int(time.time() * 1000)


class RedisEpisodes:
    """HTTP episodes in Redis at ``url`` (see the module docstring); ``new_environment``
    builds the environment a snapshot is restored into."""

    kind = "redis"

    def __init__(
        self,
        url: str,
        capacity: int,
        ttl_s: float,
        grace_s: float,
        new_environment: Callable[[], TraceFixEnvironment],
    ) -> None:
        check_bounds(capacity, ttl_s, grace_s)
        self.url = url
        self.capacity = capacity
        self.ttl_ms = math.ceil(ttl_s * 1000)
        self.grace_ms = math.ceil(grace_s * 1000)
        self.ttl_s = ttl_s
        self._new_environment = new_environment
        self._redis = redis.from_url(url, socket_timeout=SOCKET_TIMEOUT_S,
                                     socket_connect_timeout=SOCKET_TIMEOUT_S)  # fmt: skip
        self._add = self._redis.register_script(_ADD)
        self._commit = self._redis.register_script(_COMMIT)
        self._settle = self._redis.register_script(_SETTLE)
        self._touch = self._redis.register_script(_TOUCH)
        self._release = self._redis.register_script(_RELEASE)
        self._renew = self._redis.register_script(_RENEW)
        self._reachable = True

    # -- keys -------------------------------------------------------------------------------

    @staticmethod
    def _episode_key(episode_id: str) -> str:
        return f"{KEY_PREFIX}ep:{episode_id}"

    @staticmethod
    def _lock_key(episode_id: str) -> str:
        return f"{KEY_PREFIX}lock:{episode_id}"

    _INDEX = f"{KEY_PREFIX}index"
    _FINISHED = f"{KEY_PREFIX}finished"

    # -- plumbing ---------------------------------------------------------------------------

    async def _call(self, operation: Awaitable[Result]) -> Result:
        """Await a Redis operation; a failure to reach Redis is :class:`EpisodeStoreUnavailable`."""
        try:
            result = await operation
        except (RedisError, OSError) as exc:
            self._reachable = False
            raise EpisodeStoreUnavailable(
                f"the episode store (Redis) cannot be reached: {type(exc).__name__}; retry "
                "shortly (WebSocket sessions at /ws do not need it)"
            ) from None
        self._reachable = True
        return result

    async def wait_until_reachable(self, wait_s: float = CONNECT_WAIT_S) -> None:
        """At start-up: wait for Redis to answer a PING (see :func:`ping_until`)."""
        await ping_until(self._redis, self.url, wait_s)

    @staticmethod
    def _payload(env: TraceFixEnvironment) -> str:
        payload = json.dumps(env.snapshot(), separators=(",", ":"))
        if len(payload) > MAX_EPISODE_BYTES:
            raise RuntimeError(f"an episode grew to {len(payload)} bytes, over the "
                               f"{MAX_EPISODE_BYTES}-byte bound")  # fmt: skip
        return payload

    async def _load(
        self, episode_id: str, request_id: str | None = None
    ) -> tuple[str, dict[str, Any] | TraceFixObservation]:
        """The episode's ``meta`` and snapshot, or, when its last step had ``request_id``,
        that step's observation; raises :class:`UnknownEpisode`."""
        key = self._episode_key(episode_id)
        meta, data, rid, answer = await self._call(
            self._redis.hmget(key, ["meta", "data", "rid", "answer"])
        )
        if meta is None or data is None:
            raise UnknownEpisode(
                f"unknown or expired episode_id {episode_id!r} (HTTP episodes expire "
                f"{self.ttl_s:.0f}s after their last step); POST /reset to start one"
            )
        try:
            if request_id is not None and rid is not None and rid.decode() == request_id:
                return meta.decode(), TraceFixObservation.model_validate_json(answer)
            return meta.decode(), json.loads(data)
        except ValueError:  # UnicodeDecodeError included: not written by this store
            raise EpisodeStoreUnavailable(
                f"episode {episode_id!r} is stored in a form this replica cannot read"
            ) from None

    async def _place(self, episode_id: str, payload: str, meta: str = "") -> None:
        """Run the add script (``episode_id`` '' only reserves); raises
        :class:`EpisodeStoreFull` when no slot can be freed."""
        keys = [self._INDEX, self._FINISHED]
        args = [_now_ms(), self.ttl_ms, self.grace_ms, self.capacity, KEY_PREFIX, episode_id,
                payload, EVICTION_SCAN, meta]  # fmt: skip
        placed, detail = await self._call(self._add(keys=keys, args=args))
        detail = detail.decode() if isinstance(detail, bytes) else str(detail)
        if int(placed) == 1:
            if detail:
                log.info("HTTP episode store full: evicted episode %r", detail)
            return
        retry = max(MIN_RETRY_AFTER_S, math.ceil(float(detail) / 1000))
        raise EpisodeStoreFull(
            f"all {self.capacity} HTTP episode slots hold episodes stepped in the last "
            f"{self.grace_ms / 1000:.0f}s; retry in {retry}s, finish an episode (SUBMIT), "
            "raise HTTP_MAX_EPISODES, or use the WebSocket endpoint /ws",
            retry_after_s=retry,
        )

    # -- the EpisodeStore interface -----------------------------------------------------------

    async def reserve(self) -> None:
        await self._place("", "")

    async def start(self, env: TraceFixEnvironment) -> str:
        try:
            episode_id = env.state.episode_id
            if episode_id is None:
                raise ValueError("the environment has not been reset")
            await self._place(episode_id, self._payload(env), f"{uuid.uuid4().hex}:0")
            return episode_id
        finally:
            env.close()  # the episode lives in Redis now

    async def step(
        self, episode_id: str, run: StepRunner, request_id: str | None = None
    ) -> TraceFixObservation:
        token = uuid.uuid4().hex
        await self._acquire(episode_id, token)
        renewal = asyncio.create_task(self._keep_lease(episode_id, token))
        env: TraceFixEnvironment | None = None
        try:
            meta, snapshot = await self._load(episode_id, request_id)
            if isinstance(snapshot, TraceFixObservation):
                return snapshot  # a retry of the step already applied
            await self._call(self._touch(keys=[self._episode_key(episode_id), self._INDEX],
                                         args=[_now_ms(), episode_id]))  # fmt: skip
            env = self._new_environment()
            try:
                env.restore(snapshot)
            except (KeyError, TypeError, ValueError) as exc:  # TaskSelectionError included
                raise EpisodeStoreUnavailable(
                    f"this replica cannot continue episode {episode_id!r}: {exc}"
                ) from None
            result = await run(env)
            incarnation, rev = meta.rsplit(":", 1)
            new_meta = f"{incarnation}:{int(rev) + 1}"
            keys = [self._episode_key(episode_id), self._INDEX, self._FINISHED,
                    self._lock_key(episode_id)]  # fmt: skip
            args = [meta, new_meta, self._payload(env), self.ttl_ms, _now_ms(), episode_id,
                    "1" if env.state.done else "0", token, request_id or "",
                    result.model_dump_json() if request_id is not None else ""]  # fmt: skip
            try:
                committed = await self._call(self._commit(keys=keys, args=args))
            except EpisodeStoreUnavailable:
                committed = await self._settled(episode_id, new_meta, token)
            if committed == LEASE_LOST:
                raise EpisodeStoreUnavailable(NOT_KEPT)
            if not committed:
                raise UnknownEpisode(f"episode_id {episode_id!r} was reset again or evicted "
                                     "while this step ran; the step was not kept")  # fmt: skip
            return result
        finally:
            renewal.cancel()
            if env is not None:
                env.close()
            try:
                await self._call(self._release(keys=[self._lock_key(episode_id)], args=[token]))
            except EpisodeStoreUnavailable:
                pass  # the lease lapses by itself within LEASE_MS

    async def state(self, episode_id: str) -> TraceFixState:
        _, snapshot = await self._load(episode_id)
        assert isinstance(snapshot, dict)
        return TraceFixState.model_validate(snapshot["episode"]["state"])

    async def count(self) -> int:
        cutoff = _now_ms() - self.ttl_ms
        return int(await self._call(self._redis.zcount(self._INDEX, cutoff, "+inf")))

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "capacity": self.capacity, "reachable": self._reachable}

    def close(self) -> None:
        """Nothing to release: the episodes stay in Redis for the other replicas (and this
        one after a restart); connections close with the process."""

    async def _settled(self, episode_id: str, new_meta: str, token: str) -> bool:
        """Whether a commit whose answer was lost (Redis stalled or the connection broke
        after it was sent) was applied: asked until Redis answers, within
        ``SETTLE_WAIT_S``. Once answered, the answer is final (see ``_SETTLE``), so a 503
        then means the step was not kept and may be retried. If Redis does not answer in
        time, the outcome is unknown, and the 503 says how to find out."""
        deadline = time.monotonic() + SETTLE_WAIT_S
        keys = [self._episode_key(episode_id), self._lock_key(episode_id)]
        while True:
            try:
                applied = await self._call(self._settle(keys=keys, args=[new_meta, token]))
                break
            except EpisodeStoreUnavailable:
                if time.monotonic() > deadline:
                    raise EpisodeStoreUnavailable(
                        "the episode store (Redis) stopped answering while this step was "
                        "saved; whether it was kept is unknown: GET /state shows the step "
                        "count before you retry"
                    ) from None
                await asyncio.sleep(SETTLE_POLL_S)
        if not applied:
            raise EpisodeStoreUnavailable(NOT_KEPT)
        return True

    # -- the lease --------------------------------------------------------------------------

    async def _acquire(self, episode_id: str, token: str) -> None:
        """Take the episode's lease, waiting for a step of it in flight elsewhere to end."""
        key = self._lock_key(episode_id)
        deadline = time.monotonic() + LOCK_WAIT_S
        pause = LOCK_POLL_S[0]
        while not await self._call(self._redis.set(key, token, nx=True, px=LEASE_MS)):
            if time.monotonic() > deadline:
                raise EpisodeStoreUnavailable(
                    f"another step of episode {episode_id!r} has run for over "
                    f"{LOCK_WAIT_S:.0f}s; retry later"
                )
            await asyncio.sleep(pause)
            pause = min(LOCK_POLL_S[1], pause * 2)

    async def _keep_lease(self, episode_id: str, token: str) -> None:
        while True:
            await asyncio.sleep(LEASE_RENEW_S)
            try:
                await self._call(self._renew(keys=[self._lock_key(episode_id)],
                                             args=[token, LEASE_MS]))  # fmt: skip
            except EpisodeStoreUnavailable:
                pass  # the commit will find out
