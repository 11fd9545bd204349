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
one retry can win it, and the takeover moves the request to its next phase),
re-runs the handler, and every ``ctx.external`` step
already completed returns its stored result instead of running again; a step
that was started but not recorded is called again with the *same* derived key,
so the outside service answers with the original result. The handler's local
code before a step may run again on resume and must be idempotent with respect
to the record (typically: set a state, which is the same on every run).
``charter idempotency resume`` (and :meth:`Charter.resume_abandoned`) drives
abandoned requests to a final state without waiting for a client retry.

A worker that was only slow, not dead, may find its request taken over: each
recovery point is saved only if the claim is still at the phase this worker
last saw, and not completed; otherwise the worker commits nothing more and
answers 409 ``idempotency_key_in_progress`` (the taker finishes the request).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, TypeVar

from pydantic import BaseModel, Secret, SecretBytes, SecretStr
from pydantic_core import to_jsonable_python
from sqlalchemy import or_, update

from ..actor import Actor
from ..errors import ConfigurationError
from .keys import IdempotencyKeyInProgress
from .store import idempotency_table, not_completed

__all__ = [
    "StepRunner",
    "actor_from_snapshot",
    "actor_snapshot",
    "exact_input",
    "takeover_statement",
]

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


def exact_input(data: BaseModel) -> dict[str, Any]:
    """The validated input as JSON that validates back to the same values, for a resume.

    Not ``model_dump(mode="json")``, which drops the fields declared
    ``exclude=True``, masks secrets (``"**********"``) and applies serializers:
    the resumed handler would get other input, and its fingerprint would differ.
    Stored with the recovery point until the request finishes.
    """
    out = {name: _plain(getattr(data, name)) for name in type(data).model_fields}
    out.update({str(k): _plain(v) for k, v in (data.model_extra or {}).items()})
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return exact_input(value)
    if isinstance(value, SecretStr | SecretBytes | Secret):
        return _plain(value.get_secret_value())
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    return to_jsonable_python(value)


def takeover_statement(claim_id: int, phase: int, now: datetime, lease: timedelta) -> Any:
    """Take an abandoned request over: succeeds for exactly one of several concurrent retries.

    Only at ``phase``, the one the taker read, and it moves the claim to the
    next phase: the worker it was taken from can no longer save (:class:`StepRunner`).
    """
    t = idempotency_table
    return (
        update(t)
        .where(t.c.id == claim_id, t.c.phase == phase, t.c.recovery.is_not(None), not_completed())
        .where(or_(t.c.locked_until.is_(None), t.c.locked_until <= now))
        .values(locked_until=now + lease, phase=phase + 1)
    )


class StepRunner:
    """Runs a handler's outside steps between recovery points (see the module docstring)."""

    def __init__(
        self,
        *,
        clock: Callable[[], datetime],
        lease: timedelta,
        commit_phase: Callable[[Any, Any], bool],
        claim_id: int,
        phase: int,
        recovery: dict[str, Any] | None,
        request: dict[str, Any],
        request_input: str,
        relock: Callable[[], None],
        audit: Callable[[str], Any],
    ) -> None:
        self.clock = clock
        self.lease = lease
        # (statement, audit entry or None): commits a phase; False: the statement changed no
        # row (the request was taken over), and nothing was committed.
        self.commit_phase = commit_phase
        self.claim_id = claim_id
        self.phase = phase  # the claim's phase as this worker last saved or took it
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
        """Commit a recovery point, while this worker still holds the request; else 409."""
        t = idempotency_table
        values: dict[str, Any] = {
            "recovery": json.loads(json.dumps(self.recovery, default=str)),
            "request_input": self.request_input,
            "locked_until": locked_until,
            "phase": self.phase + 1,
        }
        held = update(t).where(t.c.id == self.claim_id, t.c.phase == self.phase, not_completed())
        if not self.commit_phase(held.values(**values), entry):
            # Its lease ran out and another worker took the request over (and may have
            # finished it): writing now would put the input (it may hold secrets) and
            # a lease back on that worker's claim.
            raise IdempotencyKeyInProgress(
                "This request was taken over by another worker after its lease ran out; "
                "retry with the same key for its outcome."
            )
        self.phase += 1
