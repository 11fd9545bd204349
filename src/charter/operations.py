"""What is built on the gate: filtered lists, the audit trail's operations, recovery.

:class:`Operations` is mixed into :class:`~charter.gate.Charter`; it holds the
calls that read through the policy (lists), operate on the audit trail
(verify, checkpoint, history) and drive multi-phase requests (recovery), so
that :mod:`charter.gate` stays the pipeline itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from sqlalchemy import Select, or_, select
from sqlalchemy.engine import Row
from sqlalchemy.orm import Session, sessionmaker

from .actions import ActionSpec
from .actor import Actor, Channel
from .audit import AuditEntry, AuditKeyring, AuditLease, AuditTrail, digest_input
from .audit_verify import VerificationReport, checkpoint, verify
from .context import ActionContext
from .decision import Decision
from .errors import CharterError, ConfigurationError, InvalidInput
from .idempotency import claim_id_statement, idempotency_table, not_completed, purge
from .outcome import Outcome
from .recovery import StepRunner, actor_from_snapshot, actor_snapshot
from .resources import coerce_id, request_id_or_new
from .storage import translate_errors

if TYPE_CHECKING:
    from .policy import ActionPolicy

__all__ = ["DEFAULT_PAGE", "MAX_PAGE", "Operations"]

DEFAULT_PAGE = 50
MAX_PAGE = 200  # server-enforced page cap: a caller cannot raise it


class Operations:
    """Lists, audit operations and recovery, on top of the gate's pipeline."""

    if TYPE_CHECKING:
        clock: Callable[[], datetime]
        keyring: AuditKeyring
        audit_trail: AuditTrail
        recovery_lease: timedelta
        _sessions: sessionmaker[Session]
        _lock_rows: bool

        def spec(self, action: str) -> ActionSpec: ...
        def policy_of(self, action: str) -> ActionPolicy: ...
        def session(self) -> AbstractContextManager[Session]: ...
        def execute(
            self,
            actor: Actor,
            action: str,
            input: Any = None,
            *,
            target: Any = None,
            key: str | None = None,
            reason: str | None = None,
            channel: Channel | str = Channel.HTTP,
            request_id: str | None = None,
            expected_version: int | None = None,
        ) -> Outcome: ...
        def _commit(
            self, session: Session, lease: AuditLease, entries: list[AuditEntry], completion: Any
        ) -> None: ...

    def _entry(
        self,
        spec: ActionSpec,
        ctx: ActionContext,
        data: BaseModel | None,
        record: Any,
        decision: Decision | None,
        outcome: str,
        state_before: str | None,
        target: Any = None,
        detail: dict[str, Any] | None = None,
    ) -> AuditEntry:
        actor = ctx.actor
        resource = spec.resource
        resource_id = (
            resource.identity(record)
            if record is not None and resource
            else (None if target is None else str(target)[:128])
        )
        return AuditEntry(
            at=ctx.now,
            tenant=actor.tenant_id,
            subject=actor.subject.id,
            subject_kind=str(actor.subject.kind),
            real_actor=actor.id if actor.is_impersonating else None,
            scopes=sorted(actor.scopes),
            channel=str(ctx.channel),
            action=spec.name,
            resource_type=resource.name if resource else None,
            resource_id=resource_id,
            reason=ctx.reason,
            decision="allow" if decision and decision.allowed else "deny",
            rule=decision.rule if decision else None,
            outcome=outcome,
            request_id=ctx.request_id,
            idempotency_key=ctx.idempotency_key,
            state_before=state_before,
            state_after=resource.state_of(record) if resource else None,
            input_digest=digest_input(data),
            detail=detail,
        )

    # -- lists -------------------------------------------------------------------

    def filter(
        self,
        stmt: Select[Any],
        actor: Actor,
        action: str,
        *,
        channel: Channel | str = Channel.HTTP,
    ) -> Select[Any]:
        """Add ``action``'s rules (tenant included) to ``stmt`` as a SQL ``WHERE`` clause.

        The rows returned are exactly those on which :meth:`execute` would allow
        ``action`` now (the property tests in ``charter.policy.agreement`` check it).
        """
        ctx = self._bare_context(actor, action, channel)
        return self.policy_of(action).apply(stmt, actor, ctx)

    def list_records(
        self,
        actor: Actor,
        action: str,
        *,
        limit: int = DEFAULT_PAGE,
        after: Any = None,
        channel: Channel | str = Channel.HTTP,
        request_id: str | None = None,
    ) -> tuple[list[Any], Any]:
        """One page of the records ``actor`` may ``action``, in id order (keyset paging).

        The page size is capped by the server at :data:`MAX_PAGE` whatever the
        caller asks; the read is audited (one entry per page). Returns the rows
        and the cursor of the next page (``None`` on the last page).
        """
        spec = self.spec(action)
        resource = spec.resource
        if resource is None or not spec.listable:
            raise ConfigurationError(f"{action} is not declared listable=True")
        limit = max(1, min(int(limit), MAX_PAGE))
        id_column = resource.column(resource.id)
        stmt = select(resource.model).order_by(id_column).limit(limit + 1)
        if after is not None:
            key = coerce_id(resource, after)
            if key is None:
                raise InvalidInput("the page cursor is invalid")
            stmt = stmt.where(id_column > key)
        ctx = self._bare_context(actor, action, channel, request_id)
        stmt = self.policy_of(action).apply(stmt, actor, ctx)
        lease = self.audit_trail.lease()
        try:
            with translate_errors(), self._sessions() as session:
                rows = list(session.execute(stmt).scalars())
                page, more = rows[:limit], len(rows) > limit
                entry = self._entry(
                    spec,
                    ctx,
                    None,
                    None,
                    Decision.allow("filter"),
                    "ok",
                    None,
                    detail={
                        "listed": len(page),
                        "after": None if after is None else str(after)[:64],
                    },
                )
                self._commit(session, lease, [entry], None)
        finally:
            lease.rolled_back()
        return page, (resource.identity(page[-1]) if more and page else None)

    def _bare_context(
        self,
        actor: Actor,
        action: str,
        channel: Channel | str,
        request_id: str | None = None,
    ) -> ActionContext:
        return ActionContext(
            action=action,
            actor=actor,
            channel=Channel(channel),
            now=self.clock(),
            request_id=request_id_or_new(request_id),
        )

    # -- the audit trail ---------------------------------------------------------------------

    def verify_audit(self) -> VerificationReport:
        """Verify the whole audit trail and its checkpoints (see :mod:`charter.audit_verify`)."""
        with self.session() as session:
            return verify(session, self.keyring)

    def checkpoint_audit(self) -> dict[str, Any]:
        """Sign the current head of every audit stream."""
        with translate_errors(), self._sessions() as session:
            row = checkpoint(session, self.keyring, self.clock())
            session.commit()
            return row

    def purge_idempotency(self) -> int:
        """Remove finished idempotency records whose retention has passed."""
        with translate_errors(), self._sessions() as session:
            removed = purge(session, self.clock())
            session.commit()
            return removed

    def history(self, resource_type: str, resource_id: Any) -> list[dict[str, Any]]:
        """A record's audit history, oldest first."""
        with self.session() as session:
            return AuditTrail.history(session, resource_type, str(resource_id))

    # -- recovery ------------------------------------------------------------------

    def _commit_phase(self, session: Session, statement: Any, entry: AuditEntry | None) -> None:
        """Commit a recovery point (and the local phase before it) in the current session."""
        lease = self.audit_trail.lease()
        try:
            with translate_errors():
                session.execute(statement)
                self._commit(session, lease, [entry] if entry is not None else [], None)
        finally:
            lease.rolled_back()

    def _step_runner(
        self,
        session: Session,
        spec: ActionSpec,
        ctx: ActionContext,
        data: BaseModel,
        target: Any,
        record: Any,
        decision: Decision,
        resume: Row[Any] | None,
    ) -> StepRunner:
        if resume is not None:
            claim_id = int(resume.id)
        else:  # claimed by this transaction, which is the only one that can see it yet
            claim_id = session.execute(claim_id_statement(ctx.idempotency_scope)).scalar_one()
        resource = spec.resource
        state_before = resource.state_of(record) if resource else None

        def relock() -> None:
            if record is not None and self._lock_rows:
                session.refresh(record, with_for_update=True)

        def audit(outcome: str) -> AuditEntry:
            return self._entry(
                spec, ctx, data, record, decision, outcome, state_before, target=target
            )

        request = {
            "actor": actor_snapshot(ctx.actor),
            "target": None if target is None else str(target),
            "channel": str(ctx.channel),
            "reason": ctx.reason,
        }
        return StepRunner(
            self,
            session,
            claim_id=claim_id,
            recovery=None if resume is None else resume.recovery,
            request=request,
            request_input=json.dumps(data.model_dump(mode="json")),
            relock=relock,
            audit=audit,
        )

    def resume_abandoned(self, *, limit: int = 100) -> list[tuple[str, str]]:
        """Drive abandoned multi-phase requests to a final state; returns (key, outcome) pairs."""
        t = idempotency_table
        now = self.clock()
        with self.session() as session:
            rows = session.execute(
                select(t)
                .where(not_completed(), t.c.recovery.is_not(None))
                .where(or_(t.c.locked_until.is_(None), t.c.locked_until <= now))
                .order_by(t.c.id)
                .limit(limit)
            ).all()
        results: list[tuple[str, str]] = []
        for row in rows:
            request = row.recovery["request"]
            try:
                outcome = self.execute(
                    actor_from_snapshot(request["actor"]),
                    row.action,
                    json.loads(row.request_input or "{}"),
                    target=request["target"],
                    key=row.key,
                    channel=request["channel"],
                    reason=request.get("reason"),
                )
                results.append((row.key, "replayed" if outcome.replayed else "completed"))
            except CharterError as exc:
                results.append((row.key, exc.code))
        return results
