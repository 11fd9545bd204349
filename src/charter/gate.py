"""The gate: one pipeline that every state-changing action passes through.

``Charter.execute`` runs, for a mutating action, inside one transaction:

1. validate the input (unknown fields are an error) and the reason;
2. load the target with a row lock (``SELECT ... FOR UPDATE`` on PostgreSQL),
   restricted to the actor's tenant: another tenant's record is *not found*;
3. check ``If-Match`` (the version column), if the caller sent one;
4. decide the policy on the record as it is now;
5. run the handler;
6. bump the version, append the audit entry;
7. commit: effect and audit entry land together or not at all.

A denial (or a not-found) rolls the transaction back and is audited in its
own short transaction. A handler crash leaves no effect and no entry; a
:class:`~charter.errors.DomainError` from a handler is an outcome: its effect
is rolled back and the refusal is audited.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from pydantic import BaseModel
from pydantic_core import to_jsonable_python
from sqlalchemy import Select, bindparam, event, insert, select, update
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import Engine, Row
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.attributes import set_committed_value

from .actions import ActionSpec, Handler
from .actor import Actor, Channel
from .audit import AuditEntry, AuditKeyring, AuditLease, AuditTrail, audit_table
from .claims import Claims, _AlreadyClaimed, _Resumable
from .context import ActionContext
from .decision import Decision, DecisionKind
from .errors import (
    CharterError,
    ConfigurationError,
    DomainError,
    Forbidden,
    NotFound,
    PreconditionFailed,
    ReasonRequired,
    StorageError,
)
from .idempotency import (
    DEFAULT_RETENTION,
    IdempotencyKeyInProgress,
    IdempotencyKeyMissing,
    IdempotencyMode,
    OutcomeCache,
    completion_params,
    completion_statement,
    fingerprint,
    release_statement,
    stored_error,
    validate_key,
)
from .outcome import Outcome
from .recovery import DEFAULT_LEASE, StepRunner
from .registry import Registry
from .resources import ResourceSpec, coerce_id, request_id_or_new
from .storage import WRITE_OPTION, is_postgres, make_engine, translate_errors

__all__ = ["Charter", "HandlerFailed", "Outcome"]

log = logging.getLogger("charter")

F = TypeVar("F", bound=Handler)

#: Used only when ``development=True``; never outside development.
DEVELOPMENT_AUDIT_KEY = "charter-development-audit-key-not-secret"

_ACTOR = "charter.actor"
_WROTE = "charter.wrote"
_CLAIM_ATTEMPTS = 3
_CREATED = "charter.created"

MAX_REASON = 1000
MAX_REQUEST_ID = 128


class HandlerFailed(CharterError):
    """A handler crashed; its effect was rolled back. Details are in the server log only."""

    code = "internal_error"
    status = 500
    title = "Internal error"


def _utcnow() -> datetime:
    return datetime.now(UTC)


class _Refusal(Exception):
    """Internal: unwinds the transaction so that a refusal is audited on its own."""

    def __init__(self, error: CharterError, decision: Decision | None, record: Any) -> None:
        self.error = error
        self.decision = decision
        self.record = record


class Charter(Registry, Claims):
    """The registry of resources and actions, and the gate that runs them.

    Configuration is keyword-only: ``database_url`` *or* ``engine``; ``clock``
    (a callable returning an aware UTC datetime); ``audit_keys`` (an ordered
    mapping of key id to secret, newest first; required unless
    ``development=True``).
    """

    def __init__(
        self,
        *,
        database_url: str | None = None,
        engine: Engine | None = None,
        clock: Callable[[], datetime] = _utcnow,
        audit_keys: Mapping[str, str | bytes] | None = None,
        development: bool = False,
        audit_trail: AuditTrail | None = None,
        idempotency_retention: timedelta = DEFAULT_RETENTION,
        recovery_lease: timedelta = DEFAULT_LEASE,
        lock_timeout: timedelta = timedelta(seconds=10),
    ) -> None:
        if (database_url is None) == (engine is None):
            raise ConfigurationError("give Charter exactly one of database_url= or engine=")
        self.engine: Engine = (
            engine
            if engine is not None
            else make_engine(
                str(database_url), lock_timeout_ms=int(lock_timeout.total_seconds() * 1000)
            )
        )
        self.clock = clock
        self.development = development
        if audit_keys is None:
            if not development:
                raise ConfigurationError(
                    "audit_keys= is required outside development: the audit trail's MAC key "
                    "must be a secret kept outside the database (e.g. CHARTER_AUDIT_KEY)"
                )
            audit_keys = {"dev": DEVELOPMENT_AUDIT_KEY}
        elif not development and any(
            (v.decode() if isinstance(v, bytes) else v) == DEVELOPMENT_AUDIT_KEY
            for v in audit_keys.values()
        ):
            raise ConfigurationError("the development audit key cannot be used outside development")
        self.keyring = AuditKeyring(audit_keys)
        self.audit_trail = audit_trail or AuditTrail(self.keyring)
        self._write_engine = self.engine.execution_options(**{WRITE_OPTION: True})
        self._sessions = sessionmaker(self._write_engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(self.engine, expire_on_commit=False)
        super().__init__()
        self.idempotency_retention = idempotency_retention
        self.recovery_lease = recovery_lease
        self._load_statements: dict[tuple[str, bool], Select[Any]] = {}
        self._claim_load_statements: dict[str, Select[Any]] = {}
        self._fold_statements: dict[tuple[str, tuple[str, ...], bool], Any] = {}
        self._outcomes = OutcomeCache()
        self._autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self._lock_rows = is_postgres(self.engine)
        event.listen(self._sessions, "before_flush", self._guard_tenants)
        event.listen(self._sessions, "after_flush", _mark_written)
        event.listen(self._sessions, "do_orm_execute", _mark_dml)

    # -- sessions ------------------------------------------------------------------

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A read session for application queries outside the gate (errors translated)."""
        with translate_errors(), self._read_sessions() as session:
            yield session

    # -- the gate ------------------------------------------------------------------

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
    ) -> Outcome:
        """Run ``action`` as ``actor`` through the whole pipeline; see the module docstring.

        ``key`` is the idempotency key (the ``Idempotency-Key`` header over HTTP).
        """
        spec = self.spec(action)
        channel = Channel(channel)
        key = self._check_key(spec, key)
        data = spec.validate(input)
        reason = self._check_reason(spec, actor, reason)
        request_id = request_id_or_new(request_id)
        if spec.target not in (None, "argument"):
            target = getattr(data, spec.target)
        if spec.target is not None and target is None:
            raise NotFound(f"{spec.name} needs a target record id")
        ctx = ActionContext(
            action=spec.name,
            actor=actor,
            channel=channel,
            now=self.clock(),
            request_id=request_id,
            reason=reason,
            input=data,
            idempotency_key=key,
        )
        fp = fingerprint(spec.name, target, data) if key is not None else None
        if key is not None:
            assert fp is not None
            stored = self._outcomes.get(ctx.idempotency_scope, ctx.now)
            if stored is not None:  # a replay that needs no lookup (see OutcomeCache)
                return self._replay_stored(
                    spec, ctx, data, target, fp, stored, stored.fingerprint, stored.action
                )
        resume: Row[Any] | None = None
        for _attempt in range(_CLAIM_ATTEMPTS):
            try:
                return self._run(spec, ctx, data, target, expected_version, fp, resume)
            except _Refusal as refusal:
                self._audit_refusal(spec, ctx, data, target, refusal, fp)
                raise refusal.error from None
            except _AlreadyClaimed:
                assert fp is not None
                try:
                    outcome = self._replay(spec, ctx, data, target, fp)
                except _Resumable as resumable:
                    resume = resumable.row  # this call took the abandoned request over
                    continue
                if outcome is not None:
                    return outcome
                # The holder rolled back between our claim and our lookup: claim again.
        raise IdempotencyKeyInProgress(
            "Another request with this Idempotency-Key keeps starting; retry shortly."
        )

    @staticmethod
    def _check_key(spec: ActionSpec, key: str | None) -> str | None:
        key = validate_key(key)
        if spec.idempotency is IdempotencyMode.NONE:
            return None
        if key is None and spec.idempotency is IdempotencyMode.REQUIRED:
            raise IdempotencyKeyMissing(
                f"{spec.name} requires an idempotency key (the Idempotency-Key header): "
                "generate a unique one per operation and reuse it when you retry"
            )
        return key

    @staticmethod
    def _check_reason(spec: ActionSpec, actor: Actor, reason: str | None) -> str | None:
        if reason is not None:
            reason = reason.strip()
            if len(reason) > MAX_REASON:
                raise ReasonRequired(f"the reason is longer than {MAX_REASON} characters")
            reason = reason or None
        if reason is None and (spec.reason_required or actor.is_impersonating):
            why = "when acting on behalf of someone" if actor.is_impersonating else ""
            raise ReasonRequired(
                f"{spec.name} requires a reason {why}".strip()
                + ": say why you are doing it (it is recorded in the audit trail)"
            )
        return reason

    def _run(
        self,
        spec: ActionSpec,
        ctx: ActionContext,
        data: BaseModel,
        target: Any,
        expected_version: int | None,
        fp: str | None,
        resume: Row[Any] | None = None,
    ) -> Outcome:
        lease = self.audit_trail.lease()
        try:
            with translate_errors(), self._sessions() as session:
                ctx.session = session
                session.info[_ACTOR] = ctx.actor
                session.info[_CREATED] = set()
                # Keyed calls hold their key's claim from here to the COMMIT.
                claimed = fp is not None
                if resume is not None:
                    record = self._load(session, spec, ctx.actor, target) if spec.target else None
                elif fp is not None and spec.target is not None and self._lock_rows:
                    record = self._claim_and_load(session, spec, ctx, target, fp)
                else:
                    if fp is not None:
                        self._claim(session, ctx, fp)
                    record = self._load(session, spec, ctx.actor, target) if spec.target else None
                if spec.target is not None and record is None:
                    raise _Refusal(
                        NotFound(
                            f"{spec.resource.name if spec.resource else 'record'} "
                            f"{target} was not found"
                        ),
                        Decision.deny(DecisionKind.NOT_FOUND, reason="no such record in tenant"),
                        None,
                    )
                resource = spec.resource
                if expected_version is not None and resource and resource.version and record:
                    current = getattr(record, resource.version)
                    if current != expected_version:
                        raise PreconditionFailed(
                            f"the record is at version {current}, not {expected_version}: "
                            "reload it and retry"
                        )
                if resume is not None:
                    # Authorized when the request first ran; it is the same request.
                    decision = Decision.allow("resume", "resumed after a recovery point")
                else:
                    decision = self.decide(spec, ctx.actor, record, ctx)
                if not decision.allowed:
                    raise _Refusal(
                        Forbidden(decision.public_reason, decision=decision), decision, record
                    )
                state_before = resource.state_of(record) if resource else None
                if claimed:
                    # Built on the first ctx.external() only: most keyed actions have no step.
                    ctx.steps = functools.partial(
                        self._step_runner, session, spec, ctx, data, target, record, decision,
                        resume,
                    )  # fmt: skip
                session.info[_WROTE] = False
                try:
                    body = spec.handler(ctx, record, data)
                except DomainError as exc:
                    if not claimed or session.info[_WROTE]:
                        raise _Refusal(exc, decision, record) from exc
                    # Nothing reached the database: drop the handler's pending changes
                    # and store the refusal as this key's outcome, under the same claim.
                    _discard_pending(session)
                    entry = self._entry(
                        spec,
                        ctx,
                        data,
                        record,
                        decision,
                        exc.code,
                        state_before,
                        target=target,
                        detail={"message": exc.message},
                    )
                    self._commit(
                        session,
                        lease,
                        [entry],
                        completion_params(
                            ctx.idempotency_scope,
                            status=exc.status,
                            body=None,
                            error=stored_error(exc),
                            outcome=exc.code,
                            resource_id=entry.resource_id,
                            now=ctx.now,
                        ),
                    )
                    self._remember(
                        ctx,
                        spec,
                        fp,
                        resume,
                        exc.status,
                        None,
                        stored_error(exc),
                        exc.code,
                        entry.resource_id,
                    )
                    raise
                except Forbidden as exc:  # e.g. the tenant guard during the handler's flush
                    raise _Refusal(exc, exc.decision, record) from exc
                except (CharterError, SQLAlchemyError):
                    raise  # database errors are translated by translate_errors() below
                except Exception as exc:
                    log.exception("handler of %s failed; rolled back", spec.name)
                    raise HandlerFailed(
                        "The action failed and nothing was changed.", request_id=ctx.request_id
                    ) from exc
                if spec.creates:
                    try:
                        record = self._adopt_created(session, spec, ctx.actor, body)
                    except Forbidden as exc:
                        raise _Refusal(exc, exc.decision, None) from exc
                version = self._bump_version(spec, record)
                if body is record and record is not None and resource is not None:
                    session.flush()
                    body = resource.render(record)
                body = _jsonable(body)
                entry = self._entry(spec, ctx, data, record, decision, "ok", state_before)
                completion = None
                if claimed:
                    completion = completion_params(
                        ctx.idempotency_scope,
                        status=spec.status,
                        body=body,
                        error=None,
                        outcome="ok",
                        resource_id=entry.resource_id,
                        now=ctx.now,
                    )
                    if resume is not None or isinstance(ctx.steps, StepRunner):
                        # Multi-phase: drop the stored input (it may hold secrets) and lease.
                        session.execute(release_statement(ctx.idempotency_scope))
                self._commit(session, lease, [entry], completion, record, spec)
                if claimed:
                    self._remember(
                        ctx, spec, fp, resume, spec.status, body, None, "ok", entry.resource_id
                    )
        finally:
            lease.rolled_back()
        return Outcome(
            action=spec.name,
            status=spec.status,
            body=body,
            request_id=ctx.request_id,
            resource_id=entry.resource_id,
            version=version,
        )

    def _commit(
        self,
        session: Session,
        lease: AuditLease,
        entries: list[AuditEntry],
        completion: dict[str, Any] | None,
        record: Any = None,
        spec: ActionSpec | None = None,
    ) -> None:
        """The gate's mandatory writes, then COMMIT: effect, audit and outcome land together.

        ``completion`` holds the parameters of the stored outcome (keyed calls).
        ``record``/``spec``: the target, whose UPDATE may carry the writes (see
        :meth:`_fold_into_update`).
        """
        if (
            record is not None
            and spec is not None
            and len(entries) == 1
            and self._fold_into_update(session, lease, spec, record, entries[0], completion)
        ):
            self._finish_commit(session, lease)
            return
        session.flush()
        folded = False
        if completion is not None and self._lock_rows and len(entries) == 1:
            sealed = lease.seal(entries)
            if sealed:
                # PostgreSQL: the audit entry and the stored outcome in one round trip
                # (a data-modifying CTE), so idempotency adds no statement to a call.
                params = {**completion, **{f"a_{k}": v for k, v in sealed[0].items()}}
                session.execute(completion_statement(with_audit=True), params)
                folded = True
        if not folded:
            lease.write(session, entries)
            if completion is not None:
                session.execute(completion_statement(), completion)
        self._finish_commit(session, lease)

    @staticmethod
    def _finish_commit(session: Session, lease: AuditLease) -> None:
        try:
            session.commit()
        except BaseException:
            lease.abandon()  # the COMMIT's fate is unknown: never reuse this stream
            raise
        lease.committed()

    def _fold_into_update(
        self,
        session: Session,
        lease: AuditLease,
        spec: ActionSpec,
        record: Any,
        entry: AuditEntry,
        completion: dict[str, Any] | None,
    ) -> bool:
        """PostgreSQL: write the record's change, its audit entry (and stored outcome) at once.

        ``WITH entry AS (INSERT audit), outcome AS (INSERT ...) UPDATE record SET ...``:
        the gate's mandatory writes ride on the effect's own statement, so an audited
        call costs the round trips of a hand-written one. Only for the plain case: the
        target is the only changed object, nothing was flushed by the handler, and its
        mapper has no version counter, update hooks or onupdate defaults; anything else
        goes through the ORM flush. Returns False when it does not apply.
        """
        resource = spec.resource
        if (
            not self._lock_rows
            or resource is None
            or session.new
            or session.deleted
            or session.info.get(_WROTE)
            or len(session.dirty) != 1
            or record not in session.dirty
        ):
            return False
        state = sa_inspect(record)
        changed = tuple(sorted(state.committed_state))
        statement = self._fold_statements.get((resource.name, changed, completion is not None))
        if statement is None:
            statement = _folded_update(resource, changed, completion is not None)
            if statement is False:
                return False
            self._fold_statements[(resource.name, changed, completion is not None)] = statement
        if statement is False:
            return False
        rows = lease.seal([entry])
        if not rows:  # a trail that writes nothing (charter.testing.NullAuditTrail)
            return False
        params: dict[str, Any] = {f"a_{name}": value for name, value in rows[0].items()}
        params.update({f"r_{key}": getattr(record, key) for key in changed})
        params["r_pk"] = getattr(record, resource.id)
        if completion is not None:
            params.update(completion)
        # On the connection, not the session: a session execute would autoflush the
        # very change this statement carries.
        result = session.connection().execute(statement, params)
        if getattr(result, "rowcount", 1) != 1:
            raise StorageError("The record changed under its lock; nothing was written.")
        for key in changed:  # the row now holds these values: the ORM has nothing to flush
            set_committed_value(record, key, getattr(record, key))
        return True

    def _load(self, session: Session, spec: ActionSpec, actor: Actor, target: Any) -> Any:
        resource = spec.resource
        assert resource is not None  # guaranteed by ActionSpec.declare
        key = coerce_id(resource, target)
        if key is None:
            return None
        lock = self._lock_rows and spec.mutates
        stmt = self._load_statements.get((resource.name, lock))
        if stmt is None:
            # Built once per resource: the lookup is on the hot path of every call.
            stmt = select(resource.model).where(resource.column(resource.id) == bindparam("id"))
            if resource.tenant is not None:
                # Tenant isolation is part of the lookup itself: a record of another
                # tenant is indistinguishable from a record that does not exist.
                stmt = stmt.where(resource.column(resource.tenant) == bindparam("tenant"))
            if lock:
                stmt = stmt.with_for_update()
            self._load_statements[(resource.name, lock)] = stmt
        return session.execute(stmt, {"id": key, "tenant": actor.tenant_id}).scalar_one_or_none()

    def _adopt_created(self, session: Session, spec: ActionSpec, actor: Actor, body: Any) -> Any:
        resource = spec.resource
        assert resource is not None
        session.flush()  # runs the tenant guard, which records every new object
        created = [o for o in session.info[_CREATED] if isinstance(o, resource.model)]
        if len(created) != 1:
            raise HandlerFailed(
                f"{spec.name} must add exactly one {resource.model.__name__} to ctx.session"
            )
        return created[0]

    def _guard_tenants(self, session: Session, _context: Any, _instances: Any) -> None:
        """Before every flush: new records join the actor's tenant; none may leave or enter another.

        This is what makes tenant isolation automatic for writes: a handler
        cannot create a record in another tenant, nor move one, even by mistake.
        """
        actor: Actor | None = session.info.get(_ACTOR)
        if actor is None:
            return
        for obj in session.new:
            resource = self._resources.get(type(obj))
            if resource is None or resource.tenant is None:
                continue
            owner = getattr(obj, resource.tenant)
            if owner is None:
                setattr(obj, resource.tenant, actor.tenant_id)
            elif owner != actor.tenant_id:
                raise _tenant_violation(f"a new {resource.name} record names tenant {owner!r}")
            session.info.setdefault(_CREATED, set()).add(obj)
        for obj in session.dirty:
            resource = self._resources.get(type(obj))
            if resource is None or resource.tenant is None:
                continue
            # committed_state holds the original value of every attribute changed
            # since load: cheaper than building the attribute's history.
            state = sa_inspect(obj)
            if (
                resource.tenant in state.committed_state
                and state.attrs[resource.tenant].history.has_changes()
            ):
                raise _tenant_violation(f"a {resource.name} record cannot change tenant")

    @staticmethod
    def _bump_version(spec: ActionSpec, record: Any) -> int | None:
        """Every change moves the record to a new version (the HTTP ETag)."""
        resource = spec.resource
        if record is None or resource is None or resource.version is None:
            return None
        current = getattr(record, resource.version)
        if spec.creates:
            if current is None:
                setattr(record, resource.version, 1)
            return int(getattr(record, resource.version))
        if spec.mutates:
            current = (current or 0) + 1
            setattr(record, resource.version, current)
        return int(current)

    def _audit_refusal(
        self,
        spec: ActionSpec,
        ctx: ActionContext,
        data: BaseModel,
        target: Any,
        refusal: _Refusal,
        fp: str | None,
    ) -> None:
        decision = refusal.decision
        error = refusal.error
        detail: dict[str, Any] = {"message": error.message}
        if decision is not None and not decision.allowed:
            detail.update(kind=str(decision.kind), explanation=decision.reason)
            if decision.failed:
                detail["failed"] = list(decision.failed)
        state = spec.resource.state_of(refusal.record) if spec.resource else None
        entry = self._entry(
            spec,
            ctx,
            data,
            refusal.record,
            decision,
            error.code,
            state,
            target=target,
            detail=detail,
        )
        entry.state_after = state
        lease = self.audit_trail.lease()
        try:
            with translate_errors(), self._sessions() as session:
                if fp is not None and isinstance(error, DomainError):
                    # The handler ran and wrote before refusing, so its effect was rolled
                    # back with the claim; store the refusal now as the key's outcome. A
                    # duplicate that claimed the key in between keeps its own outcome.
                    self._store_refusal(session, ctx, fp, error, entry.resource_id)
                self._commit(session, lease, [entry], None)
        finally:
            lease.rolled_back()


def _folded_update(resource: ResourceSpec, changed: tuple[str, ...], completion: bool) -> Any:
    """The UPDATE of ``changed`` columns with the audit (and outcome) INSERTs as CTEs.

    ``False`` when the mapper needs the ORM flush: a version counter, update
    hooks, onupdate defaults, a changed tenant (the flush guard must see it) or a
    changed attribute that is not a plain column.
    """
    mapper: Any = sa_inspect(resource.model)
    if (
        not changed
        or mapper.version_id_col is not None
        or mapper.dispatch.before_update
        or mapper.dispatch.after_update
        or resource.tenant in changed
    ):
        return False
    columns = {}
    for key in changed:
        prop = mapper.column_attrs.get(key) if key in mapper.column_attrs else None
        if prop is None or len(prop.columns) != 1:
            return False
        column = prop.columns[0]
        if column.onupdate is not None or column.server_onupdate is not None:
            return False
        columns[column.name] = bindparam(f"r_{key}", type_=column.type)
    table = mapper.local_table
    pk = resource.column(resource.id)
    stmt = update(table).where(pk == bindparam("r_pk")).values(columns)
    audited = [c for c in audit_table.c if c.name != "id"]
    stmt = stmt.add_cte(
        insert(audit_table)
        .values({c.name: bindparam(f"a_{c.name}", type_=c.type) for c in audited})
        .cte("charter_entry")
    )
    if completion:
        stmt = stmt.add_cte(completion_statement(beside_audit=True).cte("charter_outcome"))
    return stmt


def _mark_written(session: Session, _context: Any) -> None:
    session.info[_WROTE] = True


def _mark_dml(state: Any) -> None:
    if state.is_insert or state.is_update or state.is_delete:
        state.session.info[_WROTE] = True


def _discard_pending(session: Session) -> None:
    """Forget changes that were never flushed (used when nothing reached the database)."""
    for obj in list(session.new):
        session.expunge(obj)
    session.expire_all()


def _tenant_violation(reason: str) -> Forbidden:
    return Forbidden(
        "You cannot create or move records across tenants.",
        decision=Decision.deny(DecisionKind.DENIED_BY_RULE, rule="tenant", reason=reason),
    )


def _jsonable(body: Any) -> Any:
    if isinstance(body, BaseModel):
        return body.model_dump(mode="json")
    return to_jsonable_python(body)
