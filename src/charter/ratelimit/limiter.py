"""The rate limiter: classes, counts per (tenant, actor, class), failure modes, the fields.

:meth:`RateLimiter.check` counts one call of an actor against a class and
returns what the ``RateLimit`` fields of the response say
(draft-ietf-httpapi-ratelimit-headers, in its structured-field form:
``RateLimit-Policy: "write";q=300;w=60`` and ``RateLimit: "write";r=42;t=30``),
or raises :class:`~charter.errors.RateLimited` (429, with ``Retry-After`` and
both fields) once the window's count passes the limit. Windows are aligned to
the clock: a window of 60 s resets on the minute, so ``t`` is known without
asking the store (:mod:`charter.ratelimit.store`).

When the shared store cannot be reached, the class's failure mode decides:
``closed`` raises :class:`~charter.errors.RateLimitUnavailable` (503,
``Retry-After``), ``open`` counts in this process and writes one audited
warning per outage. After a failure the store is left alone for
``retry_after`` seconds (so an outage costs one timeout, not one per call),
then tried again.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from ..audit.entry import AuditEntry
from ..errors import ConfigurationError, RateLimited, RateLimitUnavailable
from .classes import RateClass, class_table
from .denials import DenialLog
from .store import Counters, StoreFailed

__all__ = ["FAIL_OPEN", "RateLimiter", "RateState", "rate_headers"]

log = logging.getLogger("charter.ratelimit")

#: The outcome of the audited warning written when a fail-open class falls back.
FAIL_OPEN = "rate_limit_fail_open"
#: (class, actor) pairs remembered at their limit (:meth:`RateLimiter.at_limit`), per process.
_FULL_KEYS = 4096


@dataclass(frozen=True, slots=True)
class RateState:
    """One policy after a check: the values of its ``RateLimit-Policy`` and ``RateLimit`` members.

    ``window`` is ``None`` for a concurrency policy (quota unit
    ``concurrent-requests``: ``remaining`` slots free now, no reset time).
    """

    policy: str
    quota: int
    window: int | None
    remaining: int
    reset: int | None

    def policy_member(self) -> str:
        if self.window is None:
            return f'"{self.policy}";q={self.quota};qu="concurrent-requests"'
        return f'"{self.policy}";q={self.quota};w={self.window}'

    def member(self) -> str:
        if self.reset is None:
            return f'"{self.policy}";r={self.remaining}'
        return f'"{self.policy}";r={self.remaining};t={self.reset}'


def rate_headers(states: Iterable[RateState]) -> dict[str, str]:
    """The ``RateLimit-Policy`` and ``RateLimit`` fields for ``states`` (none: no fields)."""
    states = tuple(states)
    if not states:
        return {}
    return {
        "RateLimit-Policy": ", ".join(s.policy_member() for s in states),
        "RateLimit": ", ".join(s.member() for s in states),
    }


T = TypeVar("T")

#: Builds the audit entry of a refused call from the denial's details (the caller's identity).
Audit = Callable[[dict[str, object]], AuditEntry]


class RateLimiter:
    """Counts calls per (tenant, actor, rate class) in a store chosen by URI.

    ``storage``: ``"memory://"`` (this process) or ``"redis://host:6379/0"``
    (shared). ``classes``: rate classes added to (or replacing) the defaults
    (:data:`~charter.ratelimit.classes.DEFAULT_CLASSES`).
    """

    def __init__(
        self,
        storage: str = "memory://",
        *,
        classes: Iterable[RateClass] | Mapping[str, RateClass] | None = None,
        retry_after: int = 2,
    ) -> None:
        self.counters = Counters(storage)
        self.fallback = Counters("memory://") if self.counters.shared else None
        self.classes = class_table(classes)
        self.retry_after = retry_after
        self.denials = DenialLog()
        self._clock: Callable[[], datetime] = lambda: datetime.now(UTC)
        self._down_until = 0.0  # time.monotonic(): leave the store alone until then
        self._degraded = False
        #: (class, who) -> the window in which this process last saw them reach the limit.
        self._full: dict[tuple[str, str], int] = {}

    def __repr__(self) -> str:
        return f"RateLimiter({self.counters!r}, classes={sorted(self.classes)})"

    @classmethod
    def of(cls, setting: str | RateLimiter | None) -> RateLimiter | None:
        """``Charter(rate_limits=)``: a storage URI, a limiter, or None (no rate limits)."""
        if setting is None or isinstance(setting, RateLimiter):
            return setting
        if isinstance(setting, str):
            return cls(setting)
        raise ConfigurationError(
            "rate_limits= must be a storage URI (memory://, redis://host:6379/0) or a RateLimiter"
        )

    def bind(self, write: Callable[[AuditEntry], None], clock: Callable[[], datetime]) -> None:
        """Audit through ``write`` (one entry outside any call), on ``clock`` (the Charter's)."""
        self._clock = clock
        self.denials.bind(write, clock)

    def rate_class(self, name: str) -> RateClass:
        try:
            return self.classes[name]
        except KeyError:
            raise ConfigurationError(
                f"there is no rate class named {name!r}; classes: {', '.join(sorted(self.classes))}"
            ) from None

    @staticmethod
    def who(tenant: str | None, actor: str) -> str:
        """A bounded, unambiguous key part for (tenant, actor): no separator can be forged."""
        raw = f"{tenant or ''}\x00{actor}".encode("utf-8", "surrogatepass")
        return hashlib.blake2b(raw, digest_size=12).hexdigest()

    # -- checks --------------------------------------------------------------------------

    def at_limit(self, cls: RateClass, who: str, now: datetime) -> bool:
        """Whether a count of ``who`` in ``cls``'s current window, in this process, reached the
        limit: their next call is then expected to be refused, and checked before any work."""
        return self._full.get((cls.name, who)) == int(now.timestamp() // cls.window)

    def check(
        self, cls: RateClass, who: str, now: datetime, audit: Audit | None = None
    ) -> RateState:
        """Count one call of ``who`` in ``cls``'s current window; raise when it is over."""
        return self.check_later(cls, who, now, audit)()

    def check_later(
        self, cls: RateClass, who: str, now: datetime, audit: Audit | None = None
    ) -> Callable[[], RateState]:
        """:meth:`check` in two halves, so that the store's round trip overlaps the caller's work.

        The count is sent now; the returned function reads it (call it once)
        and returns the state, or raises :class:`~charter.errors.RateLimited`
        over the limit. The count is taken either way: whatever the caller does
        in between, its refusal must come from the returned function.
        """
        stamp = now.timestamp()
        index = int(stamp // cls.window)
        key, expiry = f"{cls.name}/{who}/{index}", cls.window + 1
        read = self._counted(cls, lambda c: c.hit_later(key, expiry))

        def settle() -> RateState:
            try:
                count = read()
            except StoreFailed as exc:  # sent, but no reply: the class's failure mode
                count = self._failed(cls, exc, lambda c: c.hit(key, expiry))
            reset = max(1, math.ceil((index + 1) * cls.window - stamp))
            state = RateState(cls.name, cls.amount, cls.window, max(0, cls.amount - count), reset)
            if count >= cls.amount:
                self._reached(cls.name, who, index)
            if count > cls.amount:
                closes = datetime.fromtimestamp((index + 1) * cls.window, UTC)
                first = count == cls.amount + 1  # exactly one call, in all processes, sees it
                raise self._refused(cls, state, reset, (cls.name, who, index), first, closes, audit)
            return state

        return settle

    def _reached(self, name: str, who: str, index: int) -> None:
        if len(self._full) >= _FULL_KEYS:  # bounded: forgetting costs a BEGIN, never a check
            self._full.clear()
        self._full[(name, who)] = index

    def peek(
        self, cls: RateClass, who: str, now: datetime, audit: Audit | None = None
    ) -> RateState:
        """The state of ``who`` in ``cls`` without counting a call; raise if already over.

        A refusal on the limit itself (no counted call over it yet) may be the
        window's first denial, so it is recorded as one: audited at once
        (:mod:`.denials`). Past the limit, a counted call was refused first.
        """
        stamp = now.timestamp()
        index = int(stamp // cls.window)
        count = self._counted(cls, lambda c: c.peek(f"{cls.name}/{who}/{index}"))
        reset = max(1, math.ceil((index + 1) * cls.window - stamp))
        state = RateState(cls.name, cls.amount, cls.window, max(0, cls.amount - count), reset)
        if count >= cls.amount:
            closes = datetime.fromtimestamp((index + 1) * cls.window, UTC)
            first = count == cls.amount
            raise self._refused(cls, state, reset, (cls.name, who, index), first, closes, audit)
        return state

    def acquire(
        self, cls: RateClass, who: str, now: datetime, audit: Audit | None = None
    ) -> tuple[RateState, Callable[[], None]]:
        """Take one of ``cls``'s in-flight slots for ``who``: its state and its release."""
        assert cls.concurrency is not None  # only classes with a concurrency limit
        stamp, ttl = now.timestamp(), cls.concurrency_ttl.total_seconds()
        key, token = f"{cls.name}-inflight/{who}", os.urandom(12).hex()
        used: list[Counters] = []

        def take(counters: Counters) -> tuple[bool, int, float]:
            used.append(counters)
            return counters.acquire(key, token, cls.concurrency or 1, ttl, stamp)

        taken, count, _ = self._counted(cls, take)
        policy = f"{cls.name}-concurrency"
        state = RateState(policy, cls.concurrency, None, max(0, cls.concurrency - count), None)
        if not taken:
            index = int(stamp // cls.window)
            closes = datetime.fromtimestamp((index + 1) * cls.window, UTC)
            raise self._refused(cls, state, 1, (policy, who, index), True, closes, audit)
        counters = used[-1]

        def release() -> None:
            try:
                counters.release(key, token)
            except StoreFailed:
                log.warning("could not release a %s slot; it frees in %.0f s", cls.name, ttl)

        return state, release

    # -- refusals and failures -------------------------------------------------------------

    def _refused(
        self,
        cls: RateClass,
        state: RateState,
        retry: int,
        key: tuple[str, str, int],
        first: bool,
        closes: datetime,
        audit: Audit | None,
    ) -> RateLimited:
        """The 429 of a refused call, its denial recorded (audited aggregated: :mod:`.denials`)."""
        if audit is not None:
            detail: dict[str, object] = {"rate_class": cls.name, "policy": state.policy_member()}
            self.denials.denied(key, first=first, closes=closes, entry=lambda: audit(detail))
        what = (
            f"{cls.concurrency} at once"
            if state.window is None
            else f"{cls.amount} per {cls.window} s"
        )
        error = RateLimited(
            f"Too many {cls.name} requests (at most {what}): retry in {retry} s.",
            rate_class=cls.name,
            retry_after=retry,
        )
        error.headers.update({"Retry-After": str(retry), **rate_headers([state])})
        return error

    def _counted(self, cls: RateClass, op: Callable[[Counters], T]) -> T:
        """``op`` on the store; when it is down, the class's failure mode (module docstring)."""
        if self.fallback is None:
            return op(self.counters)
        if time.monotonic() < self._down_until:
            return self._failed(cls, None, op)
        try:
            result = op(self.counters)
        except StoreFailed as exc:
            return self._failed(cls, exc, op)
        if self._degraded:
            self._degraded = False
            log.warning("rate limit store %r reachable again", self.counters)
        return result

    def _failed(self, cls: RateClass, exc: StoreFailed | None, op: Callable[[Counters], T]) -> T:
        """The store failed (``exc``) or is being left alone (None): 503, or ``op`` here."""
        if exc is not None:
            self._down_until = time.monotonic() + self.retry_after
            log.warning("rate limit store %r unreachable: %s", self.counters, exc)
        failure = str(exc) if exc is not None else "unreachable (waiting before the next try)"
        if cls.fail == "closed":
            raise RateLimitUnavailable(
                f"The {cls.name} rate limit cannot be checked right now; retry shortly.",
                retry_after=self.retry_after,
            )
        if not self._degraded:
            self._degraded = True
            self._warn_open(cls, failure)
        assert self.fallback is not None  # only a shared store fails
        return op(self.fallback)

    def _warn_open(self, cls: RateClass, failure: str) -> None:
        """One audited warning per outage: limits are now counted per process only."""
        log.warning(
            "rate class %s fails open: counting in this process only until %r is back",
            cls.name, self.counters,
        )  # fmt: skip
        entry = AuditEntry(
            at=self._clock(),
            subject="charter",
            subject_kind="system",
            channel="system",
            action="charter.rate_limit",
            decision="allow",
            outcome=FAIL_OPEN,
            detail={
                "rate_class": cls.name,
                "store": repr(self.counters),
                "error": failure[:200],
                "meaning": "limits are counted in each process until the store is back",
            },
        )
        self.denials.append(entry)

    def close(self) -> None:
        """Summarise the denial windows still open, then close the store's connections."""
        self.denials.close()
        self.counters.close()


def window_of(cls: RateClass, now: datetime) -> tuple[datetime, datetime]:
    """The start and end of ``cls``'s window containing ``now``."""
    index = int(now.timestamp() // cls.window)
    start = datetime.fromtimestamp(index * cls.window, UTC)
    return start, start + timedelta(seconds=cls.window)
