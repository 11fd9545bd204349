"""Where the counts live: a ``limits`` storage chosen by URI, and in-flight slots beside it.

``memory://`` (the default) counts in this process; ``redis://host:port/db``
(or ``rediss://``, ``redis+unix://``) shares the counts between processes and
hosts. Every check is **one** round trip to the store, and the values the
response headers need come from that same call:

* a window count is ``limits``' own ``Storage.incr`` (on Redis its
  ``incr_expire`` Lua script: ``INCRBY`` and, on the first hit, ``EXPIRE``).
  Windows are aligned to the clock (the window's number is part of the key),
  so the reset time is known without asking the store: the count the call
  returns is all the headers need. ``limits``' window strategies take two
  calls for the same answer (``hit`` then ``get_window_stats``: one more
  round trip per request), which is why they are not used here;
* an in-flight slot (a concurrency class) has no ``limits`` strategy: it is a
  small Lua script of ours over the same connection (a sorted set of slot
  tokens scored by their expiry: expired slots are dropped, the set is
  counted and, below the limit, the new slot added, in one ``EVALSHA``). A
  slot's expiry is what frees it when the worker holding it dies.

The Redis client is built with short timeouts (0.25 s to connect, 1 s per
call), no retries, and a bounded blocking pool (a burst of threads waits for
one of 64 connections rather than failing): when the store is down a call
fails fast and the class's failure mode decides (:mod:`charter.ratelimit.limiter`).
"""

from __future__ import annotations

import threading
import time
from typing import Any, cast

from limits.storage import Storage, storage_from_string

from ..errors import ConfigurationError

__all__ = ["Counters", "StoreFailed", "WindowCounts"]

#: The stores Charter counts in (``limits`` has more; their scripts are Redis's).
SCHEMES = ("memory://", "redis://", "rediss://", "redis+unix://")
#: Seconds a Redis connection may take to open before the store counts as unreachable.
REDIS_CONNECT_TIMEOUT = 0.25
#: Seconds a Redis call may take (and a caller may wait for a free connection).
REDIS_TIMEOUT = 1.0
#: Connections per process: past it, callers wait for one (never "too many connections").
REDIS_CONNECTIONS = 64

_ACQUIRE = """
redis.call('zremrangebyscore', KEYS[1], '-inf', ARGV[1])
local n = redis.call('zcard', KEYS[1])
if n >= tonumber(ARGV[3]) then
  local oldest = redis.call('zrange', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, n, oldest[2] or ARGV[1]}
end
redis.call('zadd', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), ARGV[4])
redis.call('expire', KEYS[1], math.ceil(tonumber(ARGV[2])))
return {1, n + 1, 0}
"""


class StoreFailed(Exception):
    """The store did not answer (connection refused, timeout, a Redis error)."""


class WindowCounts:
    """The in-process store: one count per window key, expired lazily, under one lock.

    Written here rather than ``limits``' ``MemoryStorage`` because that one
    starts a new ``threading.Timer`` thread 10 ms after each expiry sweep, on
    the next call: on a busy process a thread is created every few calls, and
    the gate call measured 8-15% slower with it (benchmarks/RESULTS.md) for a
    check that costs 4 µs. Keys carry their window's number, so an expired key
    is never read again; expired keys are dropped every :attr:`SWEEP_EVERY`
    counts, which bounds the memory by the keys of the live windows.
    """

    SWEEP_EVERY = 4096

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._counts: dict[str, list[float]] = {}  # key -> [count, expires at]
        self._lock = threading.Lock()
        self._clock = clock
        self._until_sweep = self.SWEEP_EVERY
        self.base_exceptions: tuple[type[BaseException], ...] = ()

    def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        now = self._clock()
        with self._lock:
            entry = self._counts.get(key)
            if entry is None or entry[1] <= now:
                entry = self._counts[key] = [0, now + expiry]
            entry[0] += amount
            self._until_sweep -= 1
            if self._until_sweep <= 0:
                self._sweep(now)
            return int(entry[0])

    def get(self, key: str) -> int:
        with self._lock:
            entry = self._counts.get(key)
            return 0 if entry is None or entry[1] <= self._clock() else int(entry[0])

    def _sweep(self, now: float) -> None:
        self._until_sweep = self.SWEEP_EVERY
        for key in [k for k, (_, end) in self._counts.items() if end <= now]:
            del self._counts[key]


class Counters:
    """Window counts and in-flight slots in one store (see the module docstring)."""

    def __init__(self, uri: str = "memory://") -> None:
        if not isinstance(uri, str) or not uri.startswith(SCHEMES):
            raise ConfigurationError(
                f"rate limit storage {_redacted(str(uri))!r} must be a URI such as memory:// or "
                "redis://host:6379/0 (schemes: " + ", ".join(SCHEMES) + ")"
            )
        self.uri = uri
        self.shared = not uri.startswith("memory://")
        try:
            self.storage = _store(uri, shared=self.shared)
        except Exception as exc:  # limits' ConfigurationError, a missing redis package
            raise ConfigurationError(f"rate limit storage {_redacted(uri)}: {exc}") from exc
        self._errors: tuple[type[BaseException], ...] = (OSError, self.storage.base_exceptions)
        self._slots: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()
        self._acquire: Any = None
        if self.shared:
            self._acquire = self.storage.get_connection().register_script(_ACQUIRE)

    def __repr__(self) -> str:
        return f"Counters({_redacted(self.uri)!r})"

    def hit(self, key: str, expiry: int) -> int:
        """Count one call in ``key``'s window; the count, this call included (one round trip)."""
        try:
            return int(self.storage.incr(key, expiry))
        except self._errors as exc:
            raise StoreFailed(str(exc)) from exc

    def peek(self, key: str) -> int:
        """The count in ``key``'s window, without counting (one round trip)."""
        try:
            return int(self.storage.get(key))
        except self._errors as exc:
            raise StoreFailed(str(exc)) from exc

    def acquire(
        self, key: str, token: str, limit: int, ttl: float, now: float
    ) -> tuple[bool, int, float]:
        """Take an in-flight slot: (taken, slots in flight, when the oldest frees at the latest)."""
        if self._acquire is None:
            return self._acquire_here(key, token, limit, ttl, now)
        try:
            taken, count, oldest = self._acquire(
                keys=[self._key(key)], args=[now, ttl, limit, token]
            )
        except self._errors as exc:
            raise StoreFailed(str(exc)) from exc
        return bool(taken), int(count), float(oldest)

    def release(self, key: str, token: str) -> None:
        """Give a slot back (a slot that cannot be given back frees at its expiry)."""
        if self._acquire is None:
            with self._lock:
                self._slots.get(key, {}).pop(token, None)
            return
        try:
            self.storage.get_connection().zrem(self._key(key), token)
        except self._errors as exc:
            raise StoreFailed(str(exc)) from exc

    def _acquire_here(
        self, key: str, token: str, limit: int, ttl: float, now: float
    ) -> tuple[bool, int, float]:
        with self._lock:
            slots = {t: end for t, end in self._slots.get(key, {}).items() if end > now}
            self._slots[key] = slots
            if len(slots) >= limit:
                return False, len(slots), min(slots.values())
            slots[token] = now + ttl
            return True, len(slots), 0.0

    def close(self) -> None:
        """Close the store's connections (a Redis pool); the in-process store has none."""
        if self.shared:
            connection: Any = self.storage.get_connection()
            connection.close()
            connection.connection_pool.disconnect()

    def _key(self, key: str) -> str:
        return f"{getattr(self.storage, 'key_prefix', 'LIMITS')}:{key}"


def _store(uri: str, *, shared: bool) -> Any:
    """Any: ``limits``' Redis storages and :class:`WindowCounts` share ``incr``/``get`` only."""
    return cast(Storage, storage_from_string(uri, **_options(uri))) if shared else WindowCounts()


def _options(uri: str) -> dict[str, Any]:
    if uri.startswith("memory://"):
        return {}
    from redis import BlockingConnectionPool
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    pool = BlockingConnectionPool.from_url(
        uri.replace("redis+unix://", "unix://"),
        max_connections=REDIS_CONNECTIONS,
        timeout=REDIS_TIMEOUT,
        socket_timeout=REDIS_TIMEOUT,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT,
    )
    return {"connection_pool": pool, "retry": Retry(NoBackoff(), 0), "key_prefix": "charter-rl"}


def _redacted(uri: str) -> str:
    """The URI without its password (``redis://:secret@host`` → ``redis://***@host``)."""
    scheme, sep, rest = uri.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    return f"{scheme}{sep}{rest}"
