"""The gate's stages: each a small function over one :class:`~charter.pipeline.call.Call`.

Every stage here is built by a *factory* from an action's declaration, once,
when the action is declared (:mod:`charter.pipeline.build`): the factory
returns ``None`` when the action does not need the stage (no key, no target,
no version column), and chooses the dialect's statement up front. So a call
runs exactly the stages its action needs, in the order
:func:`charter.Charter.pipeline_of` lists, and nothing is decided per call
that could be decided at start-up.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from ..actions import ActionSpec, refuse_nul
from ..actor import Actor
from ..credits import stage as credits
from ..decision import Decision, DecisionKind
from ..errors import (
    CharterError,
    ConfigurationError,
    DomainError,
    Forbidden,
    HandlerFailed,
    NotFound,
    PreconditionFailed,
    ReasonRequired,
)
from ..idempotency import claims
from ..idempotency.keys import (
    IdempotencyKeyMissing,
    IdempotencyKeyUnsupported,
    IdempotencyMode,
    fingerprint,
    fingerprint_key,
    item_key,
    validate_key,
)
from ..idempotency.recovery import StepRunner, actor_snapshot, exact_input
from ..idempotency.store import claim_id_statement, release_statement
from ..policy import ActionPolicy
from ..ratelimit import stage as ratelimit
from ..resources import ResourceSpec, request_id_or_new
from ..workflow import stage as workflow
from .call import Call, Refusal, Stage, Touched
from .dml import bulk_touched
from .loading import Loader
from .runtime import Runtime
from .tenancy import TenantGuard
from .writes import Committer, finish

__all__ = ["FACTORIES", "MAX_REASON", "Assembly", "check_reason"]

log = logging.getLogger("charter")

MAX_REASON = 1000


@dataclass(frozen=True, slots=True)
class Assembly:
    """What a stage factory builds from: the declaration and the shared runtime."""

    spec: ActionSpec
    runtime: Runtime
    committer: Committer
    policy: ActionPolicy

    @property
    def keyable(self) -> bool:
        return self.spec.idempotency is not IdempotencyMode.NONE

    @property
    def lock_rows(self) -> bool:
        return self.runtime.postgres and self.spec.mutates

    def locate(self, call: Call) -> tuple[ResourceSpec, Any]:
        """The target's resource and key; key ``None``: no row can have it (ColumnDomain)."""
        resource = self.spec.resource
        assert resource is not None  # a target implies a resource (ActionSpec.declare)
        key = resource.coerce(self.spec.by, call.target)
        if key is None:
            # Not found, and audited as such: record what was asked for in a form the
            # audit columns hold on every dialect (no NUL, bounded).
            call.target = _printable(call.target)
        return resource, key


# -- before the transaction --------------------------------------------------------------


def validate(a: Assembly) -> Stage:
    spec = a.spec

    def validate(call: Call) -> None:
        """Check the key, the input (unknown fields refused), the reason; locate the target."""
        ctx = call.ctx
        ctx.idempotency_key = _check_key(spec, ctx.idempotency_key, derived=_derived(ctx))
        ctx.input = data = spec.validate(call.raw_input)
        ctx.reason = check_reason(spec, ctx.actor, ctx.reason)
        ctx.request_id = request_id_or_new(ctx.request_id)
        if spec.target not in (None, "argument"):
            call.target = getattr(data, str(spec.target))
        if spec.target is not None and call.target is None:
            raise NotFound(f"{spec.name} needs a target record id")

    return Stage("validate", validate, "prepare")


def replay(a: Assembly) -> Stage | None:
    if not a.keyable:
        return None
    outcomes, committer, policy = a.runtime.outcomes, a.committer, a.policy
    key = fingerprint_key(a.runtime.audit_trail.keyring)

    def replay(call: Call) -> None:
        """Fingerprint a keyed call its credential may make; answer a key seen complete."""
        ctx = call.ctx
        if ctx.idempotency_key is None:
            return
        if policy.credential_denial(ctx.actor) is not None:
            # A credential without the action's scope, or an impersonation no grant
            # covers, may not have a key's stored outcome (nor take its abandoned
            # request over): the call goes on unkeyed, and the policy's gates, the
            # same ones, refuse it as they refuse a new call (404 or 403, audited).
            # Only the credential is checked before a replay, not the record's rules:
            # the original call changed the record (a replay of "approve" finds it
            # approved), and a retry must keep getting its answer.
            return
        call.fingerprint = fingerprint(call.spec.name, call.target, call.data, key=key)
        stored = outcomes.get(ctx.idempotency_scope, ctx.now)
        if stored is not None:
            call.outcome = claims.replay_stored(
                committer, call, stored, stored.fingerprint, stored.action
            )

    return Stage("replay", replay, "prepare")


def _derived(ctx: Any) -> bool:
    """Whether the call's key is the one a per-item batch derived for it (``<key>#<i>``)."""
    batch = ctx.extra.get("batch")
    return (
        batch is not None
        and "position" in batch
        and ctx.idempotency_key == item_key(str(batch["key"]), int(batch["position"]))
    )


def _check_key(spec: ActionSpec, key: str | None, *, derived: bool = False) -> str | None:
    key = validate_key(key, derived=derived)
    if spec.idempotency is IdempotencyMode.NONE:
        if key is not None:
            # Ignoring it would let the client believe a retry is safe: it is not.
            raise IdempotencyKeyUnsupported(
                f"{spec.name} takes no idempotency key (it is declared idempotency='none'"
                + (", as every sensitive read is" if spec.sensitive_read else "")
                + "): send the request without the Idempotency-Key header"
            )
        return None
    if key is None and spec.idempotency is IdempotencyMode.REQUIRED:
        raise IdempotencyKeyMissing(
            f"{spec.name} requires an idempotency key (the Idempotency-Key header): "
            "generate a unique one per operation and reuse it when you retry"
        )
    return key


def check_reason(spec: ActionSpec, actor: Actor, reason: str | None) -> str | None:
    """The call's reason, stripped; 400 ``reason_required`` when missing, too long or NUL."""
    if reason is not None:
        reason = reason.strip()
        if len(reason) > MAX_REASON:
            raise ReasonRequired(f"the reason is longer than {MAX_REASON} characters")
        refuse_nul({"reason": reason}, what="the request")  # PostgreSQL cannot store NUL
        reason = reason or None
    if reason is None and (spec.reason_required or actor.is_impersonating):
        why = "when acting on behalf of someone" if actor.is_impersonating else ""
        raise ReasonRequired(
            f"{spec.name} requires a reason {why}".strip()
            + ": say why you are doing it (it is recorded in the audit trail)"
        )
    return reason


# -- inside the transaction -------------------------------------------------------------


def claim(a: Assembly) -> Stage | None:
    if not a.keyable or _claims_with_load(a):
        return None
    runtime = a.runtime

    def claim(call: Call) -> None:
        """Claim the idempotency key inside the effect's transaction (a unique INSERT)."""
        if call.keyed and call.resume is None:
            connection = call.connection or _session(call).connection()
            with claims.claiming():
                connection.execute(claims.CLAIM, claims.claim_params(runtime, call))

    return Stage("claim", claim)


def _claims_with_load(a: Assembly) -> bool:
    """PostgreSQL, a keyed target and nothing else to lock: one statement claims and loads."""
    return a.runtime.postgres and a.spec.target is not None and a.spec.locks is None


def load(a: Assembly) -> Stage | None:
    spec = a.spec
    if spec.target is None and spec.locks is None:
        return None
    statements = _Statements(a.lock_rows)
    if a.keyable and _claims_with_load(a):
        return _claim_and_load(a, statements)

    def load(call: Call) -> None:
        """Load the target and the declared records, tenant-scoped, locked in (table, id) order."""
        wanted: list[tuple[ResourceSpec, str | None, Any]] = []
        if spec.target is not None:
            resource, key = a.locate(call)
            wanted.append((resource, spec.by, key))
        declared = [] if spec.locks is None else _declared_locks(a, call)
        wanted.extend((resource, None, key) for resource, key in declared)
        found = statements.load_in_order(call, wanted)
        if spec.target is not None:
            call.record = found[wanted[0]]
            if call.record is None:
                raise _not_found(spec.resource, call.target)
        for resource, key in declared:
            record = found[(resource, None, key)]
            if record is None:
                raise _not_found(resource, key)
            call.locked.append(record)
        call.ctx.locked = tuple(call.locked)

    return Stage("load", load)


def _claim_and_load(a: Assembly, statements: _Statements) -> Stage:
    spec, runtime = a.spec, a.runtime
    resource = spec.resource
    assert resource is not None
    claim_load = Loader(resource, by=spec.by, lock=True, claim=True)

    def claim_and_load(call: Call) -> None:
        """Claim the key and load the target locked, tenant-scoped, in one statement."""
        session = _session(call)
        _, key = a.locate(call)
        if key is None:
            record = None
        elif call.keyed and call.resume is None:
            params = claims.claim_params(runtime, call)
            params["t_id"] = key
            with claims.claiming():
                record, holds, taken = claim_load.claim(session, params, call.connection)
            if not holds:  # a retry: its claim and stored outcome, read in this transaction
                raise claims.ClaimTaken(taken, aborted=False)
        else:
            record = statements.load(call, resource, spec.by, key)
        if record is None:
            raise _not_found(resource, call.target)
        call.record = record

    return Stage("claim_and_load" if a.keyable else "load", claim_and_load)


def _declared_locks(a: Assembly, call: Call) -> list[tuple[ResourceSpec, Any]]:
    assert a.spec.locks is not None
    located = []
    for model, id in a.spec.locks(call.data):
        resource = a.runtime.tenancy.resource_of_model(model)
        if resource is None:
            raise ConfigurationError(
                f"{a.spec.name}: locks= names {getattr(model, '__name__', model)!r}, "
                "which is not a declared resource"
            )
        key = resource.coerce(None, id)
        if key is None:
            raise _not_found(resource, id)
        located.append((resource, key))
    return located


class _Statements:
    """The tenant-scoped lookups of one pipeline, each built once (see :class:`Loader`)."""

    def __init__(self, lock: bool) -> None:
        self.lock = lock
        self._built: dict[tuple[str, str | None], Loader] = {}

    def load(self, call: Call, resource: ResourceSpec, by: str | None, key: Any) -> Any:
        if key is None:
            return None
        return self._loader(resource, by).load(_session(call), self._params(call, key),
                                               call.connection)  # fmt: skip

    def load_in_order(
        self, call: Call, wanted: list[tuple[ResourceSpec, str | None, Any]]
    ) -> dict[tuple[ResourceSpec, str | None, Any], Any]:
        """Each wanted (resource, locator column, value) record, or None, locked in (table,
        primary key) order: two calls locking the same rows lock them in the same order,
        however each located them.

        When several records are locked, one located by another unique column
        (``by=``) is first found unlocked, by its primary key, then locked by it with
        the rest; if the column no longer holds the value once the row is locked (it
        changed meanwhile), the record is not found.
        """
        by_key = self.lock and len(set(wanted)) > 1
        located: dict[tuple[ResourceSpec, str | None, Any], Any] = {}
        for resource, by, key in wanted:
            if by_key and by is not None and key is not None:
                loader = self._loader(resource, by)
                key_of = loader.primary_key(
                    _session(call), self._params(call, key), call.connection
                )
                located[(resource, by, key)] = key_of
            else:
                located[(resource, by, key)] = key

        def lock_of(
            w: tuple[ResourceSpec, str | None, Any],
        ) -> tuple[ResourceSpec, str | None, Any]:
            return (w[0], None if by_key else w[1], located[w])

        order = sorted(
            {lock_of(w) for w in located},
            key=lambda r: (r[0].name, r[1] or "", r[2] is not None, 0 if r[2] is None else r[2]),
        )
        loaded = {r: self.load(call, *r) for r in order}
        found: dict[tuple[ResourceSpec, str | None, Any], Any] = {}
        for w in located:
            record, (_, by, key) = loaded[lock_of(w)], w
            if record is not None and by_key and by is not None and getattr(record, by) != key:
                record = None  # re-keyed between the lookup and the lock
            found[w] = record
        return found

    def _loader(self, resource: ResourceSpec, by: str | None) -> Loader:
        loader = self._built.get((resource.name, by))
        if loader is None:
            loader = self._built[(resource.name, by)] = Loader(resource, by=by, lock=self.lock)
        return loader

    @staticmethod
    def _params(call: Call, key: Any) -> dict[str, Any]:
        return {"t_id": key, "c_tenant": call.ctx.actor.tenant_id}


def precondition(a: Assembly) -> Stage | None:
    resource = a.spec.resource
    if a.spec.target is None or resource is None or resource.version is None:
        return None
    column = resource.version

    def precondition(call: Call) -> None:
        """Check If-Match: the record must be at the version the caller last saw (412)."""
        if call.expected_version is None or call.record is None:
            return
        current = getattr(call.record, column)
        if current != call.expected_version:
            raise PreconditionFailed(
                f"the record is at version {current}, not {call.expected_version}: "
                "reload it and retry"
            )

    return Stage("precondition", precondition)


def decide(a: Assembly) -> Stage:
    policy, resource, readers = a.policy, a.spec.resource, a.runtime.readers

    def decide(call: Call) -> None:
        """Decide the policy on the record as it is now (deny by default, explained)."""
        if call.resume is not None:
            # Authorized when the request first ran; it is the same request, so its
            # record rules are not decided again (its first phases changed the record).
            # The credential is: the scope, and under impersonation the grant (the
            # replay stage checked it already, before the takeover; kept as a guard).
            denial = policy.credential_denial(call.ctx.actor)
            decision = (
                denial
                if denial is not None
                else Decision.allow("resume", "resumed after a recovery point")
            )
        else:
            decision = policy.decide(call.ctx.actor, call.record, call.ctx)
        if decision.kind is DecisionKind.ERROR:
            log.error("policy of %s failed closed: %s", call.spec.name, decision.reason)
        if not decision.allowed:
            if readers.conceals(resource, decision, call.ctx.actor, call.record, call.ctx):
                # Not readable: as missing as a missing record (audited as the denial).
                raise Refusal(_not_found(resource, call.target).error, decision, call.record)
            raise Refusal(
                Forbidden(decision.public_reason, decision=decision), decision, call.record
            )
        call.decision = decision
        call.state_before = resource.state_of(call.record) if resource else None

    return Stage("decide", decide)


def handler(a: Assembly) -> Stage:
    spec, runtime, committer = a.spec, a.runtime, a.committer
    statements = _Statements(runtime.postgres)

    def handler(call: Call) -> None:
        """Run the handler in the gate's session; a DomainError is an outcome, a crash a 500."""
        session, ctx = _session(call), call.ctx
        ctx.locker = lambda model, id: _lock_more(runtime, statements, call, model, id)
        if call.keyed:  # built on the first ctx.external() only: most actions have no step
            ctx.steps = lambda: _step_runner(runtime, committer, call)
        connection = call.connection or session.connection()
        TenantGuard.clear_written(session, connection)
        try:
            call.body = spec.handler(ctx, call.record, call.data)
        except DomainError as exc:
            charged = call.writes.balance is not None
            if not call.keyed or charged or TenantGuard.wrote(session, connection):
                # Something reached the database (a charge too): roll it all back.
                raise Refusal(exc, call.decision, call.record) from exc
            _store_domain_error(runtime, committer, call, exc)
            raise
        except Forbidden as exc:  # e.g. the tenant guard during the handler's flush
            raise Refusal(exc, exc.decision, call.record) from exc
        except (CharterError, SQLAlchemyError):
            raise  # database errors are translated by the runner
        except Exception as exc:
            log.exception("handler of %s failed; rolled back", spec.name)
            raise HandlerFailed(
                "The action failed and nothing was changed.", request_id=ctx.request_id
            ) from exc

    return Stage("handler", handler)


def _store_domain_error(
    runtime: Runtime, committer: Committer, call: Call, exc: DomainError
) -> None:
    """Nothing reached the database: store the refusal as the key's outcome, under its claim."""
    session = _session(call)
    for obj in list(session.new):  # drop the handler's pending changes
        session.expunge(obj)
    session.expire_all()
    entry = call.entry(
        exc.code, decision=call.decision, record=call.record, detail={"message": exc.message}
    )
    call.writes.entries = [entry]
    call.writes.outcome = claims.outcome_of(call, exc, entry.resource_id)
    if _multi_phase(call):  # its claim holds the input (it may hold secrets) and a lease
        call.writes.before.append(release_statement(call.ctx.idempotency_scope))
    committer.commit(call)
    claims.remember(
        runtime, call, status=exc.status, body=None, error=call.writes.outcome["u_error"],
        outcome=exc.code, resource_id=entry.resource_id,
    )  # fmt: skip


def _lock_more(
    runtime: Runtime, statements: _Statements, call: Call, model: type[Any], id: Any
) -> Any:
    resource = runtime.tenancy.resource_of_model(model)
    if resource is None:
        raise ConfigurationError(
            f"ctx.lock(): {getattr(model, '__name__', model)!r} is not a declared resource"
        )
    record = statements.load(call, resource, None, resource.coerce(None, id))
    if record is not None and record not in call.locked:
        call.locked.append(record)
    return record


def _multi_phase(call: Call) -> bool:
    """Whether the call committed a recovery point, or resumed after one."""
    return call.resume is not None or isinstance(call.ctx.steps, StepRunner)


def _step_runner(runtime: Runtime, committer: Committer, call: Call) -> StepRunner:
    session, ctx = _session(call), call.ctx
    if call.resume is not None:
        # Taken over: the takeover moved the claim to the next phase (takeover_statement).
        claim_id, phase = int(call.resume.id), int(call.resume.phase) + 1
    else:  # claimed by this transaction, which is the only one that can see it yet
        claim_id = session.execute(claim_id_statement(ctx.idempotency_scope)).scalar_one()
        phase = 0
    record, decision = call.record, call.decision

    def relock() -> None:
        if record is not None and runtime.postgres:
            session.refresh(record, with_for_update=True)

    def commit_phase(statement: Any, entry: Any) -> bool:
        lease = runtime.audit_trail.lease()
        try:
            saved = session.execute(statement)
            if getattr(saved, "rowcount", 1) != 1:
                return False  # another worker took the request over: commit nothing
            session.flush()
            committer.write(session, lease, [entry] if entry is not None else [], None)
            finish(session, lease)
            call.phases += 1
            # The next phase's transaction begins with its first statement, not here: on
            # SQLite, BEGIN IMMEDIATE now would hold the write lock through the outside call.
            call.connection = None
        finally:
            lease.rolled_back()
        return True

    return StepRunner(
        clock=runtime.clock,
        lease=runtime.recovery_lease,
        commit_phase=commit_phase,
        claim_id=claim_id,
        phase=phase,
        recovery=None if call.resume is None else call.resume.recovery,
        request={
            "actor": actor_snapshot(ctx.actor),
            "target": None if call.target is None else str(call.target),
            "channel": str(ctx.channel),
            "reason": ctx.reason,
        },
        request_input=json.dumps(exact_input(call.data)),
        relock=relock,
        audit=lambda outcome: call.entry(outcome, decision=decision, record=record),
    )


def track(a: Assembly) -> Stage:
    spec, tenancy = a.spec, a.runtime.tenancy

    def track(call: Call) -> None:
        """Bump the version of every record the call changed; list them for the audit entry."""
        session = _session(call)
        if spec.creates:
            call.record = _adopt_created(session, spec, tenancy)
        elif any(tenancy.resource_of(obj) for obj in session.new):
            session.flush()  # new records get their ids (and pass the tenant guard)
        record = call.record
        if record is not None and spec.mutates:
            call.version = _bump(spec.resource, record, created=spec.creates)
        elif record is not None and spec.resource is not None and spec.resource.version:
            call.version = int(getattr(record, spec.resource.version))
        changed = tenancy.changed(session)
        for obj, before in changed.items():
            if obj is not record:
                call.touched.append(_touched(tenancy, session, obj, before, bump=True))
        if session.new or session.deleted or any(_relinks(obj) for obj in session.dirty):
            # The flush may write foreign keys of records the session does not list as
            # changed (a collection's append or clear, a parent's delete, a new parent's
            # children): flushed now, the tenant guard's after-flush hook notes them, and
            # they are bumped and named too.
            session.flush()
            for obj, before in tenancy.changed(session).items():
                if obj not in changed and obj is not record:
                    call.touched.append(_touched(tenancy, session, obj, before, bump=True))
        for obj in TenantGuard.created(session):
            if obj is not record:
                call.touched.append(_touched(tenancy, session, obj, None, bump=False))
        seen = {(t.type, t.id) for t in call.touched}
        if record is not None and spec.resource is not None:
            seen.add((spec.resource.name, spec.resource.identity(record)))
        call.touched.extend(bulk_touched(TenantGuard.bulk_changes(session), seen))
        body = call.body
        if body is record and record is not None and spec.resource is not None:
            session.flush()
            body = spec.resource.render(record)
        call.body = (
            body.model_dump(mode="json")
            if isinstance(body, BaseModel)
            else (to_jsonable_python(body))
        )

    return Stage("track", track)


def _touched(
    tenancy: TenantGuard, session: Session, obj: Any, before: str | None, *, bump: bool
) -> Touched:
    resource = tenancy.resource_of(obj)
    assert resource is not None  # tracked objects are of declared resources
    deleted = obj in session.deleted or sa_inspect(obj).was_deleted  # or already flushed
    if bump and not deleted:
        _bump(resource, obj, created=False)
    return Touched(
        resource.name,
        resource.identity(obj),
        before,
        None if deleted else resource.state_of(obj),
        deleted=deleted,
    )


def _relinks(obj: Any) -> bool:
    """Whether ``obj`` has a changed relationship, which its flush turns into foreign keys
    (possibly of other records)."""
    state = sa_inspect(obj)
    relationships = state.mapper.relationships
    return any(key in relationships for key in state.committed_state)


def _bump(resource: ResourceSpec | None, record: Any, *, created: bool) -> int | None:
    """Every change moves the record to a new version (the HTTP ETag)."""
    if resource is None or resource.version is None:
        return None
    current = getattr(record, resource.version)
    if created:
        if current is None:
            setattr(record, resource.version, 1)
        return int(getattr(record, resource.version))
    current = (current or 0) + 1
    setattr(record, resource.version, current)
    return int(current)


def _adopt_created(session: Session, spec: ActionSpec, tenancy: TenantGuard) -> Any:
    resource = spec.resource
    assert resource is not None
    session.flush()  # runs the tenant guard, which records every new object
    created = [o for o in TenantGuard.created(session) if isinstance(o, resource.model)]
    if len(created) != 1:
        raise HandlerFailed(
            f"{spec.name} must add exactly one {resource.model.__name__} to ctx.session"
        )
    return created[0]


def seal(a: Assembly) -> Stage:
    keyable = a.keyable

    def seal(call: Call) -> None:
        """Build the call's audit entry (every record it changed) and its stored outcome."""
        entry = call.entry("ok", decision=call.decision, record=call.record)
        call.writes.entries.append(entry)
        if keyable and call.keyed:
            call.writes.outcome = claims.outcome_of(call, None, entry.resource_id)
            if call.resume is not None or isinstance(call.ctx.steps, StepRunner):
                # Multi-phase: drop the stored input (it may hold secrets) and the lease.
                call.writes.before.append(release_statement(call.ctx.idempotency_scope))

    return Stage("seal", seal)


def commit(a: Assembly) -> Stage:
    runtime, committer = a.runtime, a.committer

    def commit(call: Call) -> None:
        """Commit effect, audit entry and stored outcome together (PostgreSQL: one statement)."""
        committer.commit(call)
        if call.keyed:
            entry = call.writes.entries[0]
            claims.remember(
                runtime, call, status=call.spec.status, body=call.body, error=None,
                outcome="ok", resource_id=entry.resource_id, version=call.version,
                balance=call.writes.balance,
            )  # fmt: skip

    return Stage("commit", commit)


# -- helpers ----------------------------------------------------------------------------


def _session(call: Call) -> Session:
    session = call.session
    assert session is not None  # transaction stages run inside the runner's session
    return session


def _printable(value: Any, limit: int = 128) -> str:
    """``value`` as text without control characters (escaped), at most ``limit`` characters."""
    text = str(value)
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text[:limit]


def _not_found(resource: ResourceSpec | None, target: Any) -> Refusal:
    return Refusal(
        NotFound(
            f"{resource.name if resource else 'record'} {_printable(target, 64)} was not found"
        ),
        Decision.deny(DecisionKind.NOT_FOUND, reason="no such record in tenant"),
        None,
    )


#: The factories of the stages above, by name, in pipeline order (see build.DEFAULT_STAGES).
FACTORIES: tuple[tuple[str, Callable[[Assembly], Stage | None]], ...] = (
    ("rate_limit", ratelimit.rate_limit),  # per (tenant, actor, class), before any work (429)
    ("validate", validate),
    ("replay", replay),
    ("rate_limit_reply", ratelimit.rate_limit_reply),  # Redis' count, read before any statement
    ("claim", claim),
    ("load", load),
    ("transition", workflow.transition),  # the locked state allows the step (409)
    ("decide", decide),
    # If-Match (412) after the 404, 409 and 403 (RFC 9110 section 13.2.1): before them, a
    # stale version told a caller who may not read the record that it exists.
    ("precondition", precondition),
    ("advance", workflow.advance),  # the gate sets the state (after the decision)
    ("charge", credits.charge),  # the cost, in this transaction (402 / 429)
    ("handler", handler),
    ("track", track),
    ("state_guard", workflow.state_guard),  # only the gate wrote the state (workflows)
    ("seal", seal),
    ("commit", commit),
)
