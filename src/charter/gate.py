"""The :class:`Charter` facade: declarations, ``execute``, and what is built on the gate.

Each method here is thin: declarations go to the :class:`~charter.registry.Registry`,
which hands every action to the :class:`~charter.pipeline.PipelineBuilder` to be
assembled once; ``execute`` runs a call through its action's pipeline
(:func:`charter.pipeline.run.run`). For what happens in a call, read
``charter.pipeline_of(action)`` or :mod:`charter.pipeline.stages`.
"""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Select, event, or_, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from . import data
from .actions import MAX_BATCH_LIMIT, ActionSpec, Handler
from .actor import Actor, Channel
from .agent_tools import ToolDefinition, tool_definitions
from .audit import (
    AuditAnchor,
    AuditCheckpointer,
    AuditKeyring,
    AuditTrail,
    Pruned,
    VerificationReport,
    anchor_from_uri,
    verify,
)
from .context import ActionContext
from .data.batch import BatchOutcome
from .data.bulk import DEFAULT_MAX_BATCH, BatchRequest, Bulk
from .data.visible import visibility
from .decision import Decision
from .errors import CharterError, ConfigurationError, HandlerFailed
from .idempotency.keys import DEFAULT_RETENTION
from .idempotency.recovery import DEFAULT_LEASE, actor_from_snapshot
from .idempotency.store import idempotency_table, not_completed, purge
from .impersonation import ImpersonationGrant
from .outcome import Outcome
from .pipeline import Call, Pipeline, PipelineBuilder, StageFactory
from .pipeline.run import run
from .pipeline.runtime import Runtime
from .pipeline.stages import check_reason
from .policy import ActionPolicy, PermissionMatrix
from .ratelimit import RateLimiter
from .ratelimit.stage import limit_list
from .registry import Registry
from .resources import ResourceSpec, request_id_or_new
from .storage import make_engine, translate_errors
from .workflow import Workflow, WorkflowGuard

__all__ = ["Charter", "HandlerFailed", "Outcome"]

F = TypeVar("F", bound=Handler)

#: Used only when ``development=True``; never outside development.
DEVELOPMENT_AUDIT_KEY = "charter-development-audit-key-not-secret"

log = logging.getLogger("charter")


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Charter:
    """The registry of resources and actions, and the gate that runs them.

    Configuration is keyword-only: ``database_url`` *or* ``engine``; ``clock``
    (a callable returning an aware UTC datetime); ``audit_keys`` (an ordered
    mapping of key id to secret, newest first; required unless
    ``development=True``); ``conflict_retries`` (how often a transaction that
    lost a deadlock or serialization race runs again before the caller gets
    409 ``conflict``).

    The audit trail: ``audit_anchor`` (a URI, ``file:…`` or another database's
    URL, or an :class:`~charter.audit.AuditAnchor`) receives a copy of every
    checkpoint (:mod:`charter.audit.anchor`); without one, nothing outside the
    database vouches for the trail, and outside development a warning says so.
    Checkpoints are written by this process itself, every
    ``checkpoint_interval`` (60 s) or every ``checkpoint_entries`` entries,
    whichever comes first (:mod:`charter.audit.schedule`; both None: only when
    asked). :meth:`close` stops that and writes a last checkpoint.

    Bulk requests (:meth:`execute_many`): at most ``max_batch`` items (1,000), unless
    an action declares its own.

    Rate limits: ``rate_limits`` (``"memory://"`` for this process,
    ``"redis://host:6379/0"`` shared, or a :class:`~charter.ratelimit.RateLimiter`
    with classes of its own) counts every call per (tenant, actor, rate class)
    before any other work (:mod:`charter.ratelimit`). They are on by default,
    counted in this process with the default classes (``read`` 600, ``write``
    300, ``financial`` 60, ``export`` 10 a minute per actor): a service that
    runs several processes passes ``redis://``; ``None`` turns them off, a
    choice the code states.
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
        conflict_retries: int = 3,
        audit_anchor: str | AuditAnchor | None = None,
        checkpoint_interval: timedelta | None = timedelta(seconds=60),
        checkpoint_entries: int | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        rate_limits: str | RateLimiter | None = "memory://",
        cursor_keys: Mapping[str, str | bytes] | None = None,
        cursor_ttl: timedelta = data.DEFAULT_TTL,
        max_page: int = data.MAX_PAGE,
    ) -> None:
        if (database_url is None) == (engine is None):
            raise ConfigurationError("give Charter exactly one of database_url= or engine=")
        self._owns_engine = engine is None
        self.engine: Engine = (
            engine
            if engine is not None
            else make_engine(
                str(database_url), lock_timeout_ms=int(lock_timeout.total_seconds() * 1000)
            )
        )
        self.clock = clock
        self.development = development
        self.keyring = AuditKeyring(_audit_keys(audit_keys, development))
        self.audit_trail = audit_trail or AuditTrail(self.keyring)
        self.idempotency_retention = idempotency_retention
        self.recovery_lease = recovery_lease
        self._registry = registry = Registry(self._assemble, clock=clock)
        self.policy = registry.policy
        # Declarations are the registry's own methods (same signatures, same docs):
        # resource(), action() (a decorator), register(), allow(), deny() and
        # allow_impersonation().
        self.resource = registry.resource
        self.action = registry.action
        self.register = registry.register
        self.allow = registry.allow
        self.deny = registry.deny
        self.allow_impersonation = registry.allow_impersonation
        self.runtime = Runtime(
            engine=self.engine,
            clock=clock,
            audit_trail=self.audit_trail,
            resources=self._registry.by_model,
            readers=registry.readers,
            idempotency_retention=idempotency_retention,
            recovery_lease=recovery_lease,
            conflict_retries=conflict_retries,
        )
        # Rate limits (charter.ratelimit): "memory://", "redis://...", a RateLimiter, or None.
        self.rate_limiter = RateLimiter.of(rate_limits)
        self.runtime.rate_limiter = self.rate_limiter
        self._builder = PipelineBuilder(self.runtime)
        self.bulk = Bulk(self.runtime, self._builder.committer, max_batch=_max_batch(max_batch))
        # Field visibility on every outcome body (charter.policy.visibility).
        self._builder.insert("visibility", visibility, after="track")
        # Page cursors (charter.data.cursors): their own keys, or keys derived from the
        # audit keys (a secret outside development) under the cursor label.
        self.cursors = (
            data.CursorSealer(cursor_keys, ttl=cursor_ttl, clock=clock)
            if cursor_keys is not None
            else data.CursorSealer.derived(_audit_keys(audit_keys, development),
                                           ttl=cursor_ttl, clock=clock)
        )  # fmt: skip
        self.max_page = data.check_max_page(max_page, "Charter")
        if self.rate_limiter is not None:
            self.rate_limiter.bind(self._builder.committer.alone, clock)
            # Disposing the engine stops the denial summaries' writer too, writing nothing
            # (it would open the disposed engine again): the next denial or close() writes.
            event.listen(self.engine, "engine_disposed", self.rate_limiter.denials.pause)
        self._workflow_guard = WorkflowGuard(registry.workflows, clock)
        self._pipelines: dict[str, Pipeline] = {}
        self.anchor = anchor_from_uri(audit_anchor)
        self.checkpointer = AuditCheckpointer(
            self.engine, self.keyring, self.audit_trail, clock=clock, anchor=self.anchor,
            interval=checkpoint_interval, entries=checkpoint_entries,
        )  # fmt: skip
        # A Charter dropped without close() stops its thread (exit is the checkpointer's
        # own hook, which also writes a last checkpoint).
        weakref.finalize(self, self.checkpointer.close, final=False).atexit = False
        if self.anchor is None and not development:
            log.warning(
                "no audit anchor (audit_anchor=, CHARTER_AUDIT_ANCHOR): nothing outside the "
                "database vouches for the audit trail; deleting its newest checkpoints with "
                "the entries they cover would go unnoticed"
            )

    def add_stage(
        self,
        name: str,
        factory: StageFactory,
        *,
        before: str | None = None,
        after: str | None = None,
    ) -> None:
        """Add a stage to every action's pipeline (before any action is declared)."""
        self._builder.insert(name, factory, before=before, after=after)

    def workflow(self, model: type[Any], **options: Any) -> Workflow:
        """Declare ``model``'s states and transitions, before its actions (:mod:`charter.workflow`).

        Options: ``states``, ``initial``, ``transitions`` (:class:`~charter.Transition`
        values), and for a flow that spans requests ``deadline``, ``expires`` and ``log``.
        """
        workflow = self._registry.workflow(model, **options)
        self._workflow_guard.install(self.runtime.sessions)
        return workflow

    @property
    def workflows(self) -> Mapping[str, Workflow]:
        """The declared workflows, by resource name."""
        return {w.resource.name: w for w in self._registry.workflows.values()}

    @property
    def impersonation_grants(self) -> tuple[ImpersonationGrant, ...]:
        """The declared impersonation grants, in declaration order (for review tools)."""
        return self._registry.impersonation.declared

    def _assemble(self, spec: ActionSpec, policy: ActionPolicy) -> None:
        self._pipelines[spec.name] = self._builder.build(spec, policy)

    # -- reading the declarations ------------------------------------------------------

    @property
    def actions(self) -> Mapping[str, ActionSpec]:
        return self._registry.actions

    @property
    def resources(self) -> Mapping[str, ResourceSpec]:
        return self._registry.resources

    def spec(self, action: str) -> ActionSpec:
        return self._registry.spec(action)

    def policy_of(self, action: str) -> ActionPolicy:
        """The compiled policy of an action (to decide, explain or filter by hand)."""
        return self._registry.policy_of(action)

    def pipeline_of(self, action: str) -> Pipeline:
        """The stages ``action`` runs, in order: what happens when it is executed."""
        self.spec(action)
        return self._pipelines[action]

    def allowed_actions(
        self, actor: Actor, record: Any, ctx: ActionContext | None = None
    ) -> dict[str, Decision]:
        """Every action on ``record``'s resource: allowed or not, and why (for UI buttons)."""
        return self._registry.allowed_actions(actor, record, ctx)

    def tools(self, actor: Actor) -> tuple[ToolDefinition, ...]:
        """The tools an agent acting for a user may call (:mod:`charter.agent_tools`).

        ``actor`` is the agent on behalf of the user (``agent.impersonate(user)``);
        any other actor, or an agent without a grant for that user, gets none.
        """
        return tool_definitions(self._registry.actions, self.policy_of, self.resolve(actor),
                                self.clock())  # fmt: skip

    def resolve(self, actor: Actor) -> Actor:
        """``actor`` as the gate decides for it: under impersonation, with its grant's scopes."""
        return self._registry.impersonation.resolve(actor)

    def matrix(
        self, *, roles: Sequence[str], states: Sequence[str] | None = None
    ) -> PermissionMatrix:
        """Roles x actions x states -> allow, deny or conditional, for review."""
        return self._registry.matrix(roles=roles, states=states)

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
        """Run ``action`` as ``actor`` through its pipeline (see :meth:`pipeline_of`).

        ``key`` is the idempotency key (the ``Idempotency-Key`` header over HTTP);
        ``expected_version`` the version the caller last saw (``If-Match``).
        """
        spec = self.spec(action)
        ctx = ActionContext(
            action=spec.name,
            actor=self._registry.impersonation.resolve(actor),
            channel=Channel(channel),
            now=self.clock(),
            request_id=request_id or "",
            reason=reason,
            idempotency_key=key,
        )
        call = Call(spec, ctx, raw_input=input, target=target, expected_version=expected_version)
        return run(self._pipelines[spec.name], call)

    def execute_many(
        self,
        actor: Actor,
        action: str,
        items: Sequence[Any],
        *,
        key: str | None = None,
        reason: str | None = None,
        channel: Channel | str = Channel.HTTP,
        request_id: str | None = None,
    ) -> BatchOutcome:
        """Run ``action`` once per item, each through its whole pipeline (:mod:`charter.data.bulk`).

        The action must be declared with ``bulk=``; ``key`` is the batch's one
        idempotency key (in per-item mode item ``i`` also holds ``<key>#<i>``). An
        all-or-nothing batch that fails raises :class:`~charter.data.batch.BatchFailed`.
        """
        spec = self.spec(action)
        request = BatchRequest(
            spec=spec,
            pipeline=self._pipelines[spec.name],
            policy=self.policy_of(spec.name),
            actor=self._registry.impersonation.resolve(actor),
            items=items,
            key=key,
            reason=reason,
            channel=Channel(channel),
            request_id=request_id_or_new(request_id),
        )
        return self.bulk.execute(request)

    # -- sessions and lists ------------------------------------------------------------

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A read session for application queries outside the gate (errors translated)."""
        with translate_errors(), self.runtime.read_sessions() as session:
            yield session

    def filter(
        self, stmt: Select[Any], actor: Actor, action: str, *, channel: Channel | str = Channel.HTTP
    ) -> Select[Any]:
        """Add ``action``'s rules (tenant included) to ``stmt`` as a SQL ``WHERE`` clause.

        The rows returned are exactly those on which :meth:`execute` would allow
        ``action`` now (the property tests in ``charter.policy.agreement`` check it).
        """
        ctx = self._context(actor, action, channel)
        return self.policy_of(action).apply(stmt, ctx.actor, ctx)

    def list_records(
        self,
        actor: Actor,
        action: str,
        *,
        limit: int = data.DEFAULT_PAGE,
        after: str | None = None,
        sort: str | None = None,
        where: Mapping[str, Any] | None = None,
        max_page: int | None = None,
        channel: Channel | str = Channel.HTTP,
        request_id: str | None = None,
        reason: str | None = None,
    ) -> data.Page:
        """One page of the records ``actor`` may ``action`` (:func:`charter.data.list_records`).

        ``limit`` is clamped to ``max_page`` (at most the Charter's); ``after`` is the
        previous page's opaque ``next``; ``sort`` one visible column (``"-amount"``),
        ``where`` equality filters on visible columns. With rate limits, each page
        counts as a read (an export's page as an export), and the page's
        ``rate_limit`` holds what its ``RateLimit`` fields say. ``reason``: as for
        :meth:`execute`, required when acting on someone's behalf or when the action
        says so (400 ``reason_required``), and recorded in the page's audit entry.
        """
        spec, ctx = self.spec(action), self._context(actor, action, channel, request_id)
        limited = () if self.rate_limiter is None else (limit_list(self.rate_limiter, spec, ctx),)
        ctx.reason = reason  # checked after the credential (403 first), as execute checks it
        cap = self.max_page if max_page is None else min(max_page, self.max_page)
        return data.list_records(
            self._builder.committer, spec, self.policy_of(action), ctx, limit=limit, after=after,
            cursors=self.cursors, sort=sort, where=where, max_page=cap, rate_limit=limited,
        )  # fmt: skip

    def export(
        self,
        actor: Actor,
        action: str,
        *,
        format: str = "csv",
        sort: str | None = None,
        where: Mapping[str, Any] | None = None,
        fields: Sequence[str] | None = None,
        channel: Channel | str = Channel.HTTP,
        request_id: str | None = None,
        reason: str | None = None,
    ) -> data.ExportStream:
        """Stream the records ``actor`` may ``action``, as CSV or JSON lines (:mod:`.data.export`).

        Counted, charged and audited as started before this returns (429, 403 and
        402 are raised here); iterate the stream for its chunks and close it
        (or use it as a context manager): its end is audited, completed or aborted.
        ``reason`` is recorded in both entries (an operator's ``charter export`` gives one).
        """
        spec, ctx = self.spec(action), self._context(actor, action, channel, request_id)
        ctx.reason = check_reason(spec, ctx.actor, reason)
        return data.start_export(
            self._pipelines[action], spec, self.policy_of(action), ctx,
            format=format, sort=sort, where=where, fields=fields,
        )  # fmt: skip

    def _context(
        self, actor: Actor, action: str, channel: Channel | str, request_id: str | None = None
    ) -> ActionContext:
        return ActionContext(
            action=action,
            actor=self._registry.impersonation.resolve(actor),
            channel=Channel(channel),
            now=self.clock(),
            request_id=request_id_or_new(request_id),
        )

    # -- the audit trail ------------------------------------------------------------------

    def verify_audit(self) -> VerificationReport:
        """Verify the audit trail, its checkpoints and its anchor (:mod:`charter.audit.verify`)."""
        with self.session() as session:
            return verify(session, self.keyring, anchor=self.anchor, now=self.clock())

    def checkpoint_audit(self) -> dict[str, Any]:
        """Sign the current head of every audit stream (and copy it to the anchor)."""
        with translate_errors():
            return self.checkpointer.checkpoint_all()

    def checkpoint_now(self) -> dict[str, Any] | None:
        """Write the scheduled checkpoint now (this process's streams); None if nothing moved."""
        with translate_errors():
            return self.checkpointer.checkpoint_now()

    def prune_audit(self, before: datetime) -> Pruned:
        """Delete audit entries older than ``before``, with a signed record of how far.

        Refuses (``AuditIntegrityError``) if the trail does not verify first
        (:mod:`charter.audit.prune`).
        """
        report = self.verify_audit()
        with translate_errors():
            return self.checkpointer.prune(before, verified=report)

    def close(self) -> None:
        """Stop the checkpoint thread after a last checkpoint, and release the database.

        The engine is disposed if this Charter created it (``database_url=``).
        """
        if self.rate_limiter is not None:
            self.rate_limiter.close()  # the summaries of denials still being counted
        self.checkpointer.close()
        if self.anchor is not None:
            self.anchor.close()
        if self._owns_engine:
            self.engine.dispose()

    def __enter__(self) -> Charter:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def history(self, resource_type: str, resource_id: Any) -> list[dict[str, Any]]:
        """Every audit entry about one record, oldest first (as target or as a touched record)."""
        with translate_errors(), self.engine.connect() as connection:
            return AuditTrail.history(connection, resource_type, str(resource_id))

    # -- idempotency -----------------------------------------------------------------------

    def purge_idempotency(self) -> int:
        """Remove finished idempotency records whose retention has passed."""
        with self.runtime.write_session() as session:
            removed = purge(session, self.clock())
            session.commit()
            return removed

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


def _max_batch(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_BATCH_LIMIT:
        raise ConfigurationError(f"max_batch= is a whole number from 1 to {MAX_BATCH_LIMIT}")
    return value


def _audit_keys(
    keys: Mapping[str, str | bytes] | None, development: bool
) -> Mapping[str, str | bytes]:
    if keys is None:
        if not development:
            raise ConfigurationError(
                "audit_keys= is required outside development: the audit trail's MAC key "
                "must be a secret kept outside the database (e.g. CHARTER_AUDIT_KEY)"
            )
        return {"dev": DEVELOPMENT_AUDIT_KEY}
    if not development and any(
        (v.decode() if isinstance(v, bytes) else v) == DEVELOPMENT_AUDIT_KEY for v in keys.values()
    ):
        raise ConfigurationError("the development audit key cannot be used outside development")
    return keys
