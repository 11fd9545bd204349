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

import logging
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel
from pydantic_core import to_jsonable_python
from sqlalchemy import event, select
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from .actions import ActionSpec, Handler
from .actor import Actor, Channel
from .audit import AuditEntry, AuditKeyring, AuditTrail, digest_input
from .audit_verify import VerificationReport, checkpoint, verify
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
    UnknownAction,
)
from .resources import ResourceSpec
from .storage import WRITE_OPTION, is_postgres, make_engine, translate_errors

__all__ = ["Charter", "HandlerFailed", "Outcome"]

log = logging.getLogger("charter")

F = TypeVar("F", bound=Handler)

#: Used only when ``development=True``; never outside development.
DEVELOPMENT_AUDIT_KEY = "charter-development-audit-key-not-secret"

_ACTOR = "charter.actor"
_CREATED = "charter.created"

MAX_REASON = 1000
MAX_REQUEST_ID = 128


class HandlerFailed(CharterError):
    """A handler crashed; its effect was rolled back. Details are in the server log only."""

    code = "internal_error"
    status = 500
    title = "Internal error"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What an executed action produced."""

    action: str
    status: int
    body: Any
    request_id: str
    resource_id: str | None = None
    version: int | None = None
    replayed: bool = False


def _utcnow() -> datetime:
    return datetime.now(UTC)


class _Refusal(Exception):
    """Internal: unwinds the transaction so that a refusal is audited on its own."""

    def __init__(self, error: CharterError, decision: Decision | None, record: Any) -> None:
        self.error = error
        self.decision = decision
        self.record = record


class Charter:
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
    ) -> None:
        if (database_url is None) == (engine is None):
            raise ConfigurationError("give Charter exactly one of database_url= or engine=")
        self.engine: Engine = engine if engine is not None else make_engine(str(database_url))
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
        self._resources: dict[type[Any], ResourceSpec] = {}
        self._resource_names: dict[str, ResourceSpec] = {}
        self._actions: dict[str, ActionSpec] = {}
        self._lock_rows = is_postgres(self.engine)
        event.listen(self._sessions, "before_flush", self._guard_tenants)

    # -- declarations --------------------------------------------------------------

    def resource(
        self,
        model: type[Any],
        *,
        tenant: str | None,
        state: str | None = None,
        version: str | None = None,
        name: str | None = None,
    ) -> ResourceSpec:
        """Declare a mapped class as a resource; ``tenant=None`` must be explicit."""
        spec = ResourceSpec.declare(model, name=name, tenant=tenant, state=state, version=version)
        if model in self._resources:
            raise ConfigurationError(f"resource {model.__name__} is declared twice")
        if spec.name in self._resource_names:
            raise ConfigurationError(f"two resources are named {spec.name!r}")
        self._resources[model] = spec
        self._resource_names[spec.name] = spec
        return spec

    def action(
        self,
        name: str,
        *,
        on: type[Any] | None = None,
        input: type[BaseModel] | None = None,
        allow: Any = None,
        target: str | None = "argument",
        creates: bool = False,
        reason_required: bool = False,
        sensitive_read: bool = False,
        scope: str | None = None,
        impersonation: bool = True,
        listable: bool = False,
        status: int | None = None,
    ) -> Callable[[F], F]:
        """Declare an action; use as a decorator on its handler.

        The handler is called as ``handler(ctx, record, data)`` where ``record``
        is the locked target (``None`` for creations and record-less actions)
        and ``data`` the validated input model.
        """

        def register(handler: F) -> F:
            self.register(
                name, handler, on=on, input=input, allow=allow,
                target=None if (creates or on is None) else target, creates=creates,
                reason_required=reason_required, sensitive_read=sensitive_read, scope=scope,
                impersonation=impersonation, listable=listable, status=status,
            )
            return handler

        return register

    def register(self, name: str, handler: Handler, *, on: type[Any] | None, **options: Any) -> ActionSpec:
        """Register an action without the decorator (same options as :meth:`action`)."""
        if name in self._actions:
            raise ConfigurationError(f"action {name!r} is declared twice")
        resource = None
        if on is not None:
            resource = self._resources.get(on)
            if resource is None:
                raise ConfigurationError(
                    f"action {name}: {getattr(on, '__name__', on)!r} is not a declared resource; "
                    "call charter.resource(...) first"
                )
        spec = ActionSpec.declare(name, handler, resource=resource, **options)
        self._compile_policy(spec)
        self._actions[name] = spec
        return spec

    def _compile_policy(self, spec: ActionSpec) -> None:
        allow = spec.allow
        if allow is not None and not callable(allow):
            raise ConfigurationError(f"action {spec.name}: allow= must be a rule or a callable")

    @property
    def actions(self) -> Mapping[str, ActionSpec]:
        return dict(self._actions)

    @property
    def resources(self) -> Mapping[str, ResourceSpec]:
        return dict(self._resource_names)

    def spec(self, action: str) -> ActionSpec:
        try:
            return self._actions[action]
        except KeyError:
            raise UnknownAction(f"there is no action named {action!r}") from None

    # -- sessions ------------------------------------------------------------------

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A read session for application queries outside the gate (errors translated)."""
        with translate_errors(), self._read_sessions() as session:
            yield session

    # -- policy --------------------------------------------------------------------

    def decide(self, spec: ActionSpec, actor: Actor, record: Any, ctx: ActionContext) -> Decision:
        """Decide ``spec`` for ``actor`` on ``record``; fails closed on errors."""
        if spec.scope is not None and not actor.has_scope(spec.scope):
            return Decision.deny(
                DecisionKind.DENIED_BY_RULE, rule="scope",
                reason=f"the credential lacks scope {spec.scope!r}",
                public_reason=f"Your credential does not grant the {spec.scope} scope.",
            )
        if actor.is_impersonating and not spec.impersonation:
            return Decision.deny(
                DecisionKind.DENIED_BY_RULE, rule="no-impersonation",
                reason=f"{spec.name} cannot be performed on behalf of someone else",
                public_reason="This action cannot be performed while impersonating a user.",
            )
        if spec.allow is None:
            return Decision.deny(
                DecisionKind.NO_RULE, reason=f"no rule permits {spec.name}",
            )
        try:
            allowed = bool(spec.allow(actor.subject, record, ctx))
        except Exception as exc:
            log.error("policy for %s failed closed: %r", spec.name, exc)
            return Decision.deny(
                DecisionKind.ERROR, reason=f"rule raised {type(exc).__name__}: fails closed"
            )
        rule = getattr(spec.allow, "__name__", "allow")
        if allowed:
            return Decision.allow(rule)
        return Decision.deny(
            DecisionKind.NO_RULE, rule=rule, reason=f"predicate {rule} returned False",
        )

    # -- the gate ------------------------------------------------------------------

    def execute(
        self,
        actor: Actor,
        action: str,
        input: Any = None,
        *,
        target: Any = None,
        reason: str | None = None,
        channel: Channel | str = Channel.HTTP,
        request_id: str | None = None,
        expected_version: int | None = None,
    ) -> Outcome:
        """Run ``action`` as ``actor`` through the whole pipeline; see the module docstring."""
        spec = self.spec(action)
        channel = Channel(channel)
        data = spec.validate(input)
        reason = self._check_reason(spec, actor, reason)
        request_id = _request_id(request_id)
        if spec.target not in (None, "argument"):
            target = getattr(data, spec.target)
        if spec.target is not None and target is None:
            raise NotFound(f"{spec.name} needs a target record id")
        ctx = ActionContext(
            action=spec.name, actor=actor, channel=channel, now=self.clock(),
            request_id=request_id, reason=reason, input=data,
        )
        try:
            return self._run(spec, ctx, data, target, expected_version)
        except _Refusal as refusal:
            self._audit_refusal(spec, ctx, data, target, refusal)
            raise refusal.error from None

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
        self, spec: ActionSpec, ctx: ActionContext, data: BaseModel, target: Any,
        expected_version: int | None,
    ) -> Outcome:
        lease = self.audit_trail.lease()
        try:
            with translate_errors(), self._sessions() as session:
                ctx.session = session
                session.info[_ACTOR] = ctx.actor
                session.info[_CREATED] = set()
                record = self._load(session, spec, ctx.actor, target) if spec.target else None
                if spec.target is not None and record is None:
                    raise _Refusal(
                        NotFound(f"{spec.resource.name if spec.resource else 'record'} "
                                 f"{target} was not found"),
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
                decision = self.decide(spec, ctx.actor, record, ctx)
                if not decision.allowed:
                    raise _Refusal(
                        Forbidden(decision.public_reason, decision=decision), decision, record
                    )
                state_before = resource.state_of(record) if resource else None
                version = self._bump_version(spec, record)
                try:
                    body = spec.handler(ctx, record, data)
                except DomainError as exc:
                    raise _Refusal(exc, decision, record) from exc
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
                if spec.creates:
                    version = self._bump_version(spec, record)
                session.flush()
                entry = self._entry(spec, ctx, data, record, decision, "ok", state_before)
                lease.write(session, [entry])
                resource_id = entry.resource_id
                try:
                    session.commit()
                except BaseException:
                    lease.abandon()
                    raise
            lease.committed()
        finally:
            lease.rolled_back()
        return Outcome(
            action=spec.name, status=spec.status, body=_jsonable(body),
            request_id=ctx.request_id, resource_id=resource_id, version=version,
        )

    def _load(self, session: Session, spec: ActionSpec, actor: Actor, target: Any) -> Any:
        resource = spec.resource
        assert resource is not None  # guaranteed by ActionSpec.declare
        key = _coerce_id(resource, target)
        if key is None:
            return None
        stmt = select(resource.model).where(resource.column(resource.id) == key)
        if resource.tenant is not None:
            # Tenant isolation is part of the lookup itself: a record of another
            # tenant is indistinguishable from a record that does not exist.
            stmt = stmt.where(resource.column(resource.tenant) == actor.tenant_id)
        if self._lock_rows and spec.mutates:
            stmt = stmt.with_for_update()
        return session.execute(stmt).scalar_one_or_none()

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
            history = sa_inspect(obj).attrs[resource.tenant].history
            if history.has_changes():
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

    def _entry(
        self, spec: ActionSpec, ctx: ActionContext, data: BaseModel | None, record: Any,
        decision: Decision | None, outcome: str, state_before: str | None,
        target: Any = None, detail: dict[str, Any] | None = None,
    ) -> AuditEntry:
        actor = ctx.actor
        resource = spec.resource
        resource_id = (
            resource.identity(record) if record is not None and resource
            else (None if target is None else str(target)[:128])
        )
        return AuditEntry(
            at=ctx.now, tenant=actor.tenant_id, subject=actor.subject.id,
            subject_kind=str(actor.subject.kind),
            real_actor=actor.id if actor.is_impersonating else None,
            scopes=sorted(actor.scopes), channel=str(ctx.channel), action=spec.name,
            resource_type=resource.name if resource else None, resource_id=resource_id,
            reason=ctx.reason, decision="allow" if decision and decision.allowed else "deny",
            rule=decision.rule if decision else None, outcome=outcome,
            request_id=ctx.request_id, idempotency_key=ctx.idempotency_key,
            state_before=state_before,
            state_after=resource.state_of(record) if resource else None,
            input_digest=digest_input(data), detail=detail,
        )

    def _audit_refusal(
        self, spec: ActionSpec, ctx: ActionContext, data: BaseModel, target: Any,
        refusal: _Refusal,
    ) -> None:
        decision = refusal.decision
        detail: dict[str, Any] = {"message": refusal.error.message}
        if decision is not None and not decision.allowed:
            detail.update(kind=str(decision.kind), explanation=decision.reason)
            if decision.failed:
                detail["failed"] = list(decision.failed)
        state = spec.resource.state_of(refusal.record) if spec.resource else None
        entry = self._entry(
            spec, ctx, data, refusal.record, decision, refusal.error.code, state,
            target=target, detail=detail,
        )
        entry.state_after = state
        with translate_errors():
            self.audit_trail.write_alone(self._sessions, [entry])

    # -- audit ---------------------------------------------------------------------

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

    def history(self, resource_type: str, resource_id: Any) -> list[dict[str, Any]]:
        """A record's audit history, oldest first."""
        with self.session() as session:
            return AuditTrail.history(session, resource_type, str(resource_id))


def _tenant_violation(reason: str) -> Forbidden:
    return Forbidden(
        "You cannot create or move records across tenants.",
        decision=Decision.deny(DecisionKind.DENIED_BY_RULE, rule="tenant", reason=reason),
    )


def _request_id(value: str | None) -> str:
    if value and len(value) <= MAX_REQUEST_ID and value.isprintable() and value.isascii():
        return value
    return uuid.uuid4().hex


def _coerce_id(resource: ResourceSpec, target: Any) -> Any:
    column = resource.column(resource.id)
    try:
        python_type = column.type.python_type
    except NotImplementedError:
        return target
    if isinstance(target, python_type):
        return target
    try:
        return python_type(target)
    except (TypeError, ValueError):
        return None


def _jsonable(body: Any) -> Any:
    if isinstance(body, BaseModel):
        return body.model_dump(mode="json")
    return to_jsonable_python(body)

