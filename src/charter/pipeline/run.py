"""The heart of the gate: run one call through its pipeline.

Three layers, each one concern (like httpx's ``send`` → ``_send_handling_auth``
→ ``_send_single_request``):

* :func:`run` — the prepare stages, then the transaction, retried when a key's
  claim is taken (answer the duplicate) or the database reports a deadlock or
  serialization failure (bounded; then 409 ``conflict`` with ``Retry-After``),
  and the audit of a refusal in its own transaction;
* :func:`transact` — one transaction: a session bound to the actor's tenant,
  an audit stream leased for it, every transaction stage in order;
* the stages themselves (:mod:`charter.pipeline.stages`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import DBAPIError

from ..audit.entry import AuditEntry
from ..errors import Conflict, DomainError, Forbidden
from ..idempotency.claims import ClaimTaken, answer_duplicate, store_refusal
from ..idempotency.keys import IdempotencyKeyInProgress
from ..outcome import Outcome
from ..storage import translate_errors
from .build import Pipeline
from .call import Call, Refusal
from .tenancy import TenantGuard
from .writes import finish

# Our own generator: the random module's shared one is other code's (tests seed it).
_JITTER = random.Random()  # noqa: S311 - jitter, not a secret

__all__ = ["contention", "refusal_entry", "run"]

CLAIM_ATTEMPTS = 3
#: PostgreSQL SQLSTATEs of a transaction that lost a race and may simply run again.
RETRYABLE = {"40P01": "deadlock", "40001": "serialization failure"}


class _Contention(Exception):
    """The database aborted the transaction to break a deadlock or a serialization conflict."""


def run(pipeline: Pipeline, call: Call) -> Outcome:
    """Run ``call`` through ``pipeline``; what its stages hold (a concurrency slot) is given
    back however it ends, and the outcome carries the rate limit states (the RateLimit fields)."""
    try:
        try:
            outcome = _run(pipeline, call)
        finally:
            call.settle()  # a reply not read yet (a rate limit's): its refusal wins
    finally:
        call.give_back()
    return replace(outcome, rate_limit=call.rate_limit) if call.rate_limit else outcome


def _run(pipeline: Pipeline, call: Call) -> Outcome:
    """The prepare stages, then the transaction, retried: see the module docstring."""
    for stage in pipeline.prepare:
        stage.run(call)
        if call.outcome is not None:  # answered without a transaction (a replay)
            return call.outcome
    claims = conflicts = 0
    while True:
        try:
            return transact(pipeline, call)
        except Refusal as refusal:
            audit_refusal(pipeline, call, refusal)
            raise refusal.error from None
        except ClaimTaken as taken:
            claims += 1
            outcome = answer_duplicate(pipeline.runtime, pipeline.committer, call, taken.claim)
            if outcome is not None:
                return outcome
            if claims >= CLAIM_ATTEMPTS:  # the holder keeps rolling back: let the client retry
                raise IdempotencyKeyInProgress(
                    "Another request with this Idempotency-Key keeps starting; retry shortly."
                ) from None
        except _Contention as exc:
            conflicts += 1
            if conflicts > pipeline.runtime.conflict_retries or call.phases:
                error = Conflict(
                    f"{call.spec.name} kept colliding with concurrent changes ({exc}) "
                    "and was rolled back. Retry shortly."
                )
                error.headers["Retry-After"] = "1"
                raise error from exc
            time.sleep(_JITTER.uniform(0, 0.005 * 2**conflicts))
        call.restart()


def transact(pipeline: Pipeline, call: Call) -> Outcome:
    """One transaction of ``call``: every transaction stage, the last one commits."""
    runtime = pipeline.runtime
    call.lease = lease = runtime.audit_trail.lease()
    try:
        with translate_errors(), _contention(), runtime.sessions() as session:
            TenantGuard.begin(session, call.ctx.actor)
            call.session = call.ctx.session = session
            call.connection = session.connection()  # begins (SQLite: BEGIN IMMEDIATE)
            try:
                for stage in pipeline.transaction:
                    stage.run(call)
            except Forbidden as exc:  # the tenant guard, at a flush after the handler
                raise Refusal(exc, exc.decision, call.record) from exc
            except ClaimTaken as taken:
                if taken.aborted:
                    raise
                if taken.claim is None or taken.claim.completed_at is None:
                    # Claim again, wait, or take over: answered after this transaction, whose
                    # connection the takeover must not wait for. COMMIT, not ROLLBACK:
                    # psycopg drops its prepared statements on ROLLBACK.
                    session.commit()
                    raise
                return _answer_taken(pipeline, call, session, taken)
    finally:
        lease.rolled_back()
    return call.result()


def _answer_taken(pipeline: Pipeline, call: Call, session: Any, taken: ClaimTaken) -> Outcome:
    """Answer a retry of a completed key inside its claim's transaction, which wrote and
    locked nothing: the answer's audit entry (a replay, a 422) is written in it, and
    COMMIT makes both durable. One round trip and one connection fewer than auditing
    the answer on its own (a replay by another worker: ``benchmarks/idempotency.py``).
    """
    assert call.lease is not None  # leased by transact for this transaction
    entries: list[AuditEntry] = []
    try:
        outcome = answer_duplicate(
            pipeline.runtime, pipeline.committer, call, taken.claim, write=entries.append
        )
    finally:  # a replay, or a refusal (422, a replayed error): its entry commits either way
        pipeline.committer.write(session, call.lease, entries, None, call.connection)
        finish(session, call.lease)
    assert outcome is not None  # a completed key is always answered
    return outcome


def audit_refusal(pipeline: Pipeline, call: Call, refusal: Refusal) -> None:
    """Audit a refusal on its own: the call's transaction rolled back, its entry must not."""
    error, entry = refusal.error, refusal_entry(call, refusal)
    if not (call.keyed and isinstance(error, DomainError)):
        pipeline.committer.alone(entry)
        return
    # The handler ran and wrote before refusing, so its effect was rolled back with
    # the claim; store the refusal now as the key's outcome, with its entry.
    with pipeline.committer.transaction() as (session, lease):
        store_refusal(pipeline.runtime, session, call, error, entry.resource_id)
        pipeline.committer.write(session, lease, [entry], None)


def refusal_entry(call: Call, refusal: Refusal) -> AuditEntry:
    """The audit entry of a refused call: the denial's explanation, nothing changed."""
    decision, error, resource = refusal.decision, refusal.error, call.spec.resource
    detail: dict[str, object] = {"message": error.message}
    if decision is not None and not decision.allowed:
        detail.update(kind=str(decision.kind), explanation=decision.reason)
        if decision.failed:
            detail["failed"] = list(decision.failed)
    call.touched = []  # a refused call changed nothing
    record = refusal.record if _readable(refusal.record) else None
    if record is not None or resource is None:  # else: the state decide read, if it got there
        call.state_before = resource.state_of(record) if resource else None
    return call.entry(error.code, decision=decision, record=record, detail=detail)


def _readable(record: Any) -> bool:
    """Whether ``record``'s attributes can still be read: a flush refused by a guard after it
    wrote (a relationship's key copied into the tenant column) expired them, in a session now
    closed; the entry then names the call's target and the state the call read."""
    if record is None:
        return False
    state = sa_inspect(record, raiseerr=False)
    return state is None or not (state.detached and state.expired_attributes)


@contextmanager
def _contention() -> Iterator[None]:
    try:
        yield
    except DBAPIError as exc:
        what = contention(exc)
        if what is None:
            raise
        raise _Contention(what) from exc


def contention(exc: DBAPIError) -> str | None:
    """The race the database broke by aborting (``deadlock``, ...); None: another error."""
    return RETRYABLE.get(str(getattr(exc.orig, "sqlstate", "")))
