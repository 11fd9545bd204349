"""Benchmark the policy compiled to SQL against a hand-written query returning the same rows.

Fills ``bench_policy_invoices`` in PostgreSQL (``CHARTER_PG_URL``) with one
``INSERT ... SELECT generate_series`` (1,000,000 rows; 100,000 with
``--quick``), with the indexes a real application would have: the primary
key and ``(tenant_id, state)``. The actor (an approver of one of 20 tenants)
may see about 1% of the rows. Both queries are run interleaved, several
times; the figure is the median. Charter's time includes building the WHERE
clause for the actor, as an application does on every request.

Usage: ``python benchmarks/policy_filter.py [--quick]``. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from decimal import Decimal

import _common
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from charter.actor import Actor
from charter.policy import PolicySet
from charter.resources import ResourceSpec

PG_URL = os.environ.get(
    "CHARTER_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/charter_test"
)


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

HANDWRITTEN = sa.text(
    "SELECT id, tenant_id, state, amount, created_by FROM bench_policy_invoices "
    "WHERE tenant_id = :tenant AND state = 'submitted' AND amount <= :limit "
    "AND created_by <> :me"
)


def ensure_database(url: sa.URL) -> None:
    admin = sa.create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        if not conn.scalar(
            sa.text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": url.database}
        ):
            conn.execute(sa.text(f'CREATE DATABASE "{url.database}"'))
    admin.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100,000 rows (< 60 s)")
    args = parser.parse_args()
    rows, repeats = (100_000, 15) if args.quick else (1_000_000, 21)

    url = make_url(PG_URL)
    ensure_database(url)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        count = conn.scalar(
            sa.text("SELECT count(*) FROM information_schema.tables WHERE table_name = :t"),
            {"t": BenchInvoice.__tablename__},
        )
        existing = (
            conn.scalar(sa.text("SELECT count(*) FROM bench_policy_invoices")) if count else 0
        )
        if existing != rows:
            print(f"filling {rows:,} rows...", file=sys.stderr)
            Base.metadata.drop_all(conn)
            Base.metadata.create_all(conn)
            conn.execute(sa.text(FILL), {"n": rows})
            conn.execute(sa.text("ANALYZE bench_policy_invoices"))

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
            return 1
        print(ap.apply(base, actor).compile(engine), file=sys.stderr)
        for i in range(repeats):
            order = (run_charter, run_handwritten) if i % 2 == 0 else (run_handwritten, run_charter)
            for fn in order:
                start = time.perf_counter()
                fn(conn)
                elapsed = (time.perf_counter() - start) * 1000
                (charter_ms if fn is run_charter else hand_ms).append(elapsed)
        conn.rollback()
    engine.dispose()

    c, h = statistics.median(charter_ms), statistics.median(hand_ms)
    print(f"rows in table: {rows:,}; visible to the actor: {len(ours):,} ({len(ours) / rows:.2%})")
    print(f"{'query':<14}{'median ms':>12}")
    print(f"{'charter':<14}{c:>12.3f}")
    print(f"{'handwritten':<14}{h:>12.3f}")
    print(
        json.dumps(
            {
                "ratio": round(c / h, 3),
                "charter_ms": round(c, 3),
                "handwritten_ms": round(h, 3),
                "rows": len(ours),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
