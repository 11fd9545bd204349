"""The ``rate_limit`` stage: first in every pipeline of a Charter that enforces rate limits.

It runs before the input is validated (a refused call costs no parsing, no
database), counts the call against the action's rate class per (tenant,
actor), and records what the response's ``RateLimit`` fields say
(``call.rate_limit``, carried by the :class:`~charter.Outcome`). A class with
a concurrency limit also takes an in-flight slot, which the runner gives back
however the call ends (``call.releases``); a slot of a worker that died frees
at its expiry.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..audit.entry import AuditEntry
from ..context import ActionContext
from ..pipeline.call import Call, Stage, entry_for
from ..resources import request_id_or_new
from .classes import default_class_of
from .limiter import RateLimiter, RateState

__all__ = ["denial_entry", "limit_list", "rate_limit"]

RATE_LIMITED = "rate_limited"


def rate_limit(a: Any) -> Stage | None:
    """The stage for ``a.spec`` (an :class:`~charter.pipeline.Assembly`); None without limits."""
    limiter: RateLimiter | None = getattr(a.runtime, "rate_limiter", None)
    if limiter is None:
        return None
    spec = a.spec
    cls = limiter.rate_class(getattr(spec, "rate", None) or default_class_of(spec))
    concurrent = cls.concurrency is not None

    def rate_limit(call: Call) -> None:
        """Count the call against its rate class per (tenant, actor): 429 over the limit."""
        ctx = call.ctx
        who = limiter.who(ctx.actor.tenant_id, ctx.actor.id)

        def audit(detail: dict[str, object]) -> AuditEntry:
            return denial_entry(call, detail)

        state = limiter.check(cls, who, ctx.now, audit)
        if not concurrent:
            call.rate_limit = (state,)
            return
        slot, release = limiter.acquire(cls, who, ctx.now, audit)
        call.releases += (release,)
        call.rate_limit = (state, slot)

    return Stage("rate_limit", rate_limit, "prepare")


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
