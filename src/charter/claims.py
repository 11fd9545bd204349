"""The gate's side of exactly-once: claiming keys, replaying outcomes, storing refusals.

The semantics (scope, fingerprint, what is stored) are in :mod:`charter.idempotency`;
this module holds the statements the gate runs for them, mixed into
:class:`~charter.gate.Charter`:

* on PostgreSQL the claim rides on the locked ``SELECT`` of the target and the
  stored outcome on the audit ``INSERT`` (data-modifying CTEs), so a keyed call
  costs the same round trips as an unkeyed one;
* a replay that this process has seen is answered from :class:`OutcomeCache`
  with one autocommit audit ``INSERT``; others read the record once;
* an abandoned multi-phase request is taken over (see :mod:`charter.recovery`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from sqlalchemy import Select, bindparam, select
from sqlalchemy.engine import Engine, Row
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from .actions import ActionSpec
from .actor import Actor
from .audit import ENTRY_INSERT, AuditEntry
from .context import ActionContext
from .decision import Decision
from .errors import CharterError
from .idempotency import (
    IdempotencyKeyInProgress,
    IdempotencyKeyReused,
    OutcomeCache,
    ReplayedError,
    StoredOutcome,
    claim_insert,
    claim_statement,
    claim_values,
    completion_params,
    completion_statement,
    lookup,
    stored_error,
)
from .operations import Operations
from .outcome import Outcome
from .recovery import takeover_statement
from .resources import ResourceSpec, coerce_id
from .storage import translate_errors

__all__ = ["Claims"]

LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL: lock_timeout expired
UNIQUE_VIOLATION = "23505"


class _Resumable(Exception):
    """Internal: this call took over an abandoned multi-phase request and resumes it."""

    def __init__(self, row: Row[Any]) -> None:
        self.row = row


class _AlreadyClaimed(Exception):
    """Internal: another request holds (or held) this idempotency key."""


class Claims(Operations):
    """Idempotency in the gate (mixed into :class:`~charter.gate.Charter`)."""

    if TYPE_CHECKING:
        engine: Engine
        idempotency_retention: timedelta
        _outcomes: OutcomeCache
        _autocommit: Engine
        _claim_load_statements: dict[str, Select[Any]]

        def _load(self, session: Session, spec: ActionSpec, actor: Actor, target: Any) -> Any: ...

    def _remember(
        self,
        ctx: ActionContext,
        spec: ActionSpec,
        fp: str | None,
        resume: Row[Any] | None,
        status: int,
        body: Any,
        error: dict[str, Any] | None,
        outcome: str,
        resource_id: str | None,
    ) -> None:
        """Keep a just-committed outcome for replays (it expires with its record)."""
        if fp is None or ctx.idempotency_key is None:
            return
        created = ctx.now if resume is None else _aware(resume.created_at)
        self._outcomes.put(
            ctx.idempotency_scope,
            StoredOutcome(
                fp,
                spec.name,
                status,
                body,
                error,
                outcome,
                resource_id,
                created + self.idempotency_retention,
            ),
        )

    def _claim_and_load(
        self, session: Session, spec: ActionSpec, ctx: ActionContext, target: Any, fp: str
    ) -> Any:
        """PostgreSQL: claim the key and lock the target in one statement (one round trip).

        ``WITH claim AS (INSERT ...) SELECT record ... FOR UPDATE OF record``:
        the statement succeeds only if the INSERT did, so success *is* the
        claim, and a taken key is a unique violation (:class:`_AlreadyClaimed`).
        When the record is not found the claim's fate does not matter: the
        refusal rolls the transaction back.
        """
        resource = spec.resource
        assert resource is not None
        key = coerce_id(resource, target)
        if key is None:
            return None
        stmt = self._claim_load_statements.get(resource.name)
        if stmt is None:
            stmt = _claim_and_load_statement(resource)
            self._claim_load_statements[resource.name] = stmt
        params = self._claim_params(ctx, fp)
        params["t_id"] = key
        with _claiming():
            return session.execute(stmt, params).scalar_one_or_none()

    def _claim_params(self, ctx: ActionContext, fp: str) -> dict[str, Any]:
        assert ctx.idempotency_key is not None
        now = ctx.now
        return {
            "c_tenant": ctx.actor.tenant_id,
            "c_subject": ctx.actor.subject.id,
            "c_key": ctx.idempotency_key,
            "c_fingerprint": fp,
            "c_action": ctx.action,
            "c_created_at": now,
            "c_expires_at": now + self.idempotency_retention,
        }

    def _claim(self, session: Session, ctx: ActionContext, fp: str) -> None:
        """Claim the idempotency key inside the effect's transaction (see charter.idempotency)."""
        with _claiming():
            session.execute(_CLAIM, self._claim_params(ctx, fp))

    def _replay(
        self,
        spec: ActionSpec,
        ctx: ActionContext,
        data: BaseModel,
        target: Any,
        fp: str,
    ) -> Outcome | None:
        """Answer a duplicate from the stored record (audited as a replay); None if gone."""
        actor = ctx.actor
        assert ctx.idempotency_key is not None
        with translate_errors(), self._sessions() as session:
            row = lookup(session, actor.tenant_id, actor.subject.id, ctx.idempotency_key)
            if row is None:
                return None
            done = row.completed_at is not None
            if not done and row.recovery is not None and row.fingerprint == fp:
                taken = session.execute(
                    takeover_statement(int(row.id), self.clock(), self.recovery_lease)
                )
                session.commit()
                if getattr(taken, "rowcount", 0) == 1:
                    raise _Resumable(row)
            if not done and row.fingerprint == fp:
                raise IdempotencyKeyInProgress(
                    "A request with this Idempotency-Key is still in progress; retry shortly."
                )
        if row.completed_at is not None:
            stored = StoredOutcome.from_row(row)
            self._outcomes.put(ctx.idempotency_scope, stored)
        else:
            stored = None
        return self._replay_stored(spec, ctx, data, target, fp, stored, row.fingerprint, row.action)

    def _replay_stored(
        self,
        spec: ActionSpec,
        ctx: ActionContext,
        data: BaseModel,
        target: Any,
        fp: str,
        stored: StoredOutcome | None,
        stored_fingerprint: str,
        stored_action: str,
    ) -> Outcome:
        """Replay a stored outcome, or refuse a different request under the same key."""
        if stored_fingerprint != fp:
            refusal = IdempotencyKeyReused(
                "This Idempotency-Key was already used for a different request "
                f"({stored_action}); use a new key for a new request."
            )
            self._audit_alone(
                self._entry(spec, ctx, data, None, None, refusal.code, None, target=target)
            )
            raise refusal
        assert stored is not None
        entry = self._entry(
            spec, ctx, data, None, Decision.allow("replay"), stored.outcome, None, target=target
        )
        entry.resource_id = stored.resource_id
        entry.replayed = True
        self._audit_alone(entry)
        if stored.error:
            raise ReplayedError(dict(stored.error))
        return Outcome(
            action=spec.name,
            status=stored.status,
            body=stored.body,
            request_id=ctx.request_id,
            resource_id=stored.resource_id,
            replayed=True,
        )

    def _audit_alone(self, entry: AuditEntry) -> None:
        """Append one entry on its own (PostgreSQL: one autocommit INSERT, one round trip)."""
        if not self._lock_rows:
            with translate_errors():
                self.audit_trail.write_alone(self._sessions, [entry])
            return
        lease = self.audit_trail.lease()
        rows = lease.seal([entry])
        try:
            with translate_errors(), self._autocommit.connect() as conn:
                conn.execute(ENTRY_INSERT, rows[0])
        except BaseException:
            lease.abandon()  # the INSERT's fate may be unknown: never reuse the stream
            raise
        lease.committed()

    def _store_refusal(
        self,
        session: Session,
        ctx: ActionContext,
        fp: str,
        error: CharterError,
        resource_id: str | None,
    ) -> None:
        assert ctx.idempotency_key is not None
        values = claim_values(
            tenant=ctx.actor.tenant_id,
            subject=ctx.actor.subject.id,
            key=ctx.idempotency_key,
            fp=fp,
            action=ctx.action,
            now=ctx.now,
            retention=self.idempotency_retention,
        )
        claimed = session.execute(claim_statement(self.engine.dialect.name, values))
        if claimed.scalar_one_or_none() is None:
            return  # a duplicate claimed the key in between and keeps its own outcome
        session.execute(
            completion_statement(),
            completion_params(
                ctx.idempotency_scope, status=error.status, body=None, error=stored_error(error),
                outcome=error.code, resource_id=resource_id, now=ctx.now,
            ),
        )  # fmt: skip


_CLAIM = claim_insert()


def _claim_and_load_statement(resource: ResourceSpec) -> Select[Any]:
    claim = claim_insert().cte("charter_claim")
    # Parameter names must not match a column of the INSERT (SQLAlchemy would add it).
    stmt = select(resource.model).where(resource.column(resource.id) == bindparam("t_id"))
    if resource.tenant is not None:  # the record's tenant is the claim's: one parameter
        stmt = stmt.where(resource.column(resource.tenant) == bindparam("c_tenant"))
    return stmt.with_for_update(of=resource.model).add_cte(claim)


@contextmanager
def _claiming() -> Iterator[None]:
    """A claim INSERT: a taken key is :class:`_AlreadyClaimed`; waits are bounded (409)."""
    try:
        with _bounded_wait():
            yield
    except IntegrityError as exc:
        if _is_unique_violation(exc):
            raise _AlreadyClaimed from exc  # the caller rolls back and replays
        raise


def _is_unique_violation(exc: IntegrityError) -> bool:
    orig = exc.orig
    if getattr(orig, "sqlstate", None) == UNIQUE_VIOLATION:  # PostgreSQL
        return True
    return getattr(orig, "sqlite_errorname", None) == "SQLITE_CONSTRAINT_UNIQUE"


@contextmanager
def _bounded_wait() -> Iterator[None]:
    """A claim that waited past ``lock_timeout``: another request holds the key (409)."""
    try:
        yield
    except OperationalError as exc:
        if getattr(exc.orig, "sqlstate", None) == LOCK_NOT_AVAILABLE:
            raise IdempotencyKeyInProgress(
                "A request with this Idempotency-Key is still running; retry shortly.",
                retry_after=1,
            ) from exc
        raise


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
