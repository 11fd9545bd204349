"""The ``rate_limit`` stage: first in every pipeline of a Charter that enforces rate limits.

It runs before the input is validated (a refused call costs no parsing, no
database), counts the call against the action's rate class per (tenant,
actor), and records what the response's ``RateLimit`` fields say
(``call.rate_limit``, carried by the :class:`~charter.Outcome`). A class with
a concurrency limit also takes an in-flight slot, which the runner gives back
however the call ends (``call.releases``); a slot of a worker that died frees
at its expiry.

On Redis with PostgreSQL the count's round trip (about 100-180 µs on
loopback, the whole of the limit's cost) is **overlapped** with the call's
own work: ``rate_limit`` sends the count and ``rate_limit_reply``, the first
stage of the transaction, reads it, before the transaction's first
statement. The count is taken before anything else either way, and a refusal
still wins over whatever the call met in between (an invalid input, a replay
answered from the cache: the runner settles the reply however the call ends,
:meth:`~charter.pipeline.Call.settle`). What a refused call costs then is its
parsing and a session, never a statement: the database is as protected as
before. Measured: ``benchmarks/ratelimit.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..audit.entry import AuditEntry
from ..context import ActionContext
from ..pipeline.call import Call, Stage, entry_for
from ..resources import request_id_or_new
from .classes import RateClass, default_class_of
from .limiter import RateLimiter, RateState

__all__ = ["denial_entry", "limit_list", "rate_limit", "rate_limit_reply"]

RATE_LIMITED = "rate_limited"


def rate_limit(a: Any) -> Stage | None:
    """The stage for ``a.spec`` (an :class:`~charter.pipeline.Assembly`); None without limits."""
    limiter: RateLimiter | None = getattr(a.runtime, "rate_limiter", None)
    if limiter is None:
        return None
    cls = _class_of(limiter, a.spec)
    concurrent, later = cls.concurrency is not None, _overlapped(a, limiter, cls)

    def rate_limit(call: Call) -> None:
        """Count the call against its rate class per (tenant, actor): 429 over the limit."""
        ctx = call.ctx
        who = limiter.who(ctx.actor.tenant_id, ctx.actor.id)

        def audit(detail: dict[str, object]) -> AuditEntry:
            return denial_entry(call, detail)

        if later:  # sent now, read by rate_limit_reply (module docstring)
            settle = limiter.check_later(cls, who, ctx.now, audit)

            def reply() -> None:
                call.rate_limit = (settle(),)

            call.pending += (reply,)
            return
        state = limiter.check(cls, who, ctx.now, audit)
        if not concurrent:
            call.rate_limit = (state,)
            return
        slot, release = limiter.acquire(cls, who, ctx.now, audit)
        call.releases += (release,)
        call.rate_limit = (state, slot)

    return Stage("rate_limit", rate_limit, "prepare")


def rate_limit_reply(a: Any) -> Stage | None:
    """The stage reading a count :func:`rate_limit` sent without waiting; None if it waited."""
    limiter: RateLimiter | None = getattr(a.runtime, "rate_limiter", None)
    if limiter is None or not _overlapped(a, limiter, _class_of(limiter, a.spec)):
        return None

    def rate_limit_reply(call: Call) -> None:
        """Read the rate limit's count, sent before the input was read: 429 over the limit."""
        call.settle()

    return Stage("rate_limit_reply", rate_limit_reply, "transaction")


def _class_of(limiter: RateLimiter, spec: Any) -> RateClass:
    return limiter.rate_class(getattr(spec, "rate", None) or default_class_of(spec))


def _overlapped(a: Any, limiter: RateLimiter, cls: RateClass) -> bool:
    """Whether the count's round trip overlaps the call's own work (module docstring).

    On a shared store with PostgreSQL, for a class without a concurrency
    limit: nothing reaches PostgreSQL before the transaction's first statement,
    where the reply is read. SQLite's transaction begins by taking the
    database's write lock (``BEGIN IMMEDIATE``), which must not wait on Redis,
    and the in-process store has no round trip to overlap.
    """
    return limiter.counters.shared and bool(a.runtime.postgres) and cls.concurrency is None


def limit_list(limiter: RateLimiter, spec: Any, ctx: ActionContext) -> RateState:
    """Count one page of a list of ``spec``'s records: a read (an export's page: an export)."""
    declared = getattr(spec, "rate", None) or default_class_of(spec)
    cls = limiter.rate_class(declared if declared == "export" else "read")
    call = Call(spec, ctx)

    def audit(detail: dict[str, object]) -> AuditEntry:
        return denial_entry(call, {**detail, "list": True})

    return limiter.check(cls, limiter.who(ctx.actor.tenant_id, ctx.actor.id), ctx.now, audit)


def denial_entry(call: Call, detail: dict[str, object]) -> AuditEntry:
    """The audit entry of a refused call: who, which action, which class (input not yet read).

    The call was refused before validation, so nothing it sent is recorded but
    what identifies it: not its reason or its key, which are not yet checked.
    """
    ctx = call.ctx
    entry = entry_for(call.spec, ctx, None, None, None, RATE_LIMITED, None, detail=detail)
    return dataclasses.replace(
        entry, reason=None, idempotency_key=None, request_id=request_id_or_new(ctx.request_id)
    )
