"""Benchmark the policy compiled to SQL against hand-written queries returning the same rows.

Two figures, on PostgreSQL (``$CHARTER_PG_URL`` with the database name replaced
by ``charter_bench``, created if missing):

``ratio`` (the filter on a large table). Fills ``bench_policy_invoices`` with one
``INSERT ... SELECT generate_series`` (1,000,000 rows; 100,000 with
``--quick``), with the indexes a real application would have: the primary key
and ``(tenant_id, state)``. The actor (an approver of one of 20 tenants) may
see about 1% of the rows. ``ap.apply(select, actor)`` against a hand-written
``text()`` query; the timing includes building the WHERE clause. Both run
interleaved, several times; the figure is the ratio of the medians.

``page_ratio`` (target <= 1.2: what a list endpoint costs). One 50-row page
through ``charter.list_records(actor, action, limit=50)``, which users call:
the policy's page statement (built once per actor shape, values as
parameters), the ORM rows, and the audit entry for the read, in one
transaction. Against the same page written by hand, as a careful developer
would, on the same engine: a Core ``select`` built once with the same WHERE
(tenant included) and 51 rows fetched (one more than shown, for the next
cursor), plus one audit row INSERT (prebuilt, no RETURNING) carrying an
HMAC-SHA256 over the row, in one transaction. The table is
``bench_policy_pages`` (100,000 rows, the same distribution, indexed on
``(tenant_id, state, id)`` so a keyset page is an index range scan). The two
run interleaved op by op (``_common.interleave``); the figure is the ratio of
the median per-op times, with the ratio of the medians of per-round means
printed as a drift check.

Usage: ``python benchmarks/policy_filter.py [--quick]``. The last line is JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import _common
import sqlalchemy as sa
from pydantic import BaseModel
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from charter import Charter
from charter.actor import Actor
from charter.context import ActionContext
from charter.migrate import upgrade
from charter.policy import PolicySet
from charter.resources import ResourceSpec

BENCH_DB = "charter_bench"
AUDIT_KEY = b"bench-audit-key-0123456789"
PAGE_ROWS = 100_000
PAGE = 50


class Base(DeclarativeBase):
    pass


class BenchInvoice(Base):
    __tablename__ = "bench_policy_invoices"
    id: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.String(20))
    state: Mapped[str] = mapped_column(sa.String(20))
    amount: Mapped[Decimal] = mapped_column(sa.Numeric(12, 2))
    created_by: Mapped[str] = mapped_column(sa.String(20))
    __table_args__ = (sa.Index("bench_policy_invoices_tenant_state", "tenant_id", "state"),)


FILL = """
INSERT INTO bench_policy_invoices (id, tenant_id, state, amount, created_by)
SELECT g,
       't' || (g % 20),
       (ARRAY['draft', 'submitted', 'approved', 'paid', 'void'])[1 + (g / 20) % 5],
       ((g::bigint * 7919) % 6000)::numeric(12, 2),
       'u' || (g % 37)
FROM generate_series(1, :n) AS g
"""


class BenchPage(Base):
    """The same invoices for the page benchmark, with the index a keyset page needs."""

    __tablename__ = "bench_policy_pages"
    id: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.String(20))
    state: Mapped[str] = mapped_column(sa.String(20))
    amount: Mapped[Decimal] = mapped_column(sa.Numeric(12, 2))
    created_by: Mapped[str] = mapped_column(sa.String(20))
    __table_args__ = (sa.Index("bench_policy_pages_tenant_state_id", "tenant_id", "state", "id"),)


class HandAudit(Base):
    """The hand-written side's audit log: what a careful developer records for a read."""

    __tablename__ = "bench_policy_page_audit"
    id: Mapped[int] = mapped_column(sa.BigInteger, sa.Identity(), primary_key=True)
    at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    tenant: Mapped[str] = mapped_column(sa.String(128))
    subject: Mapped[str] = mapped_column(sa.String(128))
    action: Mapped[str] = mapped_column(sa.String(128))
    request_id: Mapped[str] = mapped_column(sa.String(128))
    listed: Mapped[int]
    after: Mapped[str | None] = mapped_column(sa.String(64))
    mac: Mapped[str] = mapped_column(sa.String(64))


HANDWRITTEN = sa.text(
    "SELECT id, tenant_id, state, amount, created_by FROM bench_policy_invoices "
    "WHERE tenant_id = :tenant AND state = 'submitted' AND amount <= :limit "
    "AND created_by <> :me"
)


def fill(conn: sa.Connection, table: str, rows: int) -> None:
    conn.execute(sa.text(FILL.replace("bench_policy_invoices", table)), {"n": rows})
    conn.execute(sa.text(f"ANALYZE {table}"))


def prepare(engine: sa.Engine, rows: int) -> None:
    """Fill the two invoice tables when their row counts differ; a fresh hand-written audit."""
    upgrade(engine)  # Charter's own tables (the audit trail list_records writes to)
    inspector = sa.inspect(engine)
    with engine.begin() as conn:
        for model, n in ((BenchInvoice, rows), (BenchPage, PAGE_ROWS)):
            table = model.__table__
            name = model.__tablename__
            existing = (
                conn.scalar(sa.text(f"SELECT count(*) FROM {name}"))
                if inspector.has_table(name)
                else None
            )
            if existing != n:
                print(f"filling {n:,} rows into {name}...", file=sys.stderr)
                table.drop(conn, checkfirst=True)  # type: ignore[attr-defined]
                table.create(conn)  # type: ignore[attr-defined]
                fill(conn, name, n)
        HandAudit.__table__.drop(conn, checkfirst=True)  # type: ignore[attr-defined]
        HandAudit.__table__.create(conn)  # type: ignore[attr-defined]
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE charter_audit"))


def filter_ratio(engine: sa.Engine, repeats: int) -> dict[str, Any] | None:
    """The compiled filter over the large table against a hand-written text() query."""
    spec = ResourceSpec.declare(BenchInvoice, name="invoice", tenant="tenant_id", state="state")
    policy = PolicySet()
    policy.allow(
        "invoice.approve",
        _common.APPROVER_RULE,
        name="approvers-approve",
    )
    ap = policy.compile(resource=spec, action="invoice.approve", listable=True)
    actor = Actor.make("u3", "t7", roles=["approver"], attributes={"approval_limit": Decimal(5000)})
    base = sa.select(BenchInvoice.__table__)
    params = {"tenant": "t7", "limit": Decimal(5000), "me": "u3"}

    def run_charter(conn: sa.Connection) -> list[tuple[object, ...]]:
        return [tuple(r) for r in conn.execute(ap.apply(base, actor))]

    def run_handwritten(conn: sa.Connection) -> list[tuple[object, ...]]:
        return [tuple(r) for r in conn.execute(HANDWRITTEN, params)]

    charter_ms: list[float] = []
    hand_ms: list[float] = []
    with engine.connect() as conn:
        ours, theirs = run_charter(conn), run_handwritten(conn)  # warm caches, plans
        if sorted(ours) != sorted(theirs):
            print(f"row sets differ: {len(ours)} vs {len(theirs)}", file=sys.stderr)
            return None
        print(ap.apply(base, actor).compile(engine), file=sys.stderr)
        for i in range(repeats):
            order = (run_charter, run_handwritten) if i % 2 == 0 else (run_handwritten, run_charter)
            for fn in order:
                start = time.perf_counter()
                fn(conn)
                elapsed = (time.perf_counter() - start) * 1000
                (charter_ms if fn is run_charter else hand_ms).append(elapsed)
        conn.rollback()
    c, h = statistics.median(charter_ms), statistics.median(hand_ms)
    print(f"rows visible to the actor: {len(ours):,}")
    print(f"{'query':<14}{'median ms':>12}")
    print(f"{'charter':<14}{c:>12.3f}")
    print(f"{'handwritten':<14}{h:>12.3f}")
    return {
        "ratio": round(c / h, 3),
        "charter_ms": round(c, 3),
        "handwritten_ms": round(h, 3),
        "rows": len(ours),
    }


# -- page_ratio ---------------------------------------------------------------------------


def build_charter(url: str) -> Charter:
    charter = Charter(
        database_url=url, audit_keys={"k1": AUDIT_KEY.decode()}, rate_limits=_common.rate_limits()
    )
    charter.resource(BenchPage, name="invoice", tenant="tenant_id", state="state")

    @charter.action("invoice.approve", on=BenchPage, allow=_common.APPROVER_RULE, listable=True)
    def approve(ctx: ActionContext, invoice: BenchPage, data: BaseModel) -> None:
        invoice.state = "approved"

    return charter


def hand_page(engine: sa.Engine, actor: Actor, request_id: str, *, transaction: bool) -> Any:
    """The page and its audit row as a careful developer writes them (built once).

    ``transaction=False`` (the baseline): the SELECT, then the audit INSERT, each its own
    autocommit statement on one connection: a read needs no transaction, and a page is
    returned only after its audit row is written. ``transaction=True``: the same two
    statements between BEGIN and COMMIT, as most code would write it (two more round
    trips; the baseline until 2026-12-07, printed as ``page_ratio_txn``).
    """
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    opened = engine.begin if transaction else autocommit.connect
    t: sa.Table = BenchPage.__table__  # type: ignore[assignment]
    audit: sa.Table = HandAudit.__table__  # type: ignore[assignment]
    page_stmt = (
        sa.select(t)
        .where(
            t.c.tenant_id == sa.bindparam("tenant"),
            t.c.state == "submitted",
            t.c.amount <= sa.bindparam("limit"),
            t.c.created_by != sa.bindparam("me"),
        )
        .order_by(t.c.id)
        .limit(PAGE + 1)
    )
    audit_insert = sa.insert(audit).inline()  # no RETURNING: nobody needs the new id
    subject = actor.subject
    params = {
        "tenant": subject.tenant,
        "limit": subject.attributes["approval_limit"],
        "me": subject.id,
    }
    mac_key = AUDIT_KEY

    def page() -> tuple[list[Any], Any]:
        with opened() as conn:
            rows = conn.execute(page_stmt, params).all()
            shown, more = rows[:PAGE], len(rows) > PAGE
            at = datetime.now(UTC)
            row = {
                "at": at,
                "tenant": subject.tenant,
                "subject": subject.id,
                "action": "invoice.approve",
                "request_id": request_id,
                "listed": len(shown),
                "after": None,
            }
            message = json.dumps(
                [at.isoformat(), subject.tenant, subject.id, "invoice.approve", request_id,
                 len(shown), None],
                separators=(",", ":"),
            ).encode()  # fmt: skip
            row["mac"] = hmac.new(mac_key, message, hashlib.sha256).hexdigest()
            conn.execute(audit_insert, row)
        return shown, (str(shown[-1].id) if more and shown else None)

    return page


def page_ratio(url: str, rounds: int, per_round: int, warmup: int) -> dict[str, Any] | None:
    charter = build_charter(url)
    engine = charter.engine
    actor = Actor.make("u3", "t7", roles=["approver"], attributes={"approval_limit": Decimal(5000)})
    request_id = "bench-request-0001"  # from the HTTP layer, on both sides
    hand = hand_page(engine, actor, request_id, transaction=False)
    hand_txn = hand_page(engine, actor, request_id, transaction=True)
    list_records = charter.list_records

    def charter_page() -> tuple[list[Any], Any]:
        page = list_records(actor, "invoice.approve", limit=PAGE, request_id=request_id)
        return page.records, page.next  # next: an encrypted cursor (the hand page's: the id)

    try:
        ours, our_cursor = charter_page()
        theirs, their_cursor = hand()
        if [r.id for r in ours] != [r.id for r in theirs] or (our_cursor is None) != (
            their_cursor is None
        ):
            print("the two pages differ", file=sys.stderr)
            return None
        if len(ours) != PAGE:
            print(f"the page has {len(ours)} rows, not {PAGE}", file=sys.stderr)
            return None
        policy = charter.policy_of("invoice.approve")
        stmt, _ = policy.page_statement(actor, None, limit=PAGE + 1)
        print(stmt.compile(engine), file=sys.stderr)
        ops = {
            "charter": lambda _: charter_page(),
            "hand": lambda _: hand(),
            "hand_txn": lambda _: hand_txn(),
        }
        for _ in range(warmup):
            charter_page()
            hand()
            hand_txn()
        orders = [("charter", "hand", "hand_txn"), ("hand_txn", "hand", "charter"),
                  ("hand", "charter", "hand_txn")]  # fmt: skip
        per_op, means = _common.interleave(ops, orders, rounds, per_round, lambda n: [0] * n)
        cpu = client_cpu(ops, rounds * per_round // 2)
        statements = {side: statements_of(engine, op) for side, op in ops.items()}
    finally:
        engine.dispose()
    c, h = statistics.median(per_op["charter"]) * 1e6, statistics.median(per_op["hand"]) * 1e6
    ht = statistics.median(per_op["hand_txn"]) * 1e6
    drift = statistics.median(means["charter"]) / statistics.median(means["hand"])
    print(f"page of {PAGE} rows, {len(per_op['charter'])} ops per side, interleaved")
    print(f"{'path':<34}{'median µs':>12}")
    print(f"{'charter.list_records':<34}{c:>12.1f}")
    print(f"{'hand-written Core page + audit row':<34}{h:>12.1f}")
    print(f"{'the same in BEGIN ... COMMIT':<34}{ht:>12.1f}")
    print(f"page_ratio {c / h:.3f} (ratio of per-round medians: {drift:.3f}; target <= 1.2)")
    print(f"page_ratio_txn {c / ht:.3f} (against the hand page in a transaction)")
    print(
        f"client CPU per page (thread time, median): charter {cpu['charter']:.1f} µs, "
        f"hand-written {cpu['hand']:.1f} µs ({cpu['charter'] / cpu['hand']:.2f}x), "
        f"in a transaction {cpu['hand_txn']:.1f} µs"
    )
    for side, sent in statements.items():
        print(f"statements per page, {side}: {' | '.join(sent)}")
    return {
        "page_ratio": round(c / h, 3),
        "page_ratio_txn": round(c / ht, 3),
        "page_charter_us": round(c, 1),
        "page_handwritten_us": round(h, 1),
        "page_handwritten_txn_us": round(ht, 1),
        "page_round_ratio": round(drift, 3),
        "page_charter_cpu_us": round(cpu["charter"], 1),
        "page_handwritten_cpu_us": round(cpu["hand"], 1),
    }


def client_cpu(ops: dict[str, Any], n: int) -> dict[str, float]:
    """Median client CPU (this thread: Python, SQLAlchemy, psycopg) per op, interleaved."""
    clock = time.thread_time
    times: dict[str, list[float]] = {side: [] for side in ops}
    sides = list(ops)
    for i in range(n):
        for side in sides if i % 2 == 0 else sides[::-1]:
            start = clock()
            ops[side](0)
            times[side].append(clock() - start)
    return {side: statistics.median(t) * 1e6 for side, t in times.items()}


def statements_of(engine: sa.Engine, op: Any) -> list[str]:
    """What one op sends: each statement's first words, and the COMMIT."""
    sent: list[str] = []

    def on_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(" ".join(statement.split()[:3]))

    def on_commit(conn: Any) -> None:
        sent.append("COMMIT")

    sa.event.listen(engine, "before_cursor_execute", on_execute)
    sa.event.listen(engine, "commit", on_commit)
    try:
        op(0)
    finally:
        sa.event.remove(engine, "before_cursor_execute", on_execute)
        sa.event.remove(engine, "commit", on_commit)
    return sent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100,000 rows (< 60 s)")
    args = parser.parse_args()
    rows, repeats = (100_000, 15) if args.quick else (1_000_000, 21)
    rounds, per_round, warmup = (8, 60, 100) if args.quick else (20, 150, 300)

    url = _common.pg_bench_url(BENCH_DB)
    if url is None:
        return 1
    print(f"machine: {_common.machine()}; load {_common.loadavg()}", file=sys.stderr)
    engine = sa.create_engine(url)
    try:
        prepare(engine, rows)
        result = filter_ratio(engine, repeats)
    finally:
        engine.dispose()
    if result is None:
        return 1
    pages = page_ratio(url, rounds, per_round, warmup)
    if pages is None:
        return 1
    print(f"load after: {_common.loadavg()}", file=sys.stderr)
    print(json.dumps({**result, **pages}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
