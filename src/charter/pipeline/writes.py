"""Committing a call: the handler's changes and the gate's own writes, in each dialect's form.

The gate's writes (audit entries, the stored outcome, later ledger movements)
are collected in :class:`~charter.pipeline.call.Writes` by the stages and
committed here, once, with the handler's changes:

* **PostgreSQL, plain case**: the target's ``UPDATE`` carries the audit
  ``INSERT`` and the stored outcome as data-modifying CTEs — one statement,
  so an audited, keyed call costs the round trips of a hand-written one
  (benchmarks/gate_overhead.py). It applies when the target is the only
  changed object, nothing was flushed before, and its mapper is plain (no
  version counter, update hooks or onupdate defaults);
* **PostgreSQL otherwise**: the ORM flush, then the audit entry and the outcome
  in one statement;
* **SQLite**: the ORM flush, then one ``INSERT`` each (writers are serialized
  by ``BEGIN IMMEDIATE``; there are no round trips to save).

:class:`Committer` chooses the form; it is picked once per :class:`Runtime`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, bindparam, insert, update
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from ..audit.entry import ENTRY_INSERT, AuditEntry, audit_table
from ..audit.trail import AuditLease, write_links
from ..errors import StorageError
from ..idempotency.store import completion_statement
from ..resources import ResourceSpec
from ..storage import translate_errors
from .call import Call
from .runtime import Runtime
from .tenancy import TenantGuard

__all__ = ["Committer", "finish"]


class Committer:
    """Commits a call's writes with its effect (see the module docstring)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._folds: dict[tuple[str, tuple[str, ...], int, bool], Any] = {}

    def commit(self, call: Call) -> None:
        """Write everything the call collected, then COMMIT: all of it lands, or none."""
        session, lease, writes = call.session, call.lease, call.writes
        assert session is not None  # set by the runner
        assert lease is not None
        for statement in writes.before:
            session.execute(statement)
        if not self._fold(call, session, lease):
            session.flush()
            self.write(session, lease, writes.entries, writes.outcome, call.connection)
        finish(session, lease)

    def write(
        self,
        session: Session,
        lease: AuditLease,
        entries: Sequence[AuditEntry],
        outcome: dict[str, Any] | None,
        connection: Connection | None = None,
    ) -> None:
        """Seal and insert ``entries`` and the stored ``outcome`` in the session's transaction.

        ``connection``: the session's own, when the caller already holds it.
        """
        rows = lease.seal(entries)
        connection = connection or session.connection()
        if self.runtime.postgres and outcome is not None and len(rows) == 1:
            # One round trip: the outcome INSERT carries the entry's as a CTE.
            connection.execute(completion_statement(with_audit=True), {**outcome, **_a(rows[0])})
        else:
            if rows:
                connection.execute(ENTRY_INSERT, rows[0] if len(rows) == 1 else rows)
            if outcome is not None:
                connection.execute(completion_statement(), outcome)
        write_links(connection, rows)

    def alone(self, entry: AuditEntry) -> None:
        """Append one entry on its own, outside any call's transaction (replays, refusals).

        PostgreSQL: one autocommit INSERT (one round trip). SQLite: a short write
        transaction (``BEGIN IMMEDIATE``), as every SQLite write.
        """
        runtime = self.runtime
        if runtime.postgres:
            with translate_errors(), runtime.autocommit.connect() as connection:
                runtime.audit_trail.write_alone(connection, [entry])
            return
        with self.transaction() as (session, lease):
            self.write(session, lease, [entry], None)

    @contextmanager
    def audited_read(self) -> Iterator[tuple[Connection, list[AuditEntry]]]:
        """A read outside any transaction, then the entries the caller appended for it.

        The read needs no transaction: it is one statement, and what it returns
        is given to the caller only once its entries are written (an error
        inside the block writes none). PostgreSQL: the entries go on the read's
        own autocommit connection (one INSERT, no BEGIN or COMMIT). SQLite: in a
        short write transaction, after the read's connection is closed (writing
        on it would upgrade a read lock, which ``BEGIN IMMEDIATE`` exists to avoid).
        """
        runtime = self.runtime
        entries: list[AuditEntry] = []
        with runtime.reading() as connection:
            yield connection, entries
            if runtime.postgres:
                runtime.audit_trail.write_alone(connection, entries)
        if not runtime.postgres and entries:
            with self.transaction() as (session, lease):
                self.write(session, lease, entries, None)

    @contextmanager
    def transaction(self) -> Iterator[tuple[Session, AuditLease]]:
        """A short write transaction of its own, with its own audit lease; COMMIT at the end.

        For the writes outside a call's transaction: a refusal's entry, a list's entry.
        """
        lease = self.runtime.audit_trail.lease()
        try:
            with self.runtime.write_session() as session:
                yield session, lease
                finish(session, lease)
        finally:
            lease.rolled_back()

    def _fold(self, call: Call, session: Session, lease: AuditLease) -> bool:
        """The plain case: the record's UPDATE in Core, no unit of work.

        On PostgreSQL the UPDATE carries the other writes as CTEs (one statement);
        SQLite has no data-modifying CTEs, so they follow it, each one INSERT.
        """
        record, resource, writes = call.record, call.spec.resource, call.writes
        if (
            record is None
            or resource is None
            or len(writes.entries) > 1
            or session.new
            or session.deleted
            or TenantGuard.wrote(session)
            or len(session.dirty) != 1
            or record not in session.dirty
        ):
            return False
        state = sa_inspect(record)
        changed = tuple(sorted(state.committed_state))
        postgres = self.runtime.postgres
        audited = len(writes.entries) if lease.seals and postgres else 0
        outcome = writes.outcome is not None and postgres
        key = (resource.name, changed, audited, outcome)
        statement = self._folds.get(key)
        if statement is None:
            statement = self._folds[key] = _folded_update(resource, changed, audited, outcome)
        if statement is False:
            return False
        rows = lease.seal(writes.entries) if postgres else []
        params: dict[str, Any] = _a(rows[0]) if rows else {}
        params.update({f"r_{name}": getattr(record, name) for name in changed})
        params["r_pk"] = getattr(record, resource.id)
        if outcome:
            params.update(writes.outcome or {})
        # On the connection, not the session: a session execute would autoflush the
        # very change this statement carries.
        connection = call.connection or session.connection()
        result = connection.execute(statement, params)
        if getattr(result, "rowcount", 1) != 1:
            raise StorageError("The record changed under its lock; nothing was written.")
        for name in changed:  # the row now holds these values: the ORM has nothing to flush
            set_committed_value(record, name, getattr(record, name))
        # ... and nothing to look at: left in the session, the record stays flagged as
        # modified and COMMIT would run a whole (empty) unit of work over it.
        session.expunge(record)
        if not postgres:
            self.write(session, lease, writes.entries, writes.outcome, connection)
        return True


def finish(session: Session, lease: AuditLease) -> None:
    """COMMIT, and tell the lease how it went (an unknown fate abandons its stream)."""
    try:
        session.commit()
    except BaseException:
        lease.abandon()  # the COMMIT's fate is unknown: never reuse this stream
        raise
    lease.committed()


def _a(row: dict[str, Any]) -> dict[str, Any]:
    return {f"a_{name}": value for name, value in row.items()}


def _folded_update(
    resource: ResourceSpec, changed: tuple[str, ...], audited: int, outcome: bool
) -> Any:
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
        or (outcome and not audited)  # the outcome reads its scope from the entry
    ):
        return False
    columns = {}
    for name in changed:
        prop = mapper.column_attrs.get(name) if name in mapper.column_attrs else None
        if prop is None or len(prop.columns) != 1:
            return False
        column = prop.columns[0]
        if column.onupdate is not None or column.server_onupdate is not None:
            return False
        columns[column.name] = bindparam(f"r_{name}", type_=column.type)
    pk = resource.column(resource.id)
    stmt = update(mapper.local_table).where(pk == bindparam("r_pk")).values(columns)
    if audited:
        entry_columns = [c for c in audit_table.c if c.name != "id"]
        stmt = stmt.add_cte(
            insert(audit_table)
            .values({c.name: bindparam(f"a_{c.name}", type_=c.type) for c in entry_columns})
            .cte("charter_entry")
        )
    if outcome:
        stmt = stmt.add_cte(completion_statement(beside_audit=True).cte("charter_outcome"))
    return stmt
