"""The gate's side of exactly-once: claiming a key, answering duplicates, storing refusals.

The semantics (scope, fingerprint, what is stored) are in
:mod:`charter.idempotency.keys`, the tables in :mod:`charter.idempotency.store`;
the stages that use these are assembled by :mod:`charter.pipeline.build`:

* on PostgreSQL the claim rides on the locked ``SELECT`` of the target
  (a data-modifying CTE, :class:`charter.pipeline.loading.Loader`) and the
  stored outcome on the audit ``INSERT``, so a
  keyed call costs the same round trips as an unkeyed one;
* a replay that this process has seen is answered from :class:`OutcomeCache`
  with one autocommit audit ``INSERT``. Others read the claim once: on
  PostgreSQL the claiming statement says the key is taken without failing
  (``ON CONFLICT DO NOTHING``), the claim is read in the same transaction,
  which commits having written nothing, so the connection keeps its prepared
  statements (psycopg drops them all on a ROLLBACK); elsewhere the claim's
  unique violation rolls the transaction back and the claim is looked up;
* an abandoned multi-phase request is taken over (see :mod:`.recovery`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from ..decision import Decision
from ..errors import CharterError
from ..outcome import Outcome
from ..policy.visibility import redact_for
from .keys import IdempotencyKeyInProgress, IdempotencyKeyReused, ReplayedError
from .recovery import StepRunner, takeover_statement
from .store import (
    StoredOutcome,
    claim_insert,
    claim_statement,
    claim_values,
    completion_params,
    completion_statement,
    idempotency_table,
    lookup,
    not_completed,
    release_statement,
    stored_error,
)

if TYPE_CHECKING:
    from ..audit.entry import AuditEntry
    from ..pipeline.call import Call
    from ..pipeline.runtime import Runtime
    from ..pipeline.writes import Committer

__all__ = [
    "CLAIM",
    "ClaimTaken",
    "answer_duplicate",
    "claim_params",
    "claiming",
    "remember",
    "replay_stored",
    "store_refusal",
]

LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL: lock_timeout expired
UNIQUE_VIOLATION = "23505"

#: The claim: a plain INSERT on the unique (tenant, subject, key) index.
CLAIM = claim_insert()


class ClaimTaken(Exception):
    """Another request holds (or held) this key: the runner rolls back and answers it.

    ``claim``: the key's claim and outcome when the claiming statement returned
    them (PostgreSQL's claim-and-load); otherwise the runner looks them up.
    ``aborted``: the claim failed with an error, and the transaction with it
    (a plain INSERT's unique violation); otherwise it wrote and locked nothing.
    """

    def __init__(self, claim: Any = None, *, aborted: bool = True) -> None:
        super().__init__()
        self.claim = claim
        self.aborted = aborted


def claim_params(runtime: Runtime, call: Call) -> dict[str, Any]:
    """The claim INSERT's parameters (``c_<column>``)."""
    ctx = call.ctx
    return {
        "c_tenant": ctx.actor.tenant_id,
        "c_subject": ctx.actor.subject.id,
        "c_key": ctx.idempotency_key,
        "c_fingerprint": call.fingerprint,
        "c_action": ctx.action,
        "c_created_at": ctx.now,
        "c_expires_at": ctx.now + runtime.idempotency_retention,
    }


@contextmanager
def claiming() -> Iterator[None]:
    """Around a claim: a taken key is :class:`ClaimTaken`; a wait past ``lock_timeout`` is 409."""
    try:
        yield
    except IntegrityError as exc:
        orig = exc.orig
        if (
            getattr(orig, "sqlstate", None) == UNIQUE_VIOLATION
            or getattr(orig, "sqlite_errorname", None) == "SQLITE_CONSTRAINT_UNIQUE"
        ):
            raise ClaimTaken from exc
        raise
    except OperationalError as exc:
        if getattr(exc.orig, "sqlstate", None) == LOCK_NOT_AVAILABLE:
            raise IdempotencyKeyInProgress(
                "A request with this Idempotency-Key is still running; retry shortly.",
                retry_after=1,
            ) from exc
        raise


def answer_duplicate(
    runtime: Runtime,
    committer: Committer,
    call: Call,
    claim: Any = None,
    write: Callable[[AuditEntry], None] | None = None,
    *,
    batch: bool = False,
) -> Outcome | None:
    """Answer a call whose key was taken: a replay, a 409 or 422, or ``None`` to run again.

    ``claim``: the key's claim and outcome if already read (:class:`ClaimTaken`).
    ``None`` when the holder rolled back (claim again) or when this call has
    just taken an abandoned multi-phase request over (``call.resume`` is set).
    ``write``: where the answer's audit entry goes (the caller's transaction);
    by default, written on its own (:meth:`Committer.alone`). ``batch``: the key is a
    batch's (see :func:`replay_stored`).
    """
    row = claim if claim is not None else _claim_of_call(runtime, call)
    if row is None:
        return None
    done = row.completed_at is not None
    if not done and row.fingerprint == call.fingerprint:
        if row.recovery is not None and _take_over(runtime, int(row.id), int(row.phase)):
            call.resume = row
            return None
        raise IdempotencyKeyInProgress(
            "A request with this Idempotency-Key is still in progress; retry shortly."
        )
    stored = StoredOutcome.from_row(row) if done else None
    if stored is not None:
        runtime.outcomes.put(call.ctx.idempotency_scope, stored)
    return replay_stored(committer, call, stored, row.fingerprint, row.action, write, batch=batch)


def _claim_of_call(runtime: Runtime, call: Call) -> Any:
    """The key's claim and outcome; on PostgreSQL one autocommit SELECT (no BEGIN/ROLLBACK)."""
    tenant, subject, key = call.ctx.idempotency_scope
    with runtime.reading() as connection:
        return lookup(connection, tenant, subject, key)


def _take_over(runtime: Runtime, claim_id: int, phase: int) -> bool:
    """Take an abandoned multi-phase request over: one conditional UPDATE, one winner."""
    with runtime.write_session() as session:
        taken = session.execute(
            takeover_statement(claim_id, phase, runtime.clock(), runtime.recovery_lease)
        )
        session.commit()
    return getattr(taken, "rowcount", 0) == 1


def replay_stored(
    committer: Committer,
    call: Call,
    stored: StoredOutcome | None,
    stored_fingerprint: str,
    stored_action: str,
    write: Callable[[AuditEntry], None] | None = None,
    *,
    batch: bool = False,
) -> Outcome:
    """Replay a stored outcome (audited as a replay), or refuse another request's key (422).

    ``write``: where the audit entry goes (by default, on its own: :meth:`Committer.alone`).

    The body is stored as the *original* caller could see it; it is answered as
    the caller asking now may see it: the fields hidden from this actor (field
    visibility, :func:`charter.policy.visibility.redact_for`, evaluated for the
    current actor and context, as the ``visibility`` stage does for a fresh
    outcome) are left out, so an actor who has lost a field's condition since
    cannot read it back through a retry. Redaction only removes members; it
    reads nothing from the database. ``batch``: the body is a stored batch
    result (:class:`~charter.data.batch.BatchOutcome` JSON), answered as stored:
    its items' bodies are redacted by the bulk driver (:mod:`charter.data.bulk`).
    """
    write = write or committer.alone
    if stored_fingerprint != call.fingerprint or stored is None:
        refusal = IdempotencyKeyReused(
            "This Idempotency-Key was already used for a different request "
            f"({stored_action}); use a new key for a new request."
        )
        write(call.entry(refusal.code))
        raise refusal
    entry = call.entry(stored.outcome, decision=Decision.allow("replay"))
    entry.resource_id = stored.resource_id
    entry.replayed = True
    write(entry)
    if stored.error:
        raise ReplayedError(dict(stored.error))
    body = (
        stored.body
        if batch
        else redact_for(call.spec.resource, call.ctx.actor, stored.body, call.ctx)
    )
    return Outcome(
        action=call.spec.name,
        status=stored.status,
        body=body,
        request_id=call.ctx.request_id,
        resource_id=stored.resource_id,
        version=stored.version,
        balance=stored.balance,
        replayed=True,
    )


def remember(
    runtime: Runtime,
    call: Call,
    *,
    status: int,
    body: Any,
    error: dict[str, Any] | None,
    outcome: str,
    resource_id: str | None,
    version: int | None = None,
    balance: int | None = None,
) -> None:
    """Keep a just-committed outcome for replays (it expires with its record)."""
    if call.fingerprint is None:
        return
    created = call.ctx.now if call.resume is None else _aware(call.resume.created_at)
    runtime.outcomes.put(
        call.ctx.idempotency_scope,
        StoredOutcome(
            call.fingerprint, call.spec.name, status, body, error, outcome, resource_id,
            created + runtime.idempotency_retention, version, balance,
        ),
    )  # fmt: skip


def outcome_of(call: Call, error: CharterError | None, resource_id: str | None) -> dict[str, Any]:
    """The stored outcome's parameters for a call that succeeded (``error=None``) or refused."""
    return completion_params(
        call.ctx.idempotency_scope,
        status=call.spec.status if error is None else error.status,
        body=call.body if error is None else None,
        error=None if error is None else stored_error(error),
        outcome="ok" if error is None else error.code,
        resource_id=resource_id,
        now=call.ctx.now,
        version=call.version if error is None else None,
        balance=call.writes.balance if error is None else None,
    )


def store_refusal(
    runtime: Runtime, session: Session, call: Call, error: CharterError, resource_id: str | None
) -> None:
    """Store a handler's refusal as the key's outcome, after its effect was rolled back.

    The claim rolled back with the effect, so it is taken again here; a
    duplicate that claimed the key in between keeps its own outcome. A
    multi-phase request's claim did not roll back (a recovery point committed
    it): the outcome is stored under it, and its input and lease are released,
    unless another worker has taken the request over since.
    """
    ctx = call.ctx
    assert ctx.idempotency_key is not None  # keyed calls only
    assert call.fingerprint is not None
    values = claim_values(
        tenant=ctx.actor.tenant_id, subject=ctx.actor.subject.id, key=ctx.idempotency_key,
        fp=call.fingerprint, action=ctx.action, now=ctx.now,
        retention=runtime.idempotency_retention,
    )  # fmt: skip
    claimed = session.execute(claim_statement(runtime.engine.dialect.name, values))
    if claimed.scalar_one_or_none() is None and not _still_holds(session, call):
        return
    session.execute(completion_statement(), outcome_of(call, error, resource_id))


def _still_holds(session: Session, call: Call) -> bool:
    """Release the claim of a multi-phase call that still holds it; whether it did."""
    steps, resume = call.ctx.steps, call.resume
    if isinstance(steps, StepRunner):
        phase = steps.phase  # the phase this worker last saved or took
    elif resume is not None:
        phase = int(resume.phase) + 1  # taken over (takeover_statement), nothing saved since
    else:
        return False  # no recovery point: the claim is another request's
    t = idempotency_table
    held = release_statement(call.ctx.idempotency_scope).where(
        t.c.fingerprint == call.fingerprint, t.c.phase == phase, not_completed()
    )
    return getattr(session.execute(held), "rowcount", 0) == 1


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
