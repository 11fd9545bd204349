"""Gate overhead: the same handler through ``charter.execute`` vs. a hand-written transaction.

(a) ``charter.execute(actor, "bench.bump", target=id)``: validation, tenant-scoped
    locked load, policy, handler, version bump, audit entry (one INSERT), commit.
(b) the minimum a careful developer writes by hand, on the same engine::

        with Session(write_engine) as s:
            row = s.execute(select(Item).where(Item.id == id, Item.tenant_id == tenant)
                            .with_for_update()).scalar_one()
            handler(row)
            s.commit()

    ``write_engine`` is Charter's own engine with the same write option the gate
    uses (SQLite: ``BEGIN IMMEDIATE``, WAL, same pragmas; PostgreSQL: nothing).

Figures (targets from the issue):

* ``ratio_pg``      median per-op time (a)/(b) on PostgreSQL, single thread  (<= 1.3)
* ``ratio_sqlite``  the same on a SQLite file                                (<= 1.8)
* ``concurrent_audit_ratio_pg``  8 threads on distinct records, PostgreSQL:
  throughput with the audit trail on / with it off (a no-op trail)          (>= 0.8);
  nine short runs per side, alternating, and the figure is the median of the
  ratios of adjacent on/off runs (the ratio of the medians is printed too)

(a) and (b) run interleaved op by op after a warm-up (the first of each pair
alternating); each figure is the median of all per-op times, so drift
(autovacuum, WAL checkpoints, a shared VM's speed) hits both sides alike. (Until
2026-11-22 the sides ran in alternating blocks of 100-500 ops, and the median of
block means moved by +-0.1 between runs on this VM; see benchmarks/RESULTS.md.)
The ratio of the medians of per-round means is printed alongside as a drift
check. ``--quick`` measures the same figures
with smaller sizes (under 60 s). ``--profile`` also prints cProfile summaries
of the gate path on both databases. The last line of output is one JSON object.

PostgreSQL: ``$CHARTER_PG_URL`` (default the test server) with the database
name replaced by ``charter_bench``, created if missing, so the test database
is never touched.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import _common
from pydantic import BaseModel
from sqlalchemy import String, event, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from charter import Actor, Charter
from charter.audit import AuditEntry, AuditKeyring, AuditLease, AuditTrail, _Stream
from charter.context import ActionContext
from charter.migrate import upgrade
from charter.storage import WRITE_OPTION

PG_URL = os.environ.get(
    "CHARTER_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/charter_test"
)
BENCH_DB = "charter_bench"
AUDIT_KEYS = {"k1": "bench-audit-key-0123456789"}
TENANT = "t1"
ROWS = 200  # rows rotated through by the single-thread measurement
WORKERS = 8
ROWS_PER_WORKER = 16


# -- the benchmark's own application ----------------------------------------------------


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "bench_gate_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    counter: Mapped[int] = mapped_column(default=0)
    state: Mapped[str] = mapped_column(String(32), default="open")
    version: Mapped[int] = mapped_column(default=1)


def bump(item: Item) -> dict[str, int]:
    """The business effect, shared verbatim by (a) and (b)."""
    item.counter += 1
    return {"counter": item.counter}


def is_member(actor: Any, record: Any, ctx: ActionContext) -> bool:
    return "member" in actor.roles


class NullLease(AuditLease):
    """A lease that writes nothing: 'auditing off' for the concurrent comparison."""

    def write(self, session: Session, entries: Any) -> None:
        return None

    def seal(self, entries: Any) -> list[dict[str, Any]]:
        return []  # nothing to write, on any path

    def committed(self) -> None:
        return None

    def rolled_back(self) -> None:
        return None

    def abandon(self) -> None:
        return None


class NullTrail(AuditTrail):
    """An audit trail whose leases write nothing (the gate still builds the entry)."""

    _stream = _Stream("null")

    def lease(self) -> AuditLease:
        return NullLease(self, self._stream)


def build_charter(url: str, *, audited: bool = True) -> Charter:
    trail = None if audited else NullTrail(AuditKeyring(AUDIT_KEYS))
    charter = Charter(database_url=url, audit_keys=AUDIT_KEYS, audit_trail=trail)
    charter.resource(Item, tenant="tenant_id", state="state", version="version")

    @charter.action("bench.bump", on=Item, allow=is_member)
    def bump_action(ctx: ActionContext, item: Item, data: BaseModel) -> dict[str, int]:
        return bump(item)

    return charter


def prepare_schema(engine: Engine, rows: int) -> None:
    """Charter's tables by migration, ours by create_all; fresh rows, empty audit trail."""
    upgrade(engine)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM charter_audit"))
        conn.execute(
            Item.__table__.insert(),
            [
                {"id": i, "tenant_id": TENANT, "counter": 0, "state": "open", "version": 1}
                for i in range(1, rows + 1)
            ],
        )
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE bench_gate_items"))
            conn.execute(text("VACUUM ANALYZE charter_audit"))


def pg_bench_url() -> str | None:
    return _common.pg_bench_url(BENCH_DB)


# -- the two paths ----------------------------------------------------------------------


def gate_op(charter: Charter, actor: Actor) -> Callable[[int], None]:
    execute = charter.execute

    def op(item_id: int) -> None:
        execute(actor, "bench.bump", target=item_id)

    return op


def baseline_op(charter: Charter, tenant: str) -> Callable[[int], None]:
    write_engine = charter.engine.execution_options(**{WRITE_OPTION: True})
    sessions = sessionmaker(write_engine, expire_on_commit=False)

    def op(item_id: int) -> None:
        with sessions() as s:
            row = s.execute(
                select(Item).where(Item.id == item_id, Item.tenant_id == tenant).with_for_update()
            ).scalar_one()
            bump(row)
            s.commit()

    return op


def timed_block(op: Callable[[int], None], ids: list[int]) -> float:
    """Per-op seconds over one block."""
    start = time.perf_counter()
    for i in ids:
        op(i)
    return (time.perf_counter() - start) / len(ids)


@dataclass
class PairResult:
    gate_us: float
    baseline_us: float
    gate_blocks: list[float] = field(default_factory=list)  # per-round means
    baseline_blocks: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.gate_us / self.baseline_us

    @property
    def round_ratio(self) -> float:
        """Drift check: the ratio of the medians of per-round means."""
        return statistics.median(self.gate_blocks) / statistics.median(self.baseline_blocks)


def measure_pair(charter: Charter, rounds: int, per_round: int, warmup: int) -> PairResult:
    """(a) and (b) interleaved op by op, the first of each pair alternating."""
    actor = Actor.make("bench-user", TENANT, roles=["member"])
    a, b = gate_op(charter, actor), baseline_op(charter, TENANT)
    cursor = 0

    def next_ids(n: int) -> list[int]:
        nonlocal cursor
        ids = [(cursor + k) % ROWS + 1 for k in range(n)]
        cursor += n
        return ids

    timed_block(a, next_ids(warmup))
    timed_block(b, next_ids(warmup))
    per_op, means = _common.interleave(
        {"a": a, "b": b}, [("a", "b"), ("b", "a")], rounds, per_round, next_ids
    )
    return PairResult(
        gate_us=statistics.median(per_op["a"]) * 1e6,
        baseline_us=statistics.median(per_op["b"]) * 1e6,
        gate_blocks=[x * 1e6 for x in means["a"]],
        baseline_blocks=[x * 1e6 for x in means["b"]],
    )


# -- concurrency ------------------------------------------------------------------------


def throughput(charter: Charter, seconds: float, first_id: int) -> float:
    """Ops/s of WORKERS threads, each bumping its own ROWS_PER_WORKER records."""
    barrier = threading.Barrier(WORKERS + 1)
    counts = [0] * WORKERS
    errors: list[BaseException] = []
    stop = threading.Event()

    def worker(w: int) -> None:
        actor = Actor.make(f"bench-worker-{w}", TENANT, roles=["member"])
        ids = [first_id + w * ROWS_PER_WORKER + k for k in range(ROWS_PER_WORKER)]
        n = 0
        barrier.wait()
        try:
            while not stop.is_set():
                charter.execute(actor, "bench.bump", target=ids[n % ROWS_PER_WORKER])
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


def measure_concurrent(url: str, runs: int, seconds: float) -> ConcurrentResult:
    audited = build_charter(url, audited=True)
    unaudited = build_charter(url, audited=False)
    # Separate record ranges for the two configurations (both beyond the
    # single-thread rows), so neither inherits the other's dead tuples.
    base_on, base_off = ROWS, ROWS + WORKERS * ROWS_PER_WORKER
    try:
        throughput(audited, min(seconds, 1.0), base_on + 1)  # warm-up: pools, caches
        throughput(unaudited, min(seconds, 1.0), base_off + 1)
        on: list[float] = []
        off: list[float] = []
        for k in range(runs):
            if k % 2 == 0:
                on.append(throughput(audited, seconds, base_on + 1))
                off.append(throughput(unaudited, seconds, base_off + 1))
            else:
                off.append(throughput(unaudited, seconds, base_off + 1))
                on.append(throughput(audited, seconds, base_on + 1))
    finally:
        audited.engine.dispose()
        unaudited.engine.dispose()
    return ConcurrentResult(statistics.median(on), statistics.median(off), on, off)


# -- statement counts and profile -------------------------------------------------------


@contextmanager
def count_statements(engine: Engine) -> Iterator[dict[str, Any]]:
    """Count statements sent through the engine (cursor executes) plus BEGIN/COMMIT events."""
    seen: dict[str, Any] = {"statements": [], "begin": 0, "commit": 0, "rollback": 0}

    def on_execute(
        conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool
    ) -> None:
        seen["statements"].append(" ".join(statement.split())[:60])

    def on_begin(conn: Any) -> None:
        seen["begin"] += 1

    def on_commit(conn: Any) -> None:
        seen["commit"] += 1

    def on_rollback(conn: Any) -> None:
        seen["rollback"] += 1

    listeners = [
        ("before_cursor_execute", on_execute),
        ("begin", on_begin),
        ("commit", on_commit),
        ("rollback", on_rollback),
    ]
    for name, fn in listeners:
        event.listen(engine, name, fn)
    try:
        yield seen
    finally:
        for name, fn in listeners:
            event.remove(engine, name, fn)


def statements_per_call(charter: Charter) -> dict[str, dict[str, Any]]:
    actor = Actor.make("bench-user", TENANT, roles=["member"])
    result = {}
    for name, op in (("gate", gate_op(charter, actor)), ("baseline", baseline_op(charter, TENANT))):
        op(1)  # warm
        with count_statements(charter.engine) as seen:
            op(2)
        stmts = seen["statements"]
        # The SQLite BEGIN IMMEDIATE is itself a cursor execute (from the begin event);
        # psycopg sends its BEGIN implicitly, as one round trip of its own.
        explicit_begin = sum(1 for s in stmts if s.upper().startswith("BEGIN"))
        round_trips = len(stmts) + seen["commit"] + (seen["begin"] - explicit_begin)
        result[name] = {
            "statements": [s for s in stmts if not s.upper().startswith("BEGIN")],
            "begin": seen["begin"],
            "commit": seen["commit"],
            "round_trips": round_trips,
        }
    return result


def profile_gate(charter: Charter, calls: int, top: int = 28) -> str:
    actor = Actor.make("bench-user", TENANT, roles=["member"])
    op = gate_op(charter, actor)
    for i in range(200):
        op(i % ROWS + 1)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for i in range(calls):
        op(i % ROWS + 1)
    profiler.disable()
    wall = (time.perf_counter() - start) / calls * 1e6
    stats = pstats.Stats(profiler)
    rows = []
    for (filename, line, func), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        short = filename.split("site-packages/")[-1].split("src/")[-1]
        rows.append((ct / calls * 1e6, tt / calls * 1e6, nc / calls, f"{short}:{line}({func})"))
    rows.sort(reverse=True)
    out = io.StringIO()
    out.write(f"  {calls} gate calls under cProfile: {wall:.0f} us/call wall (profiled)\n")
    out.write(f"  {'cum us/call':>11} {'own us/call':>11} {'calls/op':>8}  function\n")
    for cum, own, n, name in rows[:top]:
        out.write(f"  {cum:11.1f} {own:11.1f} {n:8.1f}  {name}\n")
    own_rows = sorted(rows, key=lambda r: r[1], reverse=True)[:15]
    out.write("  -- by own time --\n")
    for cum, own, n, name in own_rows:
        out.write(f"  {cum:11.1f} {own:11.1f} {n:8.1f}  {name}\n")
    return out.getvalue()


def micro_costs(charter: Charter, n: int = 5000) -> dict[str, float]:
    """Pure-Python pieces of the gate, timed in isolation (us per call)."""
    from charter.audit import digest_input
    from charter.resources import request_id_or_new

    spec = charter.spec("bench.bump")
    actor = Actor.make("bench-user", TENANT, roles=["member"])
    data = spec.validate(None)
    trail = AuditTrail(charter.keyring)
    stream = _Stream("s" * 32)
    entry = AuditEntry(
        at=charter.clock(),
        subject="bench-user",
        subject_kind="user",
        channel="http",
        action="bench.bump",
        decision="allow",
        outcome="ok",
        tenant=TENANT,
        resource_type="bench_gate_items",
        resource_id="1",
        input_digest="0" * 64,
    )
    item = Item(id=1, tenant_id=TENANT, counter=0, state="open", version=1)
    resource = spec.resource
    assert resource is not None
    cases: dict[str, Callable[[], Any]] = {
        "spec.validate(None)": lambda: spec.validate(None),
        "request_id_or_new(None) (uuid4)": lambda: request_id_or_new(None),
        "digest_input(NoInput())": lambda: digest_input(data),
        "AuditTrail.seal (as_row+canonical json+HMAC)": lambda: trail.seal(stream, entry),
        "build select(...).where(..).with_for_update()": lambda: (
            select(resource.model)
            .where(resource.column(resource.id) == 1)
            .where(resource.column(resource.tenant) == TENANT)
            .with_for_update()
        ),
        "charter.decide": lambda: charter.decide(spec, actor, item, None),  # type: ignore[arg-type]
    }
    out = {}
    for name, fn in cases.items():
        for _ in range(200):
            fn()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        out[name] = (time.perf_counter() - start) / n * 1e6
    return out


# -- reporting --------------------------------------------------------------------------


machine = _common.machine
loadavg = _common.loadavg


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (< 60 s)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print cProfile summaries and micro-costs of the gate path",
    )
    args = parser.parse_args()

    if args.quick:
        blocks, per_block, warmup, conc_runs, conc_seconds, prof_calls = 10, 100, 200, 9, 1.0, 1000
    else:
        blocks, per_block, warmup, conc_runs, conc_seconds, prof_calls = 20, 500, 500, 9, 2.0, 3000

    t0 = time.perf_counter()
    info = machine()
    print(
        f"gate_overhead: {'quick' if args.quick else 'full'} run, "
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}"
    )
    print(
        f"machine: nproc={info['nproc']} arch={info['arch']} python={info['python']} "
        f"charter={info['rev']} loadavg={loadavg()}"
    )
    print(
        f"sizes: {blocks} rounds x {per_block} interleaved pairs, warm-up {warmup}; "
        f"concurrent {WORKERS} threads, {conc_runs} runs x {conc_seconds:.1f} s per side"
    )

    figures: dict[str, float | None] = dict.fromkeys(
        (
            "ratio_pg",
            "ratio_sqlite",
            "concurrent_audit_ratio_pg",
            "gate_us_pg",
            "baseline_us_pg",
            "gate_us_sqlite",
            "baseline_us_sqlite",
            "audited_ops_s_pg",
            "unaudited_ops_s_pg",
        )
    )
    lines: list[str] = []
    profiles: list[str] = []
    counts: dict[str, dict[str, dict[str, Any]]] = {}

    # SQLite ------------------------------------------------------------------------
    with tempfile.TemporaryDirectory(prefix="charter-bench-") as tmp:
        url = f"sqlite:///{tmp}/bench.db"
        charter = build_charter(url)
        prepare_schema(charter.engine, ROWS)
        sqlite_version = charter.engine.dialect.dbapi.sqlite_version  # type: ignore[union-attr]
        res = measure_pair(charter, blocks, per_block, warmup)
        figures.update(
            ratio_sqlite=res.ratio, gate_us_sqlite=res.gate_us, baseline_us_sqlite=res.baseline_us
        )
        lines.append(
            f"  {'SQLite ' + sqlite_version:<22} {res.gate_us:10.1f} "
            f"{res.baseline_us:12.1f} {res.ratio:7.2f} ({res.round_ratio:4.2f})   <= 1.8"
        )
        counts["sqlite"] = statements_per_call(charter)
        if args.profile:
            profiles.append("SQLite gate profile:\n" + profile_gate(charter, prof_calls))
            micro = micro_costs(charter)
        charter.engine.dispose()

    # PostgreSQL --------------------------------------------------------------------
    pg_url = pg_bench_url()
    pg_version = "unavailable"
    conc: ConcurrentResult | None = None
    if pg_url is not None:
        charter = build_charter(pg_url)
        with charter.engine.connect() as conn:
            pg_version = str(conn.execute(text("SHOW server_version")).scalar()).split()[0]
        prepare_schema(charter.engine, ROWS + 2 * WORKERS * ROWS_PER_WORKER)
        res = measure_pair(charter, blocks, per_block, warmup)
        figures.update(ratio_pg=res.ratio, gate_us_pg=res.gate_us, baseline_us_pg=res.baseline_us)
        lines.append(
            f"  {'PostgreSQL ' + pg_version:<22} {res.gate_us:10.1f} "
            f"{res.baseline_us:12.1f} {res.ratio:7.2f} ({res.round_ratio:4.2f})   <= 1.3"
        )
        counts["pg"] = statements_per_call(charter)
        if args.profile:
            profiles.append("PostgreSQL gate profile:\n" + profile_gate(charter, prof_calls))
        charter.engine.dispose()
        conc = measure_concurrent(pg_url, conc_runs, conc_seconds)
        figures.update(
            concurrent_audit_ratio_pg=conc.ratio,
            audited_ops_s_pg=conc.audited,
            unaudited_ops_s_pg=conc.unaudited,
        )

    print(f"versions: PostgreSQL {pg_version}")
    print()
    print("single thread, median per-op time (us); (drift check: ratio of round means)")
    header = f"  {'database':<22} {'gate (a)':>10} {'baseline (b)':>12} {'(a)/(b)':>7}"
    print(header + "          target")
    for line in lines:
        print(line)
    if conc is not None:
        print()
        print(f"PostgreSQL, {WORKERS} threads on distinct records (ops/s, median of {conc_runs})")
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
    print()
    print("statements per call (round trips = statements + BEGIN + COMMIT)")
    for db, per in counts.items():
        for side, c in per.items():
            print(
                f"  {db:<6} {side:<8} {c['round_trips']} round trips: BEGIN, "
                + ", ".join(c["statements"])
                + ", COMMIT"
            )
    if args.profile:
        print()
        for p in profiles:
            print(p)
        print("pure-Python pieces in isolation (us/call):")
        for name, us in micro.items():
            print(f"  {us:8.1f}  {name}")
    print()
    print(f"total time {time.perf_counter() - t0:.1f} s, loadavg at end {loadavg()}")
    print(json.dumps({k: (None if v is None else round(v, 3)) for k, v in figures.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
