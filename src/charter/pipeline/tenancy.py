"""Tenant isolation inside the gate's session: reads confined, writes guarded, changes tracked.

The gate's own lookups carry ``tenant = :actor_tenant`` in their SQL. What a
handler does in ``ctx.session`` is confined the standard SQLAlchemy way
(``with_loader_criteria`` added in a ``do_orm_execute`` hook): every ORM
``select``, ``session.get``, relationship load and ORM bulk ``update()`` /
``delete()`` of a declared resource gets the actor's tenant as criteria, so
another tenant's record is simply not found. The flush guard then refuses what
could still slip through (a record merged or added from elsewhere): creating a
record in another tenant, moving one, updating or deleting one.

Hand-written Core statements and ``text()`` run on the session's connection
are outside this guarantee: SQLAlchemy has no ORM entity to attach criteria
to. The README says so.

The guard also tracks which declared records a call changed, so that each one
gets its version bump and is named in the call's audit entry, and whether
anything at all reached the database during the handler (:meth:`TenantGuard.wrote`):
a keyed call whose handler refused commits its stored refusal in the same
transaction only if nothing did, whatever wrote it (the ORM, Core on the
session's connection as the credits ledger does, ``text()``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection, Engine, Result, TextualSelect, event
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import ORMExecuteState, Session, sessionmaker, with_loader_criteria

from ..actor import Actor
from ..decision import Decision, DecisionKind
from ..errors import Forbidden
from ..resources import ResourceSpec, declared_for
from .dml import INTERNAL, BulkChange, run_bulk_change, upsert_sets, written_rows

__all__ = ["SCOPED", "GateSession", "TenantGuard", "tenant_violation", "watch_writes"]

#: Execution option of a statement that already carries the tenant in its SQL (the gate's own).
SCOPED = "charter_tenant_scoped"

_ACTOR = "charter.actor"
_GUARD = "charter.tenant_guard"
_BULK = "charter.bulk_changes"
_WROTE = "charter.wrote"
_CREATED = "charter.created"
_CHANGED = "charter.changed"


class GateSession(Session):
    """The gate's sessions: SQLAlchemy's legacy bulk methods are refused inside a call.

    ``bulk_save_objects``, ``bulk_insert_mappings`` and ``bulk_update_mappings``
    emit no ORM event: neither the tenant guard nor the workflow guard would see
    their rows, and the call's audit entry could not name what they changed. On a
    declared resource, in a session bound to an actor, they are a 403 (rule
    ``tenant``, audited, nothing written). Their 2.0 forms are guarded:
    ``session.execute(insert(Model), rows)``, ``session.execute(update(Model), rows)``.
    """

    def bulk_save_objects(self, objects: Any, *args: Any, **kwargs: Any) -> None:
        objects = list(objects)
        self._refuse_legacy("bulk_save_objects", {type(o) for o in objects})
        super().bulk_save_objects(objects, *args, **kwargs)

    def bulk_insert_mappings(self, mapper: Any, mappings: Any, *args: Any, **kwargs: Any) -> None:
        self._refuse_legacy("bulk_insert_mappings", {sa_inspect(mapper).class_})
        super().bulk_insert_mappings(mapper, mappings, *args, **kwargs)

    def bulk_update_mappings(self, mapper: Any, mappings: Any) -> None:
        self._refuse_legacy("bulk_update_mappings", {sa_inspect(mapper).class_})
        super().bulk_update_mappings(mapper, mappings)

    def _refuse_legacy(self, method: str, models: set[type[Any]]) -> None:
        guard: TenantGuard | None = self.info.get(_GUARD)
        if self.info.get(_ACTOR) is None or guard is None:
            return
        declared = sorted(spec.name for m in models if (spec := guard.resource_of_model(m)))
        if declared:
            raise tenant_violation(
                f"Session.{method} emits no ORM event, so the gate cannot keep it in the "
                f"actor's tenant ({', '.join(declared)}); use session.execute(insert(...) or "
                "update(...), rows)"
            )


class TenantGuard:
    """Confines a gate session to its actor's tenant (see the module docstring)."""

    def __init__(self, resources: Mapping[type[Any], ResourceSpec]) -> None:
        self._resources = resources  # the registry's live mapping: resources declared later count

    def install(self, sessions: sessionmaker[Any]) -> None:
        sessions.configure(info={_GUARD: self})
        event.listen(sessions, "before_flush", self._before_flush)
        event.listen(sessions, "after_flush", self._after_flush)
        event.listen(sessions, "do_orm_execute", self._confine)

    @staticmethod
    def begin(session: Session, actor: Actor) -> None:
        """Bind ``session`` to ``actor``: from now on it sees and writes only that tenant."""
        session.info[_ACTOR] = actor
        session.info[_CREATED] = []
        session.info[_CHANGED] = {}
        session.info[_BULK] = []
        session.info[_WROTE] = False

    @staticmethod
    def wrote(session: Session, connection: Connection | None = None) -> bool:
        """Whether the ORM wrote since :meth:`begin` or :meth:`clear_written`; with
        ``connection`` (the session's), whether any statement that may write ran on it
        (:func:`watch_writes`)."""
        if session.info.get(_WROTE):
            return True
        return connection is not None and bool(connection.info.get(_WROTE))

    @staticmethod
    def clear_written(session: Session, connection: Connection | None = None) -> None:
        session.info[_WROTE] = False
        if connection is not None:
            connection.info[_WROTE] = False

    @staticmethod
    def created(session: Session) -> list[Any]:
        return list(session.info.get(_CREATED, ()))

    def changed(self, session: Session) -> dict[Any, str | None]:
        """Every declared record changed so far (flushed or not), with its state before."""
        self._track(session)
        return dict(session.info.get(_CHANGED, {}))

    def resource_of(self, obj: Any) -> ResourceSpec | None:
        return declared_for(self._resources, type(obj))

    def resource_of_model(self, model: type[Any]) -> ResourceSpec | None:
        return declared_for(self._resources, model)

    def _confine(self, state: ORMExecuteState) -> Result[Any] | None:
        if state.is_insert or state.is_update or state.is_delete:
            state.session.info[_WROTE] = True
        actor: Actor | None = state.session.info.get(_ACTOR)
        options = state.execution_options
        if actor is None or options.get(SCOPED) or options.get(INTERNAL) or state.is_column_load:
            return None
        mapper = state.bind_mapper
        resource = None if mapper is None else self.resource_of_model(mapper.class_)
        if resource is not None and (state.is_insert or state.is_update):
            self._check_written(state, resource, actor)
        if not (state.is_select or state.is_update or state.is_delete):
            return None
        criteria = [
            with_loader_criteria(
                spec.model, spec.column(spec.tenant) == actor.tenant_id, include_aliases=True
            )
            for spec in self._resources.values()
            if spec.tenant is not None
        ]
        if criteria:
            state.statement = state.statement.options(*criteria)
        if resource is None or state.is_select:
            return None
        return self._bulk_change(state, resource)

    def _bulk_change(self, state: ORMExecuteState, resource: ResourceSpec) -> Result[Any]:
        """Run an ORM bulk UPDATE/DELETE so that the call knows the records it changed."""
        session = state.session
        result, change = run_bulk_change(
            state,
            resource,
            postgres=session.get_bind().dialect.name == "postgresql",
            missing=lambda: tenant_violation(
                f"a bulk update by primary key names a {resource.name} record "
                "that is not in the actor's tenant"
            ),
        )
        session.info.setdefault(_BULK, []).append(change)
        return result

    @staticmethod
    def bulk_changes(session: Session) -> list[BulkChange]:
        """What the ORM bulk UPDATEs and DELETEs of the call changed, in order."""
        return list(session.info.get(_BULK, ()))

    def _check_written(self, state: ORMExecuteState, resource: ResourceSpec, actor: Actor) -> None:
        """An ORM bulk ``INSERT``/``UPDATE`` of a declared resource stays in the actor's tenant.

        Every row of an INSERT names the actor's tenant (rows of a bulk insert are
        not given one, as a flushed record is); no UPDATE sets another. An UPDATE
        by primary key (a list of rows) is not confined by loader criteria
        (SQLAlchemy applies none to it): :meth:`_bulk_change` looks its keys up
        first, in the actor's tenant, and one that is not there refuses it.
        """
        if resource.tenant is None:
            return
        if state.is_insert and upsert_sets(state.statement) is not None:
            raise tenant_violation(
                f"an upsert (ON CONFLICT DO UPDATE) of {resource.name} would update whichever "
                "record it conflicts with, another tenant's too: look the record up (reads are "
                "confined to the tenant) and change it, or insert with ON CONFLICT DO NOTHING"
            )
        tenant, rows = actor.tenant_id, written_rows(state)
        for row in rows:
            if state.is_insert and row.get(resource.tenant) != tenant:
                raise tenant_violation(
                    f"a bulk insert of {resource.name} names tenant "
                    f"{row.get(resource.tenant)!r}: every row must name the actor's"
                )
            if resource.tenant in row and row[resource.tenant] != tenant:
                raise tenant_violation(f"a bulk update cannot move {resource.name} records")

    def _before_flush(self, session: Session, _context: Any, _instances: Any) -> None:
        """New records join the actor's tenant; none may be created in, moved to, changed in
        or deleted from another."""
        actor: Actor | None = session.info.get(_ACTOR)
        if actor is None:
            return
        tenant = actor.tenant_id
        for obj in session.new:
            resource = self.resource_of(obj)
            if resource is None or resource.tenant is None:
                continue
            owner = getattr(obj, resource.tenant)
            if owner is None:
                setattr(obj, resource.tenant, tenant)
            elif owner != tenant:
                raise tenant_violation(f"a new {resource.name} record names tenant {owner!r}")
            if obj not in session.info[_CREATED]:
                session.info[_CREATED].append(obj)
        for obj in (*session.dirty, *session.deleted):
            resource = self.resource_of(obj)
            if resource is None or resource.tenant is None:
                continue
            history = sa_inspect(obj).attrs[resource.tenant].history
            if history.has_changes():
                raise tenant_violation(f"a {resource.name} record cannot change tenant")
            if getattr(obj, resource.tenant) != tenant:
                verb = "deleted" if obj in session.deleted else "changed"
                raise tenant_violation(f"another tenant's {resource.name} record cannot be {verb}")
        self._track(session)

    def _after_flush(self, session: Session, _context: Any) -> None:
        """The tenant of every record the flush wrote, read again from the values it wrote.

        A relationship whose foreign key is the tenant column (``order.tenant =
        <globex>``) is copied into that column during the flush, after
        :meth:`_before_flush` looked. Raising here fails the flush, and the call's
        transaction rolls back with it.
        """
        session.info[_WROTE] = True
        actor: Actor | None = session.info.get(_ACTOR)
        if actor is None:
            return
        for obj in (*session.new, *session.dirty):
            resource = self.resource_of(obj)
            if resource is None or resource.tenant is None:
                continue
            moved = obj in session.dirty and sa_inspect(obj).attrs[resource.tenant].history
            if getattr(obj, resource.tenant) != actor.tenant_id or (moved and moved.has_changes()):
                raise tenant_violation(f"a {resource.name} record was written in another tenant")

    def _track(self, session: Session) -> None:
        changed: dict[Any, str | None] = session.info.setdefault(_CHANGED, {})
        for obj in (*session.dirty, *session.deleted):
            if obj in changed:
                continue
            resource = self.resource_of(obj)
            if resource is None:
                continue
            if obj in session.deleted or session.is_modified(obj, include_collections=False):
                changed[obj] = _state_before(resource, obj)


def _state_before(resource: ResourceSpec, obj: Any) -> str | None:
    """The record's state as it was loaded (before this unflushed change)."""
    if resource.state is None:
        return None
    history = sa_inspect(obj).attrs[resource.state].history
    if history.deleted:
        value = history.deleted[0]
        return None if value is None else str(getattr(value, "value", value))
    return resource.state_of(obj)


def watch_writes(engine: Engine) -> None:
    """Flag a connection of ``engine`` on which a statement that may write runs.

    At the cursor, so every way of writing is seen: the ORM's flush, Core on
    ``session.connection()``, ``text()``, ``exec_driver_sql``. Only a ``select()``
    built in SQLAlchemy (no data-modifying CTE) counts as reading; anything else,
    a ``SAVEPOINT`` and ``text(...).columns(...)`` included, counts as a write: the
    flag errs towards rolling back. A ``SELECT`` of a function that writes
    (``select(func.my_volatile_insert())``) is not seen: that is a hand-written
    write, outside the guarantee like Core and ``text()`` for tenant isolation.
    """
    event.listen(engine, "before_cursor_execute", _flag_writes)


def _flag_writes(
    connection: Connection, _cursor: Any, _sql: str, _params: Any, context: Any, _many: bool
) -> None:
    compiled: Any = getattr(context, "compiled", None)
    statement = getattr(compiled, "statement", None)
    if (
        statement is None
        or not statement.is_select
        or isinstance(statement, TextualSelect)  # text("INSERT … RETURNING").columns(...)
        or any(cte.element.is_dml for cte in (compiled.ctes or ()))
    ):
        connection.info[_WROTE] = True


def tenant_violation(reason: str) -> Forbidden:
    return Forbidden(
        "You cannot create, move, change or delete records across tenants.",
        decision=Decision.deny(DecisionKind.DENIED_BY_RULE, rule="tenant", reason=reason),
    )
