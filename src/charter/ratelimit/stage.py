"""The ``rate_limit`` stage: first in every pipeline of a Charter that enforces rate limits.

It runs before the input is validated (a refused call costs no parsing, no
database), counts the call against the action's rate class per (tenant,
actor), and records what the response's ``RateLimit`` fields say
(``call.rate_limit``, carried by the :class:`~charter.Outcome`). A class with
a concurrency limit also takes an in-flight slot, which the runner gives back
however the call ends (``call.releases``); a slot of a worker that died frees
at its expiry.

On Redis with PostgreSQL the count's round trip (about 100-180 µs on
loopback, the whole of the limit's cost) is **overlapped** with the
transaction's BEGIN: ``rate_limit`` defers the count, and
``rate_limit_reply``, the first stage of the transaction, sends it, sends
BEGIN (:func:`charter.storage.begin_now`: psycopg would otherwise send it with
the first statement) and reads the count before the first statement. The
count's round trip and Redis' own work then fall in a wait the call has anyway;
sent at the start of the call, Redis' work was scheduled on the caller's core
while it validated the input (``benchmarks/ratelimit.py``: 1-1.3 % of a call).
A refusal still wins over whatever the call met before: a call that does not
reach its transaction (an invalid input, a replay answered from the cache) is
counted when the runner settles it, however it ends
(:meth:`~charter.pipeline.Call.settle`). A refused call costs its parsing, a
session and BEGIN/ROLLBACK, never a statement that reads or writes: and once
this process has seen an actor reach a class's limit in the current window,
that actor's next calls are counted before any of it, so a flood costs the
database nothing (:meth:`~charter.ratelimit.RateLimiter.at_limit`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ..audit.entry import AuditEntry
from ..context import ActionContext
from ..pipeline.call import Call, Stage, entry_for
from ..resources import request_id_or_new
from ..storage import begin_now
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

        if later and not limiter.at_limit(cls, who, ctx.now):  # sent by rate_limit_reply

            def send() -> Callable[[], None]:
                settle = limiter.check_later(cls, who, ctx.now, audit)

                def reply() -> None:
                    call.rate_limit = (settle(),)

                return reply

            call.unsent += (send,)
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
        """Send the rate limit's count, begin the transaction meanwhile, read the count:
        429 over the limit, before the first statement."""
        if call.unsent:
            call.send()
            assert call.connection is not None  # the transaction's, set by the runner
            begin_now(call.connection)
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
