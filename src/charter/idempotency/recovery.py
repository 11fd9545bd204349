"""Recovery points: actions whose effect includes a call to an outside service.

A handler that must call a payment provider (or any outside system) cannot do
it inside the database transaction: a crash after the provider charged but
before COMMIT would lose the local record of it, and a retry would charge
again. Instead the handler marks its outside calls with :meth:`ActionContext.external`::

    charge = ctx.external("charge", lambda key: provider.charge(..., idempotency_key=key))

and Charter splits the action into atomic phases:

1. everything the handler did before the call commits **together with a
   recovery point** (the idempotency record, still ``in_progress``, now
   holding the request and the step's name) and its audit entry;
2. the call runs outside any transaction with an idempotency key derived from
   the local record (stable across retries), so the outside service can
   deduplicate it;
3. its result is committed as the next recovery point, the target record is
   locked again, and the handler continues; the final phase commits with the
   outcome, exactly as a one-phase action does.

A retry with the same key, after the request's lease has run out (its worker
died), **resumes**: it takes the lease over with a conditional update (only
one retry can win it), re-runs the handler, and every ``ctx.external`` step
already completed returns its stored result instead of running again; a step
that was started but not recorded is called again with the *same* derived key,
so the outside service answers with the original result. The handler's local
code before a step may run again on resume and must be idempotent with respect
to the record (typically: set a state, which is the same on every run).
``charter idempotency resume`` (and :meth:`Charter.resume_abandoned`) drives
abandoned requests to a final state without waiting for a client retry.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, TypeVar

from pydantic_core import to_jsonable_python
from sqlalchemy import or_, update

from ..actor import Actor
from ..errors import ConfigurationError
from .store import idempotency_table, not_completed

__all__ = ["StepRunner", "actor_from_snapshot", "actor_snapshot", "takeover_statement"]

T = TypeVar("T")

DEFAULT_LEASE = timedelta(seconds=30)


def derived_key(claim_id: int, step: str) -> str:
    """The outside call's idempotency key: stable for this request and step, opaque outside."""
    digest = hashlib.sha256(f"charter:{claim_id}:{step}".encode()).hexdigest()
    return f"charter-{digest[:40]}"


def actor_snapshot(actor: Actor) -> dict[str, Any]:
    """A JSON form of an actor (no credentials: actors hold none) for resuming later."""

    def one(a: Actor) -> dict[str, Any]:
        return {
            "id": a.id,
            "tenant": a.tenant,
            "kind": str(a.kind),
            "roles": sorted(a.roles),
            "scopes": None if a.scopes is None else sorted(a.scopes),
            "attributes": to_jsonable_python(dict(a.attributes)),
        }

    snap = one(actor)
    if actor.on_behalf_of is not None:
        snap["on_behalf_of"] = one(actor.on_behalf_of)
    if actor.session is not None:  # a resumed request is audited under its session too
        snap["session"] = actor.session
    return snap


def actor_from_snapshot(snap: Mapping[str, Any]) -> Actor:
    subject = snap.get("on_behalf_of")
    actor = Actor.make(
        snap["id"],
        snap["tenant"],
        kind=snap["kind"],
        roles=snap["roles"],
        scopes=snap["scopes"],
        attributes=snap.get("attributes") or {},
        on_behalf_of=actor_from_snapshot(subject) if subject else None,
    )
    session = snap.get("session")
    return actor if session is None else replace(actor, session=str(session))


def takeover_statement(claim_id: int, now: datetime, lease: timedelta) -> Any:
    """Take an abandoned request over: succeeds for exactly one of several concurrent retries."""
    t = idempotency_table
    return (
        update(t)
        .where(t.c.id == claim_id, t.c.recovery.is_not(None), not_completed())
        .where(or_(t.c.locked_until.is_(None), t.c.locked_until <= now))
        .values(locked_until=now + lease)
    )


class StepRunner:
    """Runs a handler's outside steps between recovery points (see the module docstring)."""

    def __init__(
        self,
        *,
        clock: Callable[[], datetime],
        lease: timedelta,
        commit_phase: Callable[[Any, Any], None],
        claim_id: int,
        recovery: dict[str, Any] | None,
        request: dict[str, Any],
        request_input: str,
        relock: Callable[[], None],
        audit: Callable[[str], Any],
    ) -> None:
        self.clock = clock
        self.lease = lease
        self.commit_phase = commit_phase  # (statement, audit entry or None): commits a phase
        self.claim_id = claim_id
        self.recovery: dict[str, Any] = dict(recovery or {})
        self.recovery.setdefault("steps", {})
        self.recovery.setdefault("request", request)
        self.request_input = request_input
        self.relock = relock
        self.audit = audit
        self.resumed = recovery is not None

    def external(self, name: str, call: Callable[[str], T]) -> T:
        if not name or len(name) > 64:
            raise ConfigurationError("an external step needs a name of 1-64 characters")
        steps: dict[str, Any] = self.recovery["steps"]
        recorded = steps.get(name)
        if recorded is not None and recorded.get("status") == "done":
            return recorded["result"]  # type: ignore[no-any-return]
        steps[name] = {"status": "started"}
        now = self.clock()
        # Recovery point: the local phase so far, the audit entry and "step started".
        self._save(locked_until=now + self.lease, entry=self.audit(f"step:{name}"))
        try:
            result = call(derived_key(self.claim_id, name))
        except BaseException:
            # Let a retry resume at once rather than wait for the lease to expire.
            self._save(locked_until=None, entry=None)
            raise
        steps[name] = {"status": "done", "result": to_jsonable_python(result)}
        self._save(locked_until=self.clock() + self.lease, entry=None)
        self.relock()
        return result

    def _save(self, *, locked_until: datetime | None, entry: Any) -> None:
        values: dict[str, Any] = {
            "recovery": json.loads(json.dumps(self.recovery, default=str)),
            "request_input": self.request_input,
            "locked_until": locked_until,
            "phase": idempotency_table.c.phase + 1,
        }
        self.commit_phase(
            update(idempotency_table)
            .where(idempotency_table.c.id == self.claim_id)
            .values(**values),
            entry,
        )
