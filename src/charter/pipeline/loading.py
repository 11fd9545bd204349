"""Loading a call's records: tenant-scoped, locked, built once, and cheap on the hot path.

Every call loads its target, so the load is the gate's hottest statement. The
ORM's ``session.execute(select(Model))`` costs about 80-180 µs more per call
than executing the same statement in Core (benchmarks/RESULTS.md): ORM
compilation context, loading options, row processing. For a *plain* mapper —
one table, no inheritance, no deferred columns, no eager relationships, no
``load``/``refresh`` events — the gate executes the Core statement and adopts
the row as a persistent instance (``make_transient_to_detached`` then
``session.add``: public SQLAlchemy API, no SQL). The handler receives an
ordinary mapped instance: its changes are flushed, its lazy relationships
load, and the session's identity map holds it. Any other mapper takes the ORM
path, so nothing the application declared on it is skipped.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Result, Select, bindparam, exists, literal_column, select, true
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import Session, make_transient_to_detached
from sqlalchemy.orm.base import instance_state

from ..idempotency.store import claim_insert, claim_or_taken, lookup
from ..resources import ResourceSpec
from .tenancy import SCOPED, loaded_in_tenant

__all__ = ["Adopter", "Loader"]

_EAGER = {"joined", "selectin", "subquery", "immediate"}


class Adopter:
    """Turns Core rows of one plain mapper into persistent instances of a session."""

    def __init__(self, model: type[Any]) -> None:
        mapper: Any = sa_inspect(model)
        self._mapper = mapper
        self.plain = _plain(mapper)
        props = list(mapper.column_attrs)
        self._keys = [prop.key for prop in props]
        #: The columns to select, in the order :meth:`adopt` reads them.
        self.columns = [prop.columns[0] for prop in props]
        #: Where the primary key is among :attr:`columns`.
        self.pk_index = self._keys.index(mapper.primary_key[0].key) if self.plain else 0
        #: A result column's key -> the attribute it loads (``select(model)`` run in Core).
        self._attribute = {prop.columns[0].key: prop.key for prop in props}

    def adopt(self, session: Session, row: Any) -> Any:
        """The instance for ``row``: the session's own if it holds it, else a new persistent one."""
        identity = self._mapper.identity_key_from_primary_key((row[self.pk_index],))
        existing = session.identity_map.get(identity)
        if existing is not None:  # already in this session: the same object, as the ORM does
            loaded_in_tenant(session, existing)  # the row was read in the tenant (its SQL says)
            return existing
        record = self._mapper.class_manager.new_instance()
        record.__dict__.update(zip(self._keys, row, strict=True))
        make_transient_to_detached(record)  # as if freshly loaded: no history, key set
        session.add(record)  # persistent, no SQL
        loaded_in_tenant(session, record)
        return record

    def detached(self, result: Result[Any]) -> list[Any]:
        """The rows of ``select(model)`` run in Core, as detached instances (a list's page).

        What the ORM leaves after loading the rows and closing its session:
        loaded column attributes, no history, the identity key set, no session.
        ``make_transient_to_detached`` would do the same at 1.5x the cost of
        the ORM's own load (it computes each key through the mapper and expires
        the attributes it did not load); a new instance has nothing to commit or
        expire, so only the key is set, from the mapper's public
        ``identity_key_from_primary_key``.
        """
        columns = result.keys()  # a Result's column keys, in the rows' order
        keys = [self._attribute[key] for key in columns]
        pk = keys.index(self._keys[self.pk_index])
        new = self._mapper.class_manager.new_instance
        identity = self._mapper.identity_key_from_primary_key
        records = []
        for row in result.all():  # one fetchall: iterating fetches row by row
            record = new()
            record.__dict__.update(zip(keys, row, strict=True))
            instance_state(record).key = identity((row[pk],))
            records.append(record)
        return records


class Loader:
    """One tenant-scoped lookup of one resource (by its id or a unique column), built once.

    ``lock``: ``SELECT ... FOR UPDATE`` (PostgreSQL, mutating actions).
    ``claim``: the statement also claims an idempotency key (a data-modifying CTE
    whose parameters are ``c_<column>``; see :mod:`charter.idempotency.claims`).
    Parameters: ``t_id`` (the locator) and ``c_tenant`` (the actor's tenant).
    """

    def __init__(
        self, resource: ResourceSpec, *, by: str | None, lock: bool, claim: bool = False
    ) -> None:
        self.resource = resource
        self._adopter = adopter = Adopter(resource.model)
        stmt: Select[Any] = select(*adopter.columns) if adopter.plain else select(resource.model)
        # Parameter names must not match a column of the claim's INSERT (SQLAlchemy would add it).
        stmt = stmt.where(resource.column(by or resource.id) == bindparam("t_id"))
        if resource.tenant is not None:
            # Tenant isolation is part of the lookup itself: a record of another
            # tenant is indistinguishable from a record that does not exist.
            stmt = stmt.where(resource.column(resource.tenant) == bindparam("c_tenant"))
        if lock:
            table = sa_inspect(resource.model).local_table
            stmt = stmt.with_for_update(of=table if adopter.plain else resource.model)
        self._width = len(adopter.columns)
        self._folded = claim and adopter.plain
        self._by = by
        self._key_statement: Select[Any] | None = None
        if self._folded:
            stmt = self._claiming(stmt)
        elif claim:
            stmt = stmt.add_cte(claim_insert().cte("charter_claim"))
        self.statement = stmt.execution_options(**{SCOPED: True})

    def _claiming(self, target: Select[Any]) -> Select[Any]:
        """The target's locked load and the key's claim, in one statement (PostgreSQL).

        ``WITH charter_claim AS (INSERT … ON CONFLICT DO NOTHING RETURNING id)
        SELECT target, claimed FROM (SELECT claimed) LEFT JOIN (SELECT … FOR
        UPDATE, if claimed) ON true``: always one row. A first execution gets
        its claim inserted and its record locked; a retry of a taken key
        inserts nothing and locks nothing
        (:func:`~charter.idempotency.store.claim_or_taken`).
        """
        claim, claimed = claim_or_taken()
        mine = exists(select(literal_column("1")).select_from(claim))
        locked = target.where(mine).subquery("charter_target")
        claims = select(claimed.label("k_claimed")).subquery("k")
        joined = claims.outerjoin(locked, true())
        return select(*locked.c, claims.c.k_claimed).select_from(joined).add_cte(claim)

    def load(
        self, session: Session, params: dict[str, Any], connection: Connection | None = None
    ) -> Any:
        """The record, attached to ``session``, or ``None`` if the tenant has no such record.

        ``connection``: the session's own, when the caller already holds it.
        """
        if not self._adopter.plain:
            record = session.execute(self.statement, params).scalar_one_or_none()
            if record is not None:
                loaded_in_tenant(session, record)
            return record
        row = (connection or session.connection()).execute(self.statement, params).first()
        return None if row is None else self._adopter.adopt(session, row)

    def primary_key(
        self, session: Session, params: dict[str, Any], connection: Connection | None = None
    ) -> Any:
        """The primary key of the record the locator finds, tenant-scoped and unlocked (None:
        no such record): a record located by another column is then locked by its key."""
        if self._key_statement is None:
            resource = self.resource
            stmt = select(resource.column(resource.id)).where(
                resource.column(self._by or resource.id) == bindparam("t_id")
            )
            if resource.tenant is not None:
                stmt = stmt.where(resource.column(resource.tenant) == bindparam("c_tenant"))
            self._key_statement = stmt.execution_options(**{SCOPED: True})
        connection = connection or session.connection()
        return connection.execute(self._key_statement, params).scalar_one_or_none()

    def claim(
        self, session: Session, params: dict[str, Any], connection: Connection | None = None
    ) -> tuple[Any, bool, Any]:
        """Claim and load (``claim=True``): (the record or None, whether this call took the
        key, the claim that holds it instead with its stored outcome, read in this transaction)."""
        if not self._folded:  # a mapper the ORM loads: the claim's INSERT raises if taken
            return self.load(session, params, connection), True, None
        connection = connection or session.connection()
        row = connection.execute(self.statement, params).one()
        width = self._width
        if row[width] is None:  # k_claimed: the key was taken, and nothing written or locked
            return None, False, lookup(connection, params["c_tenant"], params["c_subject"],
                                       params["c_key"])  # fmt: skip
        if row[self._adopter.pk_index] is None:
            return None, True, None
        return self._adopter.adopt(session, row[:width]), True, None


def _plain(mapper: Any) -> bool:
    """Whether a Core row can stand for an ORM load of this mapper (see the module docstring)."""
    manager = mapper.class_manager
    return bool(
        mapper.inherits is None
        and mapper.polymorphic_on is None
        and len(list(mapper.self_and_descendants)) == 1
        and mapper.version_id_col is None
        and not manager.dispatch.load
        and not manager.dispatch.refresh
        and all(
            len(prop.columns) == 1
            and not prop.deferred
            and prop.columns[0].table is mapper.local_table
            for prop in mapper.column_attrs
        )
        and all(rel.lazy not in _EAGER for rel in mapper.relationships)
    )
