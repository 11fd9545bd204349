"""Streaming an export through Charter vs a raw server-side cursor (issue 11).

PostgreSQL, ``charter_bench_export``: 1,000,000 invoices in 10 tenants
(``--quick``: 100,000), seeded with ``generate_series``. The actor may see
one tenant's 100,000 (``--quick``: 10,000).

* **Charter**: ``charter.export(actor, "invoice.export", format="csv")`` — the
  default path: the rate_limit stage (Charter's default limits, never reached),
  the credential gate, the quota charge and the start's audit entry, the
  policy's WHERE (tenant included), a ``yield_per`` server-side cursor, CSV
  encoding (formula neutralization in SQL, datetimes ISO 8601), the sha256 of
  the ids and the end's audit entry.
* **Baseline**: a psycopg named (server-side) cursor selecting the same columns
  of the same tenant in id order, ``itersize`` = Charter's chunk, written with
  ``csv.writer`` — the same rows, the same bytes.

Figures: ``rows_ratio`` = baseline seconds / Charter seconds (rows per second
relative to the baseline; target >= 0.7), the median of interleaved runs; and
``rss_growth_mb`` = peak RSS after exporting the large tenant minus the peak
after exporting a tenant of a tenth its size, in this process (target < 15).
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import psycopg
from _common import machine, pg_bench_url, rate_limits
from sqlalchemy import text
from sqlalchemy.engine import make_url

from charter import Actor, Charter
from charter.credits import Quota
from charter.data.export import CHUNK_ROWS
from charter.demo.app import DEMO_MIGRATIONS
from charter.demo.models import Invoice
from charter.migrate import upgrade
from charter.policy import A
from charter.storage import make_engine

TENANTS = 10
COLUMNS = (
    "id", "tenant_id", "customer", "amount", "currency", "state", "version",
    "created_by", "created_at", "submitted_by", "approved_by", "charge_id", "paid_at",
)  # fmt: skip


def seed(url: str, total: int) -> None:
    engine = make_engine(url)
    try:
        upgrade(engine, extra_locations=DEMO_MIGRATIONS)
        with engine.begin() as conn:
            have = conn.execute(text("SELECT count(*) FROM invoices")).scalar_one()
            if have == total:
                return
            conn.execute(text("TRUNCATE invoices RESTART IDENTITY"))
            conn.execute(text(
                "INSERT INTO invoices (tenant_id, customer, amount, currency, state, version, "
                "created_by, created_at, bank_account) SELECT 't' || (i % :tenants), "
                "'customer ' || (i % 997), (i % 100000) / 100.0, 'EUR', 'approved', 1, 'u', "
                "timestamptz '2026-01-01' + i * interval '1 second', 'DE89370400440532013000' "
                "FROM generate_series(1, :n) AS i"), {"n": total, "tenants": TENANTS})  # fmt: skip
            conn.execute(text("ANALYZE invoices"))
    finally:
        engine.dispose()


def build(url: str) -> Charter:
    charter = Charter(database_url=url, development=True, rate_limits=rate_limits(),
                      checkpoint_interval=None)  # fmt: skip
    charter.resource(Invoice, tenant="tenant_id", state="state", version="version",
                     visible={"bank_account": A.has_role("finance")})  # fmt: skip

    def export(ctx: object, record: object, data: object) -> None:
        """Export invoices."""

    charter.action("invoice.export", on=Invoice, target=None, listable=True,
                   allow=A.has_role("member"), sensitive_read=True, scope="invoices:read",
                   tags={"export"}, cost=Quota("exports", limit=10**9))(export)  # fmt: skip
    return charter


def charter_side(charter: Charter, tenant: str) -> tuple[float, int]:
    actor = Actor.make("u", tenant, roles={"member"}, scopes={"invoices:read"})
    t = time.perf_counter()
    size = 0
    with charter.export(actor, "invoice.export", format="csv") as stream:
        for chunk in stream:
            size += len(chunk)
    return time.perf_counter() - t, size


def raw_side(dsn: str, tenant: str) -> tuple[float, int]:
    t = time.perf_counter()
    size = 0
    with psycopg.connect(dsn) as conn, conn.cursor(name="export") as cur:
        cur.itersize = CHUNK_ROWS
        cur.execute(f"SELECT {', '.join(COLUMNS)} FROM invoices WHERE tenant_id = %s "
                    "ORDER BY id", (tenant,))  # fmt: skip
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\r\n")
        writer.writerow(COLUMNS)
        while rows := cur.fetchmany(CHUNK_ROWS):
            writer.writerows([[*r[:8], r[8].isoformat(), *r[9:12],
                               r[12].isoformat() if r[12] else None] for r in rows])  # fmt: skip
            size += len(buffer.getvalue().encode())
            buffer.seek(0)
            buffer.truncate()
    return time.perf_counter() - t, size


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k invoices, 10k visible")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    total = 100_000 if args.quick else 1_000_000
    url = pg_bench_url("charter_bench_export")
    if url is None:
        raise SystemExit("PostgreSQL is required")
    seed(url, total)
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    charter = build(url)
    try:
        # The small export first, in a tenant of a tenth the size: the peak it leaves is the
        # baseline of rss_growth_mb (the large one must not raise it by 15 MB).
        with charter.engine.begin() as conn:
            conn.execute(text("UPDATE invoices SET tenant_id = 'small' WHERE tenant_id = 't1' "
                              "AND id % 10 = 1"))  # fmt: skip
        charter_side(charter, "small")
        raw_side(dsn, "small")
        small_peak = peak_mb()
        charter_times, raw_times = [], []
        for run in range(args.runs):
            order = [("charter", charter_side, charter), ("raw", raw_side, dsn)]
            for name, fn, target in order if run % 2 == 0 else order[::-1]:
                seconds, size = fn(target, "t0")  # type: ignore[operator]
                (charter_times if name == "charter" else raw_times).append(seconds)
                print(f"run {run} {name:<8} {seconds * 1000:8.1f} ms  {size / 1e6:6.1f} MB csv")
        rss_growth = peak_mb() - small_peak
        with charter.engine.begin() as conn:
            conn.execute(text("UPDATE invoices SET tenant_id = 't1' WHERE tenant_id = 'small'"))
    finally:
        charter.close()
    rows = total // TENANTS
    c, r = statistics.median(charter_times), statistics.median(raw_times)
    print(f"{rows} rows: charter {rows / c:,.0f} rows/s, raw named cursor {rows / r:,.0f} rows/s")
    print(json.dumps({
        "benchmark": "export", "quick": args.quick, "total_rows": total, "exported_rows": rows,
        "charter_s": round(c, 4), "raw_s": round(r, 4), "rows_ratio": round(r / c, 3),
        "rss_growth_mb": round(rss_growth, 2), "machine": machine(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
