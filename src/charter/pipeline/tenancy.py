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

from sqlalchemy import (
    Alias,
    ClauseElement,
    Connection,
    Engine,
    Join,
    Result,
    TableClause,
    TextualSelect,
    event,
    literal,
    select,
)
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import (
    InstanceState,
    ORMExecuteState,
    Session,
    sessionmaker,
    with_loader_criteria,
)
from sqlalchemy.sql.util import find_tables

from ..actor import Actor
from ..decision import Decision, DecisionKind
from ..errors import Forbidden
from ..resources import ResourceSpec, declared_for
from .dml import INTERNAL, BulkChange, run_bulk_change, upsert_sets, written_rows

__all__ = [
    "SCOPED",
    "GateSession",
    "TenantGuard",
    "loaded_in_tenant",
    "tenant_violation",
    "watch_writes",
]

#: Execution option of a statement that already carries the tenant in its SQL (the gate's own).
SCOPED = "charter_tenant_scoped"

_ACTOR = "charter.actor"
_GUARD = "charter.tenant_guard"
_BULK = "charter.bulk_changes"
_WROTE = "charter.wrote"
_CREATED = "charter.created"
_CHANGED = "charter.changed"
#: Identity keys of the records whose row this call read in the actor's tenant (see
#: :meth:`TenantGuard._confirm_rows`).
_LOADED = "charter.loaded"


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
        event.listen(sessions, "loaded_as_persistent", _loaded_as_persistent)

    @staticmethod
    def begin(session: Session, actor: Actor) -> None:
        """Bind ``session`` to ``actor``: from now on it sees and writes only that tenant."""
        session.info[_ACTOR] = actor
        session.info[_CREATED] = []
        session.info[_CHANGED] = {}
        session.info[_BULK] = []
        session.info[_WROTE] = False
        session.info[_LOADED] = set()

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
        if actor is None or options.get(SCOPED) or options.get(INTERNAL):
            return None
        if state.is_column_load:  # SQLAlchemy applies no loader criteria to a refresh
            refreshed = getattr(state.load_options, "_refresh_state", None)
            if isinstance(refreshed, InstanceState):
                self._confirm_row(state.session, refreshed, actor, "read")
            return None
        mapper = state.bind_mapper
        resource = None if mapper is None else self.resource_of_model(mapper.class_)
        if resource is not None and (state.is_insert or state.is_update):
            self._check_written(state, resource, actor)
        if not (state.is_select or state.is_insert or state.is_update or state.is_delete):
            return None
        criteria = [
            with_loader_criteria(
                spec.model, spec.column(spec.tenant) == actor.tenant_id, include_aliases=True
            )
            for spec in self._resources.values()
            if spec.tenant is not None
        ]
        if criteria:
            # An INSERT's too: a subquery in its values reads the tenant's rows only.
            state.statement = state.statement.options(*criteria)
        if (state.is_update or state.is_delete) and mapper is not None:
            self._confine_tables(state, mapper, actor)
        if resource is None or state.is_select or state.is_insert:
            return None
        return self._bulk_change(state, resource)

    def _tenant_tables(self) -> dict[Any, Any]:
        """Each table of a declared resource that has a tenant -> its tenant column, or None
        for a table that holds none (a joined-inheritance subclass's own table)."""
        tables: dict[Any, Any] = {}
        for spec in self._resources.values():
            if spec.tenant is None:
                continue
            column = _tenant_column(spec)
            for mapper in sa_inspect(spec.model).self_and_descendants:
                for table in mapper.tables:
                    if table is column.table:
                        tables[table] = column
                    else:
                        tables.setdefault(table, None)
        return tables

    def _confine_tables(self, state: ORMExecuteState, mapper: Any, actor: Actor) -> None:
        """Every table an ORM bulk UPDATE/DELETE reads besides the one it writes, in the tenant.

        SQLAlchemy confines the entity it writes (loader criteria) but not the other
        tables its ``WHERE`` or its values name, which the database adds as ``UPDATE …
        FROM`` / ``DELETE … USING`` (``values(amount=Account.balance)``, an aliased
        entity): each of them gets the tenant as criteria here.

        A joined-table-inheritance subclass's tenant is in a parent table, which its
        criteria name with no join to the table written: they would hold for any row
        while the tenant has one (a cartesian product: another tenant's row written).
        Such a statement is refused; by primary key it is fine (its keys are looked up
        in the tenant first), and so are the records changed through the session.
        """
        statement: Any = state.statement
        if isinstance(state.parameters, list):  # by primary key: keys looked up in the tenant
            return
        tables = self._tenant_tables()
        conditions: list[Any] = []
        resource = self.resource_of_model(mapper.class_)
        own = set(mapper.tables)
        if resource is not None and resource.tenant is not None:
            holder = _tenant_column(resource).table
            if mapper.local_table is not holder:
                raise tenant_violation(
                    f"a bulk {'delete' if state.is_delete else 'update'} of "
                    f"{mapper.class_.__name__} ({resource.name}) writes {mapper.local_table.name}"
                    f" while its tenant is in {holder.name}: it cannot be confined to the "
                    "tenant; change the records through the session, or update them by "
                    "primary key (session.execute(update(Model), rows))"
                )
        probe = select(literal(1))
        if statement.whereclause is not None:
            probe = probe.where(statement.whereclause)
        if state.is_update:
            for row in written_rows(state):
                values: list[Any] = [_clause(v) for v in row.values()]
                probe = probe.add_columns(*(v for v in values if v is not None))
        for source in probe.get_final_froms():
            if source in own:
                continue
            base: Any = source.element if isinstance(source, Alias) else source
            if isinstance(base, Join):
                if any(t in tables for t in find_tables(base, include_aliases=True)):
                    raise tenant_violation(
                        "a bulk update or delete reads a join of a declared resource: "
                        "name its tables in the WHERE instead"
                    )
                continue
            if base not in tables:
                continue
            column = tables[base]
            if column is None:
                raise tenant_violation(
                    f"a bulk update or delete reads {base.name}, whose tenant is in another "
                    "table: select the records first (reads are confined to the tenant)"
                )
            conditions.append(source.c[column.key] == actor.tenant_id)
        if conditions:
            state.statement = statement.where(*conditions)

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
        self._check_computed(session)
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
        for obj in (*session.dirty, *session.deleted):
            verb = "delete" if obj in session.deleted else "change"
            self._confirm_row(session, sa_inspect(obj), actor, verb)
        self._track(session)

    def _confirm_row(
        self, session: Session, state: InstanceState[Any], actor: Actor, verb: str
    ) -> None:
        """The row of a persistent record is in the actor's tenant, whatever its instance says.

        The unit of work updates and deletes a record, and refreshes its expired
        attributes, by primary key alone. A record whose row this call read in the
        tenant (loaded through the confined session or by the gate, or inserted by it)
        is known to be there; any other (merged with ``load=False``, made detached
        from an instance built by hand, added from another session) may name the
        actor's tenant in memory and carry another tenant's key: its tenant is read
        again from its row (one ``SELECT``, for such records only). Another tenant's
        row, or none, is a 403.
        """
        loaded: set[Any] | None = session.info.get(_LOADED)
        key = state.key
        if loaded is None or key is None or key in loaded:
            return
        resource = self.resource_of_model(state.mapper.class_)
        if resource is None or resource.tenant is None:
            return
        column = _tenant_column(resource)
        primary_key = state.mapper.primary_key
        query = select(column).where(*(c == v for c, v in zip(primary_key, key[1], strict=True)))
        row = session.connection().execute(query.execution_options(**{SCOPED: True})).first()
        if row is None or row[0] != actor.tenant_id:
            raise tenant_violation(
                f"a {resource.name} record whose row is not in the actor's tenant cannot be "
                f"{'read' if verb == 'read' else verb + 'd'}"
            )
        loaded.add(key)

    def _check_computed(self, session: Session) -> None:
        """No value the flush writes is SQL that reads records (another tenant's, unconfined).

        ``record.amount = select(Account.balance).where(...).scalar_subquery()`` is
        written by the unit of work, which applies no loader criteria: the subquery
        would read any tenant's rows. An expression over the record's own row
        (``doc.counter = Doc.counter + 1``) is fine; one that reads a declared
        resource's table otherwise (a subquery, an alias, another table) is a 403.
        """
        tables: dict[Any, Any] | None = None
        for obj in (*session.new, *session.dirty):
            state = sa_inspect(obj)
            for key, value in state.dict.items():
                clause = _clause(value)
                if clause is None:
                    continue
                if tables is None:
                    tables = self._tenant_tables()
                if _reads_records(clause, set(state.mapper.tables), tables):
                    raise tenant_violation(
                        f"{type(obj).__name__}.{key} is set to SQL that reads declared records, "
                        "which the flush cannot confine to the tenant: select the value first "
                        "(reads are confined) and assign it"
                    )

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
        loaded: set[Any] | None = session.info.get(_LOADED)
        if loaded is not None:  # inserted by this call, in the tenant: their rows are known
            for obj in session.new:
                state = sa_inspect(obj)
                loaded.add(state.mapper.identity_key_from_instance(obj))
            # What the flush wrote by itself (a foreign key of a relationship's record).
            for state, (deleted, listonly) in _context.states.items():
                if listonly or state.key is None or state.key in loaded:
                    continue
                if deleted:  # a delete-orphan: the row is gone, its tenant unknown
                    if (spec := self.resource_of_model(state.mapper.class_)) and spec.tenant:
                        raise tenant_violation(
                            f"a {spec.name} record whose row was not read in the actor's "
                            "tenant cannot be deleted"
                        )
                    continue
                self._confirm_row(session, state, actor, "change")
        self._track(session, _context)  # what the flush wrote by itself (relationships)

    def _track(self, session: Session, flush: Any = None) -> None:
        """Note every declared record changed so far, with its state before.

        Before a flush: what the session holds as changed or deleted. After one
        (``flush``, its unit of work, from :meth:`_after_flush`): also every record
        the flush wrote by itself, which the session never listed as changed: a
        foreign key SQLAlchemy copied or cleared while flushing a relationship (a
        collection's append, remove or clear, a parent's delete), a delete-orphan.
        The flush's history is still there, so the state before is too.
        """
        changed: dict[Any, str | None] = session.info.setdefault(_CHANGED, {})
        for obj in (*session.dirty, *session.deleted):
            if obj in changed:
                continue
            resource = self.resource_of(obj)
            if resource is None:
                continue
            if obj in session.deleted or session.is_modified(obj, include_collections=False):
                changed[obj] = _state_before(resource, obj)
        if flush is None:
            return
        created = session.info.get(_CREATED, ())
        for state, (deleted, listonly) in flush.states.items():
            obj = state.obj()
            if obj is None or listonly or obj in changed or obj in session.new:
                continue  # listonly: only read for a relationship, not written
            resource = self.resource_of(obj)
            if resource is None or any(obj is new for new in created):
                continue
            if deleted or session.is_modified(obj, include_collections=False):
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


def loaded_in_tenant(session: Session, record: Any) -> None:
    """``record``'s row was read in the actor's tenant (the gate's own tenant-scoped load)."""
    loaded: set[Any] | None = session.info.get(_LOADED)
    if loaded is not None:
        loaded.add(sa_inspect(record).key)


def _loaded_as_persistent(session: Session, instance: Any) -> None:
    """An ORM load in a gate session, confined to the tenant (:meth:`TenantGuard._confine`)."""
    loaded: set[Any] | None = session.info.get(_LOADED)
    if loaded is not None:
        state = instance if isinstance(instance, InstanceState) else sa_inspect(instance)
        loaded.add(state.key)


def _tenant_column(resource: ResourceSpec) -> Any:
    """The table column of ``resource``'s tenant."""
    return resource.column(str(resource.tenant)).property.columns[0]


def _clause(value: Any) -> ClauseElement | None:
    """``value`` as a SQL expression, or None for a plain value."""
    if hasattr(value, "__clause_element__"):
        value = value.__clause_element__()
    return value if isinstance(value, ClauseElement) else None


def _reads_records(clause: ClauseElement, own: set[Any], tables: Mapping[Any, Any]) -> bool:
    """Whether ``clause`` reads a declared resource's table other than as its own row's columns."""
    found = find_tables(
        clause, check_columns=True, include_aliases=True, include_joins=True, include_selects=True
    )
    for source in found:
        if source in own:
            continue
        inner = (
            [source]
            if isinstance(source, TableClause)
            else find_tables(source, check_columns=True, include_aliases=True)
        )
        if any(table in tables for table in inner):
            return True
    return False


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
