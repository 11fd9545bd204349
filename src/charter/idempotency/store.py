"""Where idempotency records live: the claim and outcome tables, their statements, a replay cache.

The semantics (what a key is, what its scope and fingerprint are) are in
:mod:`charter.idempotency.keys`; the gate's use of these statements is in
:mod:`charter.idempotency.claims`.
"""

from __future__ import annotations

import functools
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    bindparam,
    delete,
    exists,
    insert,
    literal_column,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Row
from sqlalchemy.orm import Session
from sqlalchemy.types import JSON

from ..audit.entry import audit_table
from ..errors import CharterError
from ..storage import metadata
from .keys import MAX_KEY_LENGTH

__all__ = [
    "OutcomeCache",
    "Scope",
    "StoredOutcome",
    "claim_id_statement",
    "claim_insert",
    "claim_or_taken",
    "claim_statement",
    "claim_values",
    "completion_params",
    "completion_statement",
    "idempotency_table",
    "lookup",
    "not_completed",
    "outcome_table",
    "purge",
    "release_statement",
    "stored_error",
]

idempotency_table = Table(
    "charter_idempotency",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("tenant", String(128), nullable=False),
    Column("subject", String(128), nullable=False),
    Column("key", String(MAX_KEY_LENGTH), nullable=False),
    Column("fingerprint", String(64), nullable=False),
    Column("action", String(128), nullable=False),
    Column("phase", Integer, nullable=False, default=0),
    Column("recovery", JSON, nullable=True),
    Column("request_input", Text, nullable=True),
    Column("locked_until", DateTime(timezone=True), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("tenant", "subject", "key", name="uq_charter_idempotency_scope"),
    # BRIN on PostgreSQL: rows arrive in expiry order, and a BRIN summary costs an
    # insert almost nothing where a b-tree entry cost every keyed call a visible
    # share (benchmarks/RESULTS.md); the purge sweep still finds expired rows fast.
    Index("ix_charter_idempotency_expiry", "expires_at", postgresql_using="brin"),
)

# The outcome lives in its own table, written once by an INSERT. Updating the
# claim row that the same transaction had just inserted left a dead tuple per
# call, and the pruning it needed made long runs' keyed calls ~50% slower on
# PostgreSQL (benchmarks/RESULTS.md). A claim is completed when its outcome exists.
#
# Keyed by the scope, like the claim, not by the claim's id: the gate then needs
# no ``RETURNING id`` from the claim (whose cost showed in benchmarks/RESULTS.md),
# and on PostgreSQL the outcome's scope comes from the audit entry's own
# parameters (see completion_statement).
outcome_table = Table(
    "charter_idempotency_outcomes",
    metadata,
    # No foreign key on purpose: its check takes a KEY SHARE lock on the claim row,
    # which marks that tuple just as the UPDATE did. Only the gate writes here, under
    # the scope it claimed in the same transaction; purge deletes both sides.
    Column("tenant", String(128), nullable=False),
    Column("subject", String(128), nullable=False),
    Column("key", String(MAX_KEY_LENGTH), nullable=False),
    Column("resource_id", String(128), nullable=True),
    # The record's version after the call: a replay answers the original ETag.
    Column("version", Integer, nullable=True),
    # The charged account's balance after the call: a replay answers the original balance.
    Column("balance", BigInteger, nullable=True),
    Column("response_status", Integer, nullable=False),
    Column("response_body", JSON, nullable=True),
    Column("error", JSON, nullable=True),
    Column("outcome", String(64), nullable=False),
    Column("completed_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("tenant", "subject", "key", name="pk_charter_idempotency_outcomes"),
)

#: The scope of a key: (tenant, subject, key).
Scope = tuple[str, str, str]


@dataclass(frozen=True, slots=True)
class StoredOutcome:
    """A completed request's outcome, as replayed."""

    fingerprint: str
    action: str
    status: int
    body: Any
    error: dict[str, Any] | None
    outcome: str
    resource_id: str | None
    expires_at: datetime
    version: int | None = None
    balance: int | None = None

    @classmethod
    def from_row(cls, row: Row[Any]) -> StoredOutcome:
        return cls(
            fingerprint=row.fingerprint,
            action=row.action,
            status=int(row.response_status),
            body=row.response_body,
            error=dict(row.error) if row.error else None,
            outcome=str(row.outcome),
            resource_id=row.resource_id,
            expires_at=_aware(row.expires_at),
            version=row.version,
            balance=None if row.balance is None else int(row.balance),
        )


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


# A cached outcome, packed as a tuple of strings, ints and a datetime only: the
# garbage collector stops tracking such tuples, so a full cache adds nothing to
# every collection (a cache of dicts made long runs' first executions ~50% slower).
_Packed = tuple[str, str, int, str, str | None, str, str | None, datetime, int | None, int | None]


class OutcomeCache:
    """Completed outcomes this process has seen, so that a replay needs no lookup.

    Safe because a completed record never changes: it is only deleted after it
    expires, and entries here expire at the same moment. Bounded in count (LRU)
    and in body size; a miss falls back to the database, so several instances
    need no coordination. Bodies are kept as JSON text, so every replay gets its
    own copy and no caller can alter what the next one sees.
    """

    def __init__(self, *, max_entries: int = 10_000, max_body_bytes: int = 64 * 1024) -> None:
        self._entries: OrderedDict[tuple[str, str, str], _Packed] = OrderedDict()
        self._lock = threading.Lock()
        self.max_entries = max_entries
        self.max_body_bytes = max_body_bytes

    def get(self, scope: tuple[str, str, str], now: datetime) -> StoredOutcome | None:
        with self._lock:
            packed = self._entries.get(scope)
            if packed is None:
                return None
            if packed[7] <= now:
                del self._entries[scope]
                return None
            self._entries.move_to_end(scope)
        fp, action, status, body, error, outcome, resource_id, expires_at, version, balance = packed
        return StoredOutcome(
            fp, action, status, json.loads(body), json.loads(error) if error else None,
            outcome, resource_id, expires_at, version, balance,
        )  # fmt: skip

    def put(self, scope: tuple[str, str, str], stored: StoredOutcome) -> None:
        if self.max_entries <= 0:
            return
        body = json.dumps(stored.body, default=str)
        if len(body) > self.max_body_bytes:
            return
        error = json.dumps(stored.error, default=str) if stored.error else None
        packed: _Packed = (
            stored.fingerprint, stored.action, stored.status, body, error, stored.outcome,
            stored.resource_id, stored.expires_at, stored.version, stored.balance,
        )  # fmt: skip
        with self._lock:
            self._entries[scope] = packed
            self._entries.move_to_end(scope)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)


def claim_statement(dialect: str, values: dict[str, Any]) -> Any:
    """``INSERT ... ON CONFLICT DO NOTHING RETURNING id``: no row if the key is taken."""
    insert_fn = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return (
        insert_fn(idempotency_table)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["tenant", "subject", "key"])
        .returning(idempotency_table.c.id)
    )


CLAIM_COLUMNS = (
    "tenant", "subject", "key", "fingerprint", "action", "created_at", "expires_at",
)  # fmt: skip


def claim_insert() -> Any:
    """The gate's claim: a plain INSERT with bound parameters ``c_<column>``.

    Plain, not ``ON CONFLICT DO NOTHING``: a taken key is rare (a duplicate),
    answered by the unique violation. A concurrent duplicate's INSERT waits on
    the holder's uncommitted index entry either way. (PostgreSQL's
    claim-and-load uses :func:`claim_or_taken` instead: prepared, speculative
    insertion measured the same as this INSERT there, 2026-12-01.)
    """
    t = idempotency_table
    values: dict[str, Any] = {
        name: bindparam(f"c_{name}", type_=t.c[name].type) for name in CLAIM_COLUMNS
    }
    values["phase"] = literal_column("0")  # a new claim is in its first phase
    return insert(t).values(values)


def claim_or_taken() -> tuple[Any, Any]:
    """The claim for a statement that also says whether it took the key (PostgreSQL).

    Returns ``charter_claim``, ``INSERT … ON CONFLICT DO NOTHING RETURNING
    id`` as a CTE, and ``claimed``, a scalar subquery: that id, or NULL when
    the key was already taken. A taken key no longer aborts the transaction
    with a unique violation (then a ROLLBACK, on which psycopg drops every
    prepared statement of the connection, and a lookup on another): the claim
    is read in the same transaction (:func:`lookup`), which then commits, having
    written nothing. A concurrent duplicate not yet committed is waited for, as
    by a plain INSERT. Parameters: ``c_<column>``.
    """
    t = idempotency_table
    values: dict[str, Any] = {
        name: bindparam(f"c_{name}", type_=t.c[name].type) for name in CLAIM_COLUMNS
    }
    values["phase"] = literal_column("0")  # a new claim is in its first phase
    claim = (
        postgresql.insert(t)
        .values(values)
        .on_conflict_do_nothing(index_elements=["tenant", "subject", "key"])
        .returning(t.c.id)
        .cte("charter_claim")
    )
    return claim, select(claim.c.id).scalar_subquery()


def claim_values(
    *,
    tenant: str,
    subject: str,
    key: str,
    fp: str,
    action: str,
    now: datetime,
    retention: timedelta,
) -> dict[str, Any]:
    return {
        "tenant": tenant,
        "subject": subject,
        "key": key,
        "fingerprint": fp,
        "action": action,
        "phase": 0,
        "created_at": now,
        "expires_at": now + retention,
    }


_OUTCOME_COLUMNS = (
    "resource_id", "version", "balance", "response_status", "response_body", "error", "outcome",
    "completed_at",
)  # fmt: skip

# The stored outcome's columns that its call's audit entry carries too, by the
# entry's column name: what the call did, to which record, when, under which key.
_FROM_AUDIT = {
    "tenant": "tenant", "subject": "subject", "key": "idempotency_key",
    "resource_id": "resource_id", "outcome": "outcome", "completed_at": "at",
}  # fmt: skip


def completion_params(
    scope: Scope,
    *,
    status: int,
    body: Any,
    error: dict[str, Any] | None,
    outcome: str,
    resource_id: str | None,
    now: datetime,
    version: int | None = None,
    balance: int | None = None,
) -> dict[str, Any]:
    """Parameters of :func:`completion_statement`: the outcome stored under a claim."""
    tenant, subject, key = scope
    values = {
        "tenant": tenant, "subject": subject, "key": key, "response_status": status,
        "response_body": body, "error": error, "outcome": outcome, "resource_id": resource_id,
        "completed_at": now, "version": version, "balance": balance,
    }  # fmt: skip
    return {f"u_{name}": value for name, value in values.items()}


@functools.cache
def completion_statement(*, with_audit: bool = False, beside_audit: bool = False) -> Any:
    """The outcome INSERT, built once with bound parameters (it is on every keyed call).

    ``with_audit=True`` (PostgreSQL) folds the audit entry's INSERT into the same
    statement as a data-modifying CTE, whose parameters are named ``a_<column>``.
    With it, or with ``beside_audit=True`` (the INSERT is itself a CTE beside the
    entry's), the columns the entry carries too are read from the entry's
    parameters: they are equal by construction, and each is sent once.
    """
    t = outcome_table
    shared = with_audit or beside_audit
    stmt = insert(t).values(
        {
            column.name: bindparam(
                f"a_{_FROM_AUDIT[column.name]}" if shared and column.name in _FROM_AUDIT
                else f"u_{column.name}",
                type_=column.type,
            )
            for column in t.c
        }
    )  # fmt: skip
    if with_audit:
        audited = [c for c in audit_table.c if c.name != "id"]
        entry = insert(audit_table).values(
            {c.name: bindparam(f"a_{c.name}", type_=c.type) for c in audited}
        )
        stmt = stmt.add_cte(entry.cte("charter_entry"))
    return stmt


def release_statement(scope: Scope) -> Any:
    """Forget a finished multi-phase request's input (it may hold secrets) and lease."""
    return (
        update(idempotency_table)
        .where(_claim_of(scope))
        .values(request_input=None, locked_until=None)
    )


def claim_id_statement(scope: Scope) -> Any:
    """The id of a claim, which names it in derived keys (multi-phase requests only)."""
    return select(idempotency_table.c.id).where(_claim_of(scope))


def _claim_of(scope: Scope) -> Any:
    t = idempotency_table
    tenant, subject, key = scope
    return and_(t.c.tenant == tenant, t.c.subject == subject, t.c.key == key)


def _same_scope() -> Any:
    """Join condition: an outcome and the claim it completes."""
    t, o = idempotency_table, outcome_table
    return and_(o.c.tenant == t.c.tenant, o.c.subject == t.c.subject, o.c.key == t.c.key)


def not_completed() -> Any:
    """SQL condition: the claim has no outcome yet (running, or an abandoned multi-phase one)."""
    return ~exists().where(_same_scope())


@functools.cache
def _lookup_statement() -> Any:
    """Built once: answering a taken key is on the path of every cold replay."""
    t, o = idempotency_table, outcome_table
    return (
        select(t, *[o.c[name] for name in _OUTCOME_COLUMNS])
        .select_from(t.outerjoin(o, _same_scope()))
        .where(
            t.c.tenant == bindparam("l_tenant"),
            t.c.subject == bindparam("l_subject"),
            t.c.key == bindparam("l_key"),
        )
    )


def lookup(session: Session | Connection, tenant: str, subject: str, key: str) -> Row[Any] | None:
    """The claim and, if completed, its outcome (``completed_at`` is None until then)."""
    params = {"l_tenant": tenant, "l_subject": subject, "l_key": key}
    return session.execute(_lookup_statement(), params).first()


def purge(session: Session, now: datetime) -> int:
    """Delete finished records whose retention has passed; unfinished ones are kept."""
    t, o = idempotency_table, outcome_table
    expired = select(t.c.id, t.c.tenant, t.c.subject, t.c.key).where(
        t.c.expires_at < now, ~not_completed()
    )
    rows = session.execute(expired).all()
    if not rows:
        return 0
    for start in range(0, len(rows), _PURGE_BATCH):
        batch = rows[start : start + _PURGE_BATCH]
        scopes = [(r.tenant, r.subject, r.key) for r in batch]
        session.execute(delete(o).where(tuple_(o.c.tenant, o.c.subject, o.c.key).in_(scopes)))
        session.execute(delete(t).where(t.c.id.in_([r.id for r in batch])))
    return len(rows)


_PURGE_BATCH = 500  # rows per DELETE: bounded statement size (SQLite limits parameters)


def stored_error(error: CharterError) -> dict[str, Any]:
    return {
        "code": error.code,
        "status": error.status,
        "title": error.title,
        "message": error.message,
        "attrs": _jsonable_attrs(error.attrs),
    }


def _jsonable_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in attrs.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            value = str(value)
        out[name] = value
    return out
