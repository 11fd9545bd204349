"""Gate overhead: the README's quickstart action through the gate vs. the same work by hand.

The action is the one the README's quickstart declares: ``invoice.approve`` on an
``Invoice`` (tenant, state, amount, creator, version), input model ``Approve``
(``extra="forbid"``, an optional note), the approver rule (approver role, state
``submitted``, amount within ``A.approval_limit``, not the creator),
``idempotency="optional"``, real audit keys (not the development key). It is
called without a key, with the input ``{"note": "ok"}``, by an approver of the
invoice's tenant. Every operation approves a fresh submitted invoice (so the
rule passes), on every side alike.

The sides (each op is one approval, on the same engine/database):

(gate) ``charter.execute(bob, "invoice.approve", {"note": "ok"}, target=id)``: the
    default path a user gets: validation, tenant-scoped locked load, policy,
    handler, version bump, sealed audit entry (HMAC-chained), commit. (On
    PostgreSQL the record's UPDATE carries the audit INSERT as a CTE, so the gate
    sends one statement fewer than (core); the round trips are printed.)
(core) the fastest transaction a careful developer writes by hand: SQLAlchemy
    Core, every statement built once at setup with bound parameters::

        data = Approve.model_validate(payload)
        with write_engine.begin() as conn:        # SQLite: BEGIN IMMEDIATE
            row = conn.execute(SELECT_FOR_UPDATE, {"id": id, "tenant": tenant}).one_or_none()
            <rule in Python: approver, submitted, amount <= limit, not the creator>
            conn.execute(UPDATE_STATE_VERSION_PLUS_1, {...})   # state, version = version + 1
            conn.execute(AUDIT_INSERT, entry)     # one row into charter_audit
        # entry: every column the gate fills, the input's SHA-256, a request id, and
        # hash = hmac.new(key, json.dumps(entry, sort_keys=True), sha256) chained to
        # the previous entry by (stream, seq, prev_hash)

    i.e. ``BEGIN; SELECT ... FOR UPDATE; UPDATE ... version + 1; INSERT audit;
    COMMIT``: the same rows written as the gate (one record updated, one audit
    row into the same table with the same indexes).
(orm) the same transaction hand-written with the ORM: the locked ``select(Invoice)``
    built once, attribute changes, ``session.add(<audit row mapped on
    charter_audit>)`` with the same hand-made HMAC, ``commit()``.
(old) the previous baseline, kept for continuity: ORM, the locked select rebuilt on
    every call, the state change, commit; no rule, no version bump, no audit row.
(floor) informational: the driver directly, no SQLAlchemy (psycopg on PostgreSQL,
    the ``sqlite3`` module with Charter's pragmas and ``BEGIN IMMEDIATE`` on
    SQLite), the same SQL statements and the same Python work as (core).

Figures (targets from the issue):

* ``ratio_core_pg``     median per-op time gate / core, PostgreSQL        (<= 1.6)
* ``ratio_core_sqlite`` the same on a SQLite file (WAL, Charter's pragmas) (<= 2.2)
* ``ratio_orm_pg``, ``ratio_orm_sqlite``  gate / orm (informational)
* ``ratio_pg``, ``ratio_sqlite``  gate / old: the figures reported until 2026-12-01
  (then for a counter-bump action without input, rule or idempotency)
* ``floor_us_pg`` (``floor_us_sqlite``)  median per-op time of the floor, in us
* ``concurrent_audit_ratio_pg``  8 threads approving distinct invoices, PostgreSQL:
  throughput of the gate with its audit trail / with ``charter.testing.NullAuditTrail``
  (>= 0.8); nine short runs per side, alternating, and the figure is the median of
  the ratios of adjacent on/off runs (the ratio of the medians is printed too).
  The statements each side sends are printed: with the audit trail off the gate
  should take the same statement path minus the audit INSERT.

Method. After a warm-up, all sides run interleaved op by op: each step runs
every side once, the order cycling through all permutations of the sides, so
drift (autovacuum, checkpoints, a shared VM's speed) hits every side alike; each
figure is the median of all per-op times. The ratio of the medians of per-round
means is printed alongside as a drift check. ``--quick``: the same figures with
smaller sizes (under 60 s). ``--profile``: cProfile of the gate and core paths,
with each one's own time split by package. The last line of output is one JSON
object.

PostgreSQL: ``$CHARTER_PG_URL`` (default the test server) with the database
name replaced by ``charter_bench``, created if missing, so the test database
is never touched.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import hmac
import io
import itertools
import json
import os
import pstats
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import _common
import psycopg
from pydantic import BaseModel, ConfigDict
from sqlalchemy import MetaData, Numeric, String, Table, bindparam, event, insert, select, text
from sqlalchemy import update as sa_update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from charter import Actor, Charter
from charter.migrate import upgrade
from charter.storage import WRITE_OPTION
from charter.testing import NullAuditTrail

BENCH_DB = "charter_bench"
AUDIT_KEYS = {"k1": "bench-audit-key-0123456789"}
TENANT = "acme"
ACTION = "invoice.approve"
INPUT = {"note": "ok"}
WORKERS = 8
SIDES = ("gate", "core", "orm", "old", "floor")


# -- the README's quickstart application ------------------------------------------------


class Base(DeclarativeBase):
    pass


class Invoice(Base):
    __tablename__ = "bench_gate_invoices"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    amount: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    created_by: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(default=1)


class Approve(BaseModel):
    model_config = ConfigDict(extra="forbid")  # unknown fields are an error
    note: str | None = None


def build_charter(url: str, *, audited: bool = True) -> Charter:
    """The quickstart's Charter, with real audit keys (and optionally no audit trail)."""
    charter = Charter(
        database_url=url,
        audit_keys=AUDIT_KEYS,
        audit_trail=None if audited else NullAuditTrail(),
        rate_limits=_common.rate_limits(),
    )
    charter.resource(Invoice, tenant="tenant_id", state="state", version="version")

    @charter.action(
        ACTION, on=Invoice, input=Approve, idempotency="optional", allow=_common.APPROVER_RULE
    )
    def approve(ctx: Any, invoice: Invoice, data: Approve) -> dict[str, Any]:
        invoice.state = "approved"
        return {"id": invoice.id, "state": invoice.state}

    return charter


def bench_actor() -> Actor:
    return Actor.make("bob", TENANT, roles={"approver"}, attributes={"approval_limit": 5000})


def prepare_schema(engine: Engine, rows: int) -> None:
    """Charter's tables by migration, ours by create_all; ``rows`` submitted invoices."""
    upgrade(engine)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    cols = "id, tenant_id, state, amount, created_by, version"
    vals = f"'{TENANT}', 'submitted', 1200, 'alice', 1"
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM charter_audit"))
        if engine.dialect.name == "postgresql":
            conn.execute(
                text(
                    f"INSERT INTO {Invoice.__tablename__} ({cols}) "
                    f"SELECT g, {vals} FROM generate_series(1, :n) AS g"
                ),
                {"n": rows},
            )
        else:
            conn.execute(
                text(
                    f"WITH RECURSIVE g(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM g WHERE x < :n) "
                    f"INSERT INTO {Invoice.__tablename__} ({cols}) SELECT x, {vals} FROM g"
                ),
                {"n": rows},
            )
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f"VACUUM ANALYZE {Invoice.__tablename__}"))
            conn.execute(text("VACUUM ANALYZE charter_audit"))


# -- the hand-written sides -------------------------------------------------------------


class Refused(Exception):
    """The hand-written rule said no (never happens in the benchmark)."""


def may_approve(actor: Actor, state: str, amount: Decimal, created_by: str) -> bool:
    """The approver rule, hand-written (the tenant is in the WHERE clause)."""
    return (
        "approver" in actor.roles
        and state == "submitted"
        and amount <= actor.attributes["approval_limit"]
        and created_by != actor.id
    )


class HandAudit:
    """The audit row a careful developer writes by hand into ``charter_audit``.

    Every column the gate fills; ``hash`` is an HMAC-SHA256 with a key kept outside
    the database over the entry's canonical JSON (position and previous hash
    included, so the table's ``(stream, seq)`` chain is honoured).
    """

    def __init__(self, *, action: str = ACTION, resource_type: str = Invoice.__tablename__) -> None:
        self.action, self.resource_type = action, resource_type
        self.key_id, secret = next(iter(AUDIT_KEYS.items()))
        self.key = secret.encode()
        self.stream = uuid.uuid4().hex
        self.seq = 0
        self.head = ""

    def entry(
        self, actor: Actor, resource_id: int, before: str, after: str, data: BaseModel
    ) -> dict[str, Any]:
        row: dict[str, Any] = {
            "stream": self.stream,
            "seq": self.seq + 1,
            "prev_hash": self.head,
            "key_id": self.key_id,
            "at": datetime.now(UTC),
            "tenant": actor.tenant,
            "subject": actor.id,
            "subject_kind": "user",
            "real_actor": None,
            "scopes": sorted(actor.scopes or ()),
            "channel": "http",
            "action": self.action,
            "resource_type": self.resource_type,
            "resource_id": str(resource_id),
            "reason": None,
            "decision": "allow",
            "rule": ACTION,
            "outcome": "ok",
            "request_id": os.urandom(16).hex(),
            "idempotency_key": None,
            "replayed": False,
            "state_before": before,
            "state_after": after,
            "input_digest": hashlib.sha256(data.model_dump_json().encode()).hexdigest(),
            "detail": None,
        }
        message = json.dumps(row, sort_keys=True, separators=(",", ":"), default=str).encode()
        row["hash"] = hmac.new(self.key, message, hashlib.sha256).hexdigest()
        return row

    def committed(self, row: dict[str, Any]) -> None:
        self.seq, self.head = row["seq"], row["hash"]


def reflect_audit(engine: Engine) -> Table:
    """``charter_audit`` as the database has it (created by charter.migrate)."""
    return Table("charter_audit", MetaData(), autoload_with=engine)


class Handwritten:
    """Statements and mappings of the hand-written sides, built once per engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.write_engine = engine.execution_options(**{WRITE_OPTION: True})
        t = Invoice.__table__
        self.audit_table = reflect_audit(engine)
        self.select_locked = (
            select(t.c.id, t.c.state, t.c.amount, t.c.created_by, t.c.version)
            .where(t.c.id == bindparam("id"), t.c.tenant_id == bindparam("tenant"))
            .with_for_update()
        )
        self.update = (
            sa_update(t)
            .where(t.c.id == bindparam("b_id"))
            .values(state=bindparam("b_state"), version=t.c.version + 1)
        )
        self.audit_insert = insert(self.audit_table).inline()
        self.orm_select = (
            select(Invoice)
            .where(Invoice.id == bindparam("id"), Invoice.tenant_id == bindparam("tenant"))
            .with_for_update()
        )

        class AuditBase(DeclarativeBase):  # its own registry: Base.metadata stays ours
            pass

        self.AuditRow: Any = type("AuditRow", (AuditBase,), {"__table__": self.audit_table})
        self.sessions = sessionmaker(self.write_engine, expire_on_commit=False)


def core_op(hw: Handwritten, actor: Actor) -> Callable[[int], None]:
    audit = HandAudit()
    select_locked, update, audit_insert = hw.select_locked, hw.update, hw.audit_insert
    begin = hw.write_engine.begin
    tenant = actor.tenant

    def op(item_id: int) -> None:
        data = Approve.model_validate(INPUT)
        with begin() as conn:
            row = conn.execute(select_locked, {"id": item_id, "tenant": tenant}).one_or_none()
            if row is None or not may_approve(actor, row.state, row.amount, row.created_by):
                raise Refused(item_id)
            conn.execute(update, {"b_id": item_id, "b_state": "approved"})
            entry = audit.entry(actor, item_id, row.state, "approved", data)
            conn.execute(audit_insert, entry)
        audit.committed(entry)

    return op


def orm_op(hw: Handwritten, actor: Actor) -> Callable[[int], None]:
    audit = HandAudit()
    sessions, stmt, AuditRow = hw.sessions, hw.orm_select, hw.AuditRow
    tenant = actor.tenant

    def op(item_id: int) -> None:
        data = Approve.model_validate(INPUT)
        with sessions() as s:
            inv = s.execute(stmt, {"id": item_id, "tenant": tenant}).scalar_one_or_none()
            if inv is None or not may_approve(actor, inv.state, inv.amount, inv.created_by):
                raise Refused(item_id)
            before = inv.state
            inv.state = "approved"
            inv.version += 1
            entry = audit.entry(actor, item_id, before, inv.state, data)
            s.add(AuditRow(**entry))
            s.commit()
        audit.committed(entry)

    return op


def old_op(hw: Handwritten, actor: Actor) -> Callable[[int], None]:
    """The baseline of the figures reported until 2026-11-22 (ratio_pg, ratio_sqlite)."""
    sessions = sessionmaker(hw.write_engine, expire_on_commit=False)
    tenant = actor.tenant

    def op(item_id: int) -> None:
        with sessions() as s:
            row = s.execute(
                select(Invoice)
                .where(Invoice.id == item_id, Invoice.tenant_id == tenant)
                .with_for_update()
            ).scalar_one()
            row.state = "approved"
            s.commit()

    return op


AUDIT_COLUMNS = (
    "stream",
    "seq",
    "prev_hash",
    "hash",
    "key_id",
    "at",
    "tenant",
    "subject",
    "subject_kind",
    "real_actor",
    "scopes",
    "channel",
    "action",
    "resource_type",
    "resource_id",
    "reason",
    "decision",
    "rule",
    "outcome",
    "request_id",
    "idempotency_key",
    "replayed",
    "state_before",
    "state_after",
    "input_digest",
    "detail",
)
T = Invoice.__tablename__
PG_SELECT = (
    f"SELECT id, state, amount, created_by, version FROM {T} "
    "WHERE id = %(id)s AND tenant_id = %(tenant)s FOR UPDATE"
)
PG_UPDATE = f"UPDATE {T} SET state = %(state)s, version = version + 1 WHERE id = %(id)s"
PG_AUDIT = (
    f"INSERT INTO charter_audit ({', '.join(AUDIT_COLUMNS)}) VALUES ("
    + ", ".join(f"%({c})s" for c in AUDIT_COLUMNS)
    + ")"
)
SQ_SELECT = f"SELECT id, state, amount, created_by, version FROM {T} WHERE id = ? AND tenant_id = ?"
SQ_UPDATE = f"UPDATE {T} SET state = ?, version = version + 1 WHERE id = ?"
SQ_AUDIT = (
    f"INSERT INTO charter_audit ({', '.join(AUDIT_COLUMNS)}) VALUES "
    f"({', '.join('?' for _ in AUDIT_COLUMNS)})"
)


def pg_floor_op(url: str, actor: Actor) -> tuple[Callable[[int], None], Callable[[], None]]:
    """psycopg directly: the same statements and Python work as (core), no SQLAlchemy."""
    u = make_url(url)
    conn = psycopg.connect(
        host=u.host, port=u.port, user=u.username, password=u.password, dbname=u.database,
        options="-c lock_timeout=10000",
    )  # fmt: skip
    audit = HandAudit()
    tenant = actor.tenant
    dumps = json.dumps

    def op(item_id: int) -> None:
        data = Approve.model_validate(INPUT)
        with conn.transaction():
            row = conn.execute(PG_SELECT, {"id": item_id, "tenant": tenant}).fetchone()
            if row is None or not may_approve(actor, row[1], row[2], row[3]):
                raise Refused(item_id)
            conn.execute(PG_UPDATE, {"id": item_id, "state": "approved"})
            entry = audit.entry(actor, item_id, row[1], "approved", data)
            params = dict(entry, scopes=dumps(entry["scopes"]))
            conn.execute(PG_AUDIT, params)
        audit.committed(entry)

    return op, conn.close


def sqlite_floor_op(path: str, actor: Actor) -> tuple[Callable[[int], None], Callable[[], None]]:
    """The sqlite3 module directly, with Charter's pragmas and BEGIN IMMEDIATE."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    for pragma in (
        "foreign_keys=ON",
        "busy_timeout=30000",
        "journal_mode=WAL",
        "synchronous=NORMAL",
    ):
        conn.execute(f"PRAGMA {pragma}")
    audit = HandAudit()
    tenant = actor.tenant
    dumps = json.dumps

    def op(item_id: int) -> None:
        data = Approve.model_validate(INPUT)
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute(SQ_SELECT, (item_id, tenant)).fetchone()
            if row is None or not may_approve(actor, row[1], Decimal(row[2]), row[3]):
                raise Refused(item_id)
            conn.execute(SQ_UPDATE, ("approved", item_id))
            entry = audit.entry(actor, item_id, row[1], "approved", data)
            params = [entry[c] for c in AUDIT_COLUMNS]
            params[AUDIT_COLUMNS.index("at")] = entry["at"].isoformat(" ")
            params[AUDIT_COLUMNS.index("scopes")] = dumps(entry["scopes"])
            conn.execute(SQ_AUDIT, params)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        audit.committed(entry)

    return op, conn.close


def gate_op(charter: Charter, actor: Actor) -> Callable[[int], None]:
    execute = charter.execute

    def op(item_id: int) -> None:
        execute(actor, ACTION, INPUT, target=item_id)

    return op


class Ids:
    """Fresh invoice ids (each op approves a submitted invoice no one touched yet)."""

    def __init__(self, first: int, last: int) -> None:
        self.next, self.last = first, last
        self.lock = threading.Lock()

    def take(self, n: int) -> list[int]:
        with self.lock:
            start = self.next
            self.next += n
        if self.next - 1 > self.last:
            raise RuntimeError(f"out of fresh invoices (rows up to {self.last})")
        return list(range(start, start + n))

    def one(self) -> int:
        return self.take(1)[0]


@dataclass
class PairResult:
    us: dict[str, float]
    round_us: dict[str, float]  # the median of per-round means (drift check)

    def ratio(self, a: str, b: str) -> float:
        return self.us[a] / self.us[b]

    def round_ratio(self, a: str, b: str) -> float:
        return self.round_us[a] / self.round_us[b]


def measure(
    ops: dict[str, Callable[[int], None]], ids: Ids, rounds: int, per_round: int, warmup: int
) -> PairResult:
    for op in ops.values():
        for i in ids.take(warmup):
            op(i)
    orders = list(itertools.permutations(ops))
    per_op, means = _common.interleave(ops, orders, rounds, per_round, ids.take)
    return PairResult(
        us={s: statistics.median(v) * 1e6 for s, v in per_op.items()},
        round_us={s: statistics.median(v) * 1e6 for s, v in means.items()},
    )


# -- concurrency ------------------------------------------------------------------------


def throughput(charter: Charter, seconds: float, ids: Ids) -> float:
    """Ops/s of WORKERS threads, each approving fresh invoices."""
    barrier = threading.Barrier(WORKERS + 1)
    counts = [0] * WORKERS
    errors: list[BaseException] = []
    stop = threading.Event()

    def worker(w: int) -> None:
        actor = bench_actor()
        n = 0
        barrier.wait()
        try:
            while not stop.is_set():
                charter.execute(actor, ACTION, INPUT, target=ids.one())
                n += 1
        except BaseException as exc:
            errors.append(exc)
        counts[w] = n

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(WORKERS)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return sum(counts) / elapsed


@dataclass
class ConcurrentResult:
    audited: float
    unaudited: float
    audited_runs: list[float]
    unaudited_runs: list[float]

    @property
    def ratio(self) -> float:
        """The median of the ratios of adjacent on/off runs (each pair shares its moment)."""
        return statistics.median(
            on / off for on, off in zip(self.audited_runs, self.unaudited_runs, strict=True)
        )

    @property
    def ratio_of_medians(self) -> float:
        return self.audited / self.unaudited


def measure_concurrent(
    audited: Charter, unaudited: Charter, ids: Ids, runs: int, seconds: float
) -> ConcurrentResult:
    throughput(audited, min(seconds, 1.0), ids)  # warm-up: pools, caches
    throughput(unaudited, min(seconds, 1.0), ids)
    on: list[float] = []
    off: list[float] = []
    for k in range(runs):
        if k % 2 == 0:
            on.append(throughput(audited, seconds, ids))
            off.append(throughput(unaudited, seconds, ids))
        else:
            off.append(throughput(unaudited, seconds, ids))
            on.append(throughput(audited, seconds, ids))
    return ConcurrentResult(statistics.median(on), statistics.median(off), on, off)


# -- statement counts and profile -------------------------------------------------------


@contextmanager
def count_statements(engine: Engine) -> Iterator[dict[str, Any]]:
    """Count statements sent through the engine (cursor executes) plus BEGIN/COMMIT events."""
    seen: dict[str, Any] = {"statements": [], "begin": 0, "commit": 0, "rollback": 0}

    def on_execute(
        conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool
    ) -> None:
        seen["statements"].append(" ".join(statement.split()))

    def counter(name: str) -> Callable[[Any], None]:
        def on(_conn: Any) -> None:
            seen[name] += 1

        return on

    listeners = [("before_cursor_execute", on_execute)] + [
        (name, counter(name)) for name in ("begin", "commit", "rollback")
    ]
    for name, fn in listeners:
        event.listen(engine, name, fn)
    try:
        yield seen
    finally:
        for name, fn in listeners:
            event.remove(engine, name, fn)


def statements_per_call(
    sides: dict[str, tuple[Engine, Callable[[int], None]]], ids: Ids
) -> dict[str, dict[str, Any]]:
    result = {}
    for name, (engine, op) in sides.items():
        op(ids.one())  # warm
        with count_statements(engine) as seen:
            op(ids.one())
        stmts = seen["statements"]
        # The SQLite BEGIN IMMEDIATE is itself a cursor execute (from the begin event);
        # psycopg sends its BEGIN implicitly, as one round trip of its own.
        explicit_begin = sum(1 for s in stmts if s.upper().startswith("BEGIN"))
        full = [s for s in stmts if not s.upper().startswith("BEGIN")]
        result[name] = {
            "statements": [s[:60] for s in full],
            "full": full,
            "round_trips": len(stmts) + seen["commit"] + (seen["begin"] - explicit_begin),
        }
    return result


def same_path(audited: list[str], unaudited: list[str]) -> str:
    """Whether the unaudited gate sends the audited statements, the audit INSERT left out.

    The audited UPDATE may carry the audit INSERT as a CTE (``WITH ... ) UPDATE ...``):
    the UPDATE after the CTE must be the unaudited one, character for character.
    """
    stripped = []
    for stmt in audited:
        if stmt.upper().startswith("INSERT INTO CHARTER_AUDIT"):
            continue
        if stmt.upper().startswith("WITH ") and ") UPDATE " in stmt:
            stmt = stmt[stmt.rindex(") UPDATE ") + 2 :]
        stripped.append(stmt)
    if stripped == unaudited:
        return "yes"
    return "NO: " + "; ".join(
        f"on {a[:70]!r} / off {b[:70]!r}"
        for a, b in zip(stripped, unaudited, strict=False)
        if a != b
    )


def _package(filename: str) -> str:
    if "site-packages/" in filename:
        return filename.split("site-packages/")[-1].split("/")[0].removesuffix(".py")
    if "/charter/" in filename:
        return "charter"
    if "/benchmarks/" in filename:
        return "benchmark code (hand-written side)"
    if filename.startswith("~") or filename.startswith("<"):
        return "builtins (C: json, hmac, driver helpers, ...)"
    return "stdlib"


def profile_op(op: Callable[[int], None], ids: Ids, calls: int, top: int = 22) -> str:
    for i in ids.take(100):
        op(i)
    todo = ids.take(calls)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for i in todo:
        op(i)
    profiler.disable()
    wall = (time.perf_counter() - start) / calls * 1e6
    stats = pstats.Stats(profiler)
    rows = []
    by_package: dict[str, float] = {}
    for (filename, line, func), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        short = filename.split("site-packages/")[-1].split("src/")[-1]
        name = f"{short}:{line}({func})" if line else func
        rows.append((ct / calls * 1e6, tt / calls * 1e6, nc / calls, name))
        pkg = _package(filename)
        if pkg == "psycopg" and func == "wait":
            pkg = "psycopg: waiting for the server"
        elif pkg.startswith("builtins") and "sqlite3" in func:
            pkg = "sqlite3 (C): the database's own work"
        by_package[pkg] = by_package.get(pkg, 0.0) + tt / calls * 1e6
    total_own = sum(by_package.values())
    rows.sort(reverse=True)
    out = io.StringIO()
    out.write(f"  {calls} calls under cProfile: {wall:.0f} us/call wall (profiled)\n")
    out.write("  own time by package (us/call, share):\n")
    for pkg, us in sorted(by_package.items(), key=lambda kv: -kv[1]):
        out.write(f"    {us:8.1f}  {us / total_own:5.1%}  {pkg}\n")
    out.write(f"  {'cum us/call':>11} {'own us/call':>11} {'calls/op':>8}  function\n")
    for cum, own, n, name in rows[:top]:
        out.write(f"  {cum:11.1f} {own:11.1f} {n:8.1f}  {name}\n")
    out.write("  -- by own time --\n")
    for cum, own, n, name in sorted(rows, key=lambda r: r[1], reverse=True)[:15]:
        out.write(f"  {cum:11.1f} {own:11.1f} {n:8.1f}  {name}\n")
    return out.getvalue()


# -- reporting --------------------------------------------------------------------------


def run_database(
    label: str,
    charter: Charter,
    floor: tuple[Callable[[int], None], Callable[[], None]],
    ids: Ids,
    sizes: tuple[int, int, int],
    profile_calls: int,
) -> tuple[PairResult, dict[str, dict[str, Any]], list[str]]:
    actor = bench_actor()
    hw = Handwritten(charter.engine)
    floor_op, floor_close = floor
    ops = {
        "gate": gate_op(charter, actor),
        "core": core_op(hw, actor),
        "orm": orm_op(hw, actor),
        "old": old_op(hw, actor),
        "floor": floor_op,
    }
    try:
        res = measure(ops, ids, *sizes)
        counts = statements_per_call(
            {s: (charter.engine, ops[s]) for s in ("gate", "core", "orm", "old")}, ids
        )
        profiles = []
        if profile_calls:
            for side in ("gate", "core"):
                profiles.append(
                    f"{label} {side} profile:\n" + profile_op(ops[side], ids, profile_calls)
                )
    finally:
        floor_close()
    return res, counts, profiles


def single_figures(res: Any, db: str) -> dict[str, float]:
    """The single-thread figures of one database, named as the JSON line names them."""
    return {
        f"ratio_core_{db}": res.ratio("gate", "core"),
        f"ratio_orm_{db}": res.ratio("gate", "orm"),
        f"ratio_{db}": res.ratio("gate", "old"),
        f"gate_us_{db}": res.us["gate"],
        f"core_us_{db}": res.us["core"],
        f"orm_us_{db}": res.us["orm"],
        f"baseline_us_{db}": res.us["old"],
        f"floor_us_{db}": res.us["floor"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (< 60 s)")
    parser.add_argument(
        "--profile", action="store_true", help="also print cProfile summaries of gate and core"
    )
    args = parser.parse_args()

    if args.quick:
        rounds, per_round, warmup, conc_runs, conc_seconds, prof_calls = 5, 120, 100, 9, 1.0, 1000
    else:
        rounds, per_round, warmup, conc_runs, conc_seconds, prof_calls = 20, 480, 400, 9, 2.0, 3000
    if not args.profile:
        prof_calls = 0
    sides = len(SIDES)
    single_rows = sides * (warmup + rounds * per_round) + 50 + (2 * (prof_calls + 100))
    conc_rows = int(2 * (conc_runs * conc_seconds + 1.0) * 3000)  # up to 3000 ops/s

    t0 = time.perf_counter()
    info = _common.machine()
    print(
        f"gate_overhead: {'quick' if args.quick else 'full'} run, "
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}"
    )
    print(
        f"machine: nproc={info['nproc']} arch={info['arch']} python={info['python']} "
        f"charter={info['rev']} loadavg={_common.loadavg()}"
    )
    print(
        f"sizes: {rounds} rounds x {per_round} steps (every side once per step, order cycling "
        f"through all permutations), warm-up {warmup}/side; concurrent {WORKERS} threads, "
        f"{conc_runs} runs x {conc_seconds:.1f} s per side"
    )

    figures: dict[str, float | None] = dict.fromkeys(
        (
            "ratio_core_pg",
            "ratio_core_sqlite",
            "ratio_orm_pg",
            "ratio_orm_sqlite",
            "ratio_pg",
            "ratio_sqlite",
            "concurrent_audit_ratio_pg",
            "gate_us_pg",
            "core_us_pg",
            "orm_us_pg",
            "baseline_us_pg",
            "floor_us_pg",
            "gate_us_sqlite",
            "core_us_sqlite",
            "orm_us_sqlite",
            "baseline_us_sqlite",
            "floor_us_sqlite",
            "audited_ops_s_pg",
            "unaudited_ops_s_pg",
        )
    )
    results: dict[str, PairResult] = {}
    counts: dict[str, dict[str, dict[str, Any]]] = {}
    profiles: list[str] = []
    sizes = (rounds, per_round, warmup)

    # SQLite ------------------------------------------------------------------------
    with tempfile.TemporaryDirectory(prefix="charter-bench-") as tmp:
        path = f"{tmp}/bench.db"
        charter = build_charter(f"sqlite:///{path}")
        prepare_schema(charter.engine, single_rows)
        sqlite_version = sqlite3.sqlite_version
        res, counts["sqlite"], prof = run_database(
            "SQLite",
            charter,
            sqlite_floor_op(path, bench_actor()),
            Ids(1, single_rows),
            sizes,
            prof_calls,
        )
        results[f"SQLite {sqlite_version}"] = res
        profiles += prof
        figures.update(single_figures(res, "sqlite"))
        charter.engine.dispose()

    # PostgreSQL --------------------------------------------------------------------
    pg_url = _common.pg_bench_url(BENCH_DB)
    pg_version = "unavailable"
    conc: ConcurrentResult | None = None
    if pg_url is not None:
        charter = build_charter(pg_url)
        with charter.engine.connect() as conn:
            pg_version = str(conn.execute(text("SHOW server_version")).scalar()).split()[0]
        prepare_schema(charter.engine, single_rows + conc_rows)
        res, counts["pg"], prof = run_database(
            "PostgreSQL",
            charter,
            pg_floor_op(pg_url, bench_actor()),
            Ids(1, single_rows),
            sizes,
            prof_calls,
        )
        results[f"PostgreSQL {pg_version}"] = res
        profiles += prof
        figures.update(single_figures(res, "pg"))
        unaudited = build_charter(pg_url, audited=False)
        conc_ids = Ids(single_rows + 1, single_rows + conc_rows)
        off_counts = statements_per_call(
            {
                "gate, audit on": (charter.engine, gate_op(charter, bench_actor())),
                "gate, audit off": (unaudited.engine, gate_op(unaudited, bench_actor())),
            },
            conc_ids,
        )
        try:
            conc = measure_concurrent(charter, unaudited, conc_ids, conc_runs, conc_seconds)
        finally:
            charter.engine.dispose()
            unaudited.engine.dispose()
        figures.update(
            concurrent_audit_ratio_pg=conc.ratio,
            audited_ops_s_pg=conc.audited,
            unaudited_ops_s_pg=conc.unaudited,
        )

    print(f"versions: PostgreSQL {pg_version}")
    print()
    print(
        "single thread, median per-op time (us); in parentheses the drift check "
        "(ratio of the medians of round means)"
    )
    print(
        f"  {'database':<18} {'gate':>8} {'core':>8} {'orm':>8} {'old':>8} {'floor':>8}"
        f"   {'gate/core':>11} {'gate/orm':>11} {'gate/old':>11} {'core/floor':>10}"
    )
    for db, r in results.items():
        print(
            f"  {db:<18} "
            + " ".join(f"{r.us[s]:8.1f}" for s in SIDES)
            + "   "
            + " ".join(
                f"{r.ratio('gate', b):5.2f} ({r.round_ratio('gate', b):4.2f})"
                for b in ("core", "orm", "old")
            )
            + f" {r.ratio('core', 'floor'):10.2f}"
        )
    print("  targets: gate/core <= 1.6 on PostgreSQL, <= 2.2 on SQLite")
    if conc is not None:
        print()
        print(
            f"PostgreSQL, {WORKERS} threads approving distinct invoices "
            f"(ops/s, median of {conc_runs})"
        )
        print(
            f"  audit on   {conc.audited:9.0f}   runs: "
            + ", ".join(f"{x:.0f}" for x in conc.audited_runs)
        )
        print(
            f"  audit off  {conc.unaudited:9.0f}   runs: "
            + ", ".join(f"{x:.0f}" for x in conc.unaudited_runs)
        )
        print(
            f"  on/off     {conc.ratio:9.2f}   target >= 0.8 (median of pair ratios; "
            f"ratio of medians {conc.ratio_of_medians:.2f})"
        )
        counts["pg"].update(off_counts)
    print()
    print("statements per call (round trips = statements + BEGIN + COMMIT)")
    for db, per in counts.items():
        for side, c in per.items():
            print(
                f"  {db:<6} {side:<15} {c['round_trips']} round trips: BEGIN, "
                + ", ".join(c["statements"])
                + ", COMMIT"
            )
    if "gate, audit off" in counts.get("pg", {}):
        print("  audit off takes the audited statement path minus the audit INSERT: " + same_path(
            counts["pg"]["gate, audit on"]["full"], counts["pg"]["gate, audit off"]["full"]
        ))  # fmt: skip
    if profiles:
        print()
        for p in profiles:
            print(p)
    print()
    print(f"total time {time.perf_counter() - t0:.1f} s, loadavg at end {_common.loadavg()}")
    _common.print_figures(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
