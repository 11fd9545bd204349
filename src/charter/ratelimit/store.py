"""Where the counts live: a ``limits`` storage chosen by URI, and in-flight slots beside it.

``memory://`` (the default) counts in this process; ``redis://host:port/db``
(or ``rediss://``, ``redis+unix://``) shares the counts between processes and
hosts. Every check is **one** round trip to the store, and the values the
response headers need come from that same call:

* a window count is ``INCRBY`` and ``EXPIRE … NX`` (the expiry set by the
  first hit only), sent together: one round trip, two replies. Over the same
  keys as ``limits``' ``incr_expire``, so :meth:`Counters.peek` reads them
  with ``limits``' ``get``. Not that script: running Lua cost Redis 8-12 µs
  a count (``INFO commandstats``: ``evalsha`` against 1.1 µs for ``incrby``
  and 0.6 for ``expire``), and on a host where Redis shares the caller's
  cores a gate call took 11-25 µs longer with it (benchmarks/RESULTS.md).
  The two commands arrive in one write, so they are applied together short
  of a torn write; between them another client's command may run, which is
  harmless (``NX`` sets an expiry only on a key that has none, and only
  ``INCRBY`` creates the key). A server without ``EXPIRE … NX`` (before
  Redis 7.0) answers it with an error: the key's expiry is then set by a
  plain ``EXPIRE`` when this count created it, and the store counts with
  the script from then on.
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

A count can be **sent now and read later** (:meth:`Counters.hit_later`): the
gate sends it before it validates the input and opens its transaction, and
reads the reply just before its first statement, so the round trip overlaps
work the call does anyway. This is written on ``redis-py``'s connection
(``pack_command``, ``send_packed_command``, ``read_response``) rather than its client, whose
per-command path (a pool that polls each connection it hands out, retries,
observability hooks) cost 176 µs a count here against 120 µs for the same
script sent this way (benchmarks/RESULTS.md): a connection is held by exactly
one count from its send to its reply, and closed, never reused, when the
reply cannot be read (:class:`_Connections`).

The Redis client is built with short timeouts (0.25 s to connect, 1 s per
call), no retries, and a bounded blocking pool (a burst of threads waits for
one of 64 connections rather than failing): when the store is down a call
fails fast and the class's failure mode decides (:mod:`charter.ratelimit.limiter`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from limits.storage import Storage, storage_from_string

from ..errors import ConfigurationError

__all__ = ["Counters", "StoreFailed", "WindowCounts"]

log = logging.getLogger("charter.ratelimit")

#: The stores Charter counts in (``limits`` has more; their scripts are Redis's).
SCHEMES = ("memory://", "redis://", "rediss://", "redis+unix://")
#: Seconds a Redis connection may take to open before the store counts as unreachable.
REDIS_CONNECT_TIMEOUT = 0.25
#: Seconds a Redis call may take (and a caller may wait for a free connection).
REDIS_TIMEOUT = 1.0
#: Connections per process: past it, callers wait for one (never "too many connections").
REDIS_CONNECTIONS = 64

#: ``limits``' ``incr_expire``: the count, this hit included; the key expires with its window.
_INCR = """
local current = redis.call('incrby', KEYS[1], ARGV[2])
if current == tonumber(ARGV[2]) then
  redis.call('expire', KEYS[1], ARGV[1])
end
return current
"""

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


#: ``INCRBY <key> 1`` and ``EXPIRE <key> <seconds> NX`` in RESP: the first command's head,
#: then the key, the second command's head, the key, the seconds, ``NX``.
_COUNT = b"*3\r\n$6\r\nINCRBY\r\n"
_COUNT_EXPIRE = b"$1\r\n1\r\n*4\r\n$6\r\nEXPIRE\r\n"


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
        self._prefix = f"{getattr(self.storage, 'key_prefix', 'LIMITS')}:"  # limits' key form
        self._slots: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()
        self._acquire: Any = None
        if self.shared:
            from redis.exceptions import NoScriptError, ResponseError  # limits built a Redis store

            self._noscript: type[Exception] = NoScriptError
            self._refused: type[Exception] = ResponseError
            #: Whether the server takes ``EXPIRE … NX`` (Redis 7.0+): until it refuses it once.
            self.expire_nx = True
            client = self.storage.get_connection()
            self._acquire = client.register_script(_ACQUIRE)
            self._incr = client.register_script(_INCR)
            self._held = _Connections(client.connection_pool)
            sha = self._incr.sha.encode()
            self._evalsha = b"*6\r\n$7\r\nEVALSHA\r\n$%d\r\n%b\r\n$1\r\n1\r\n" % (len(sha), sha)

    def __repr__(self) -> str:
        return f"Counters({_redacted(self.uri)!r})"

    def hit(self, key: str, expiry: int) -> int:
        """Count one call in ``key``'s window; the count, this call included (one round trip)."""
        if not self.shared:
            return int(self.storage.incr(key, expiry))
        return self.hit_later(key, expiry)()

    def hit_later(self, key: str, expiry: int) -> Callable[[], int]:
        """Send one call's count now; the returned function reads the count (once).

        In process, the count is taken at once. On Redis the connection is
        this count's until its reply is read: the reader gives it back to the
        pool, or drops it when the reply cannot be read. Raises
        :class:`StoreFailed` when the count cannot be sent; the reader raises
        it when the reply cannot be read.
        """
        if not self.shared:
            count = int(self.storage.incr(key, expiry))
            return lambda: count
        held, name, nx = self._held, self._prefix + key, self.expire_nx
        connection = held.take()
        try:
            packed = self._packed(connection, name, expiry, nx=nx)
            connection.send_packed_command([packed], check_health=False)
        except BaseException as exc:
            held.drop(connection)
            if isinstance(exc, self._errors):
                raise StoreFailed(str(exc)) from exc
            raise
        unread = [connection]

        def read() -> int:
            if not unread:
                raise RuntimeError("a count's reply is read once")
            connection = unread.pop()
            try:
                count = int(self._replies(connection, name, expiry, nx))
            except BaseException as exc:
                held.drop(connection)  # a reply may be left unread on it
                if isinstance(exc, self._errors):
                    raise StoreFailed(str(exc)) from exc
                raise
            held.give(connection)
            return count

        return read

    def _replies(self, connection: Any, name: str, expiry: int, nx: bool) -> Any:
        """Read one count's replies (see the module docstring): the count."""
        if not nx:
            try:
                return connection.read_response()
            except self._noscript:  # the store lost its scripts (restart, SCRIPT FLUSH)
                connection.send_command("EVAL", _INCR, 1, name, expiry, 1)
                return connection.read_response()
        count = connection.read_response()
        try:
            connection.read_response()  # EXPIRE … NX: 1 set now, 0 already set
        except self._refused as exc:  # before Redis 7.0: no NX (the count itself was taken)
            if self.expire_nx:
                self.expire_nx = False
                log.warning("rate limit store %r has no EXPIRE … NX (%s): counting with a "
                            "script", self, exc)  # fmt: skip
            if int(count) == 1:  # this count created the key: its expiry is ours to set
                connection.send_command("EXPIRE", name, expiry)
                connection.read_response()
        return count

    def _packed(self, connection: Any, key: str, expiry: int, *, nx: bool = True) -> bytes:
        """The count in RESP, the bytes redis-py's ``pack_commands`` writes (a test compares
        them), from parts built once: ``INCRBY <key> 1`` and ``EXPIRE <key> <expiry> NX``, or
        ``EVALSHA <sha> 1 <key> <expiry> 1`` (``nx=False``).

        Packed here because ``pack_command`` (an encoder call and a chunk per
        argument) took 14 µs of a count inside gate calls, a tenth of what the
        count costs the call (benchmarks/RESULTS.md); this takes about 1 µs.
        """
        name, seconds = connection.encoder.encode(key), b"%d" % expiry
        if nx:
            return b"%b$%d\r\n%b\r\n%b$%d\r\n%b\r\n$%d\r\n%b\r\n$2\r\nNX\r\n" % (
                _COUNT, len(name), name, _COUNT_EXPIRE, len(name), name, len(seconds), seconds,
            )  # fmt: skip
        return self._evalsha + b"$%d\r\n%b\r\n$%d\r\n%b\r\n$1\r\n1\r\n" % (
            len(name), name, len(seconds), seconds,
        )  # fmt: skip

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
            self._held.close()
            connection: Any = self.storage.get_connection()
            connection.close()
            connection.connection_pool.disconnect()

    def _key(self, key: str) -> str:
        return self._prefix + key


class _Connections:
    """The connections counts are sent on: each held whole from its send to its reply.

    ``redis-py``'s pool checks every connection it hands out for unread data
    (a ``poll`` per call: 25-30 µs here, a fifth of the round trip). These
    connections need no such check: one goes back only after its reply was
    read, and one whose reply was not is closed and forgotten
    (:meth:`drop`). They are made from the client pool's own class and
    settings (TLS, unix sockets, timeouts), at most :data:`REDIS_CONNECTIONS`
    at once; past that a caller waits up to :data:`REDIS_TIMEOUT` for one. A
    forked child starts with none of its parent's.
    """

    def __init__(self, pool: Any) -> None:
        self._make: Callable[[], Any] = lambda: pool.connection_class(**pool.connection_kwargs)
        self._idle: list[Any] = []
        self._out = 0  # connections handed out and not yet given back or dropped
        self._ready = threading.Condition(threading.Lock())
        self._pid = os.getpid()
        #: Connections handed out before the last close(): closed when given back.
        self._stale: set[int] = set()
        self._out_ids: set[int] = set()

    def take(self) -> Any:
        with self._ready:
            if self._pid != os.getpid():  # a forked child: its parent's sockets are not its own
                self._idle, self._out, self._pid = [], 0, os.getpid()
                self._stale, self._out_ids = set(), set()
            connection = self._take()
            self._out_ids.add(id(connection))
            return connection

    def _take(self) -> Any:  # under the lock
        if self._idle:
            self._out += 1
            return self._idle.pop()
        if not self._ready.wait_for(
            lambda: self._idle or self._out < REDIS_CONNECTIONS, REDIS_TIMEOUT
        ):
            raise StoreFailed(f"no free connection in {REDIS_TIMEOUT} s")
        self._out += 1
        return self._idle.pop() if self._idle else self._make()  # connects on first send

    def give(self, connection: Any) -> None:
        """Back to the idle ones: only with nothing left to read on it, and not if the store
        was closed while this count held it (then it is closed)."""
        with self._ready:
            self._out -= 1
            self._out_ids.discard(id(connection))
            stale = id(connection) in self._stale
            if stale:
                self._stale.discard(id(connection))
            else:
                self._idle.append(connection)
            self._ready.notify()
        if stale:
            connection.disconnect()

    def drop(self, connection: Any) -> None:
        """Close a connection whose reply is unread or unreadable; it is never used again."""
        connection.disconnect()
        with self._ready:
            self._out -= 1
            self._out_ids.discard(id(connection))
            self._stale.discard(id(connection))
            self._ready.notify()

    def close(self) -> None:
        """Close the idle connections now, and those still held by a count when given back."""
        with self._ready:
            self._stale |= self._out_ids
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.disconnect()


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
