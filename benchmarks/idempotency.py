"""Idempotency keys: what a key costs, what a replay costs, and exactly-once under load.

Figures (targets from the issue):

* ``first_run_ratio``  median per-op time of a keyed *first* execution (a fresh key
  each time) / the same action without a key, PostgreSQL, single thread   (<= 1.15)
* ``replay_ratio``     median per-op time of a replay (an already-used key, same
  input) answered by the instance that ran the original / a keyed first
  execution, PostgreSQL, single thread                                     (<= 0.5)
* ``replay_cold_ratio``  the same for a *cold* replay: a retry answered by a second
  worker that did not run the original and has no in-process trace of it (a
  second ``Charter`` instance on the same database, built by the same
  ``build_charter`` as the worker processes of the concurrency run: its own
  engine and pool, its own outcome cache, which has never seen the key) /
  a keyed first execution on the first instance, PostgreSQL               (<= 0.6)
* ``duplicates_executed``  handler executions beyond one per key when 16 workers
  retry the same K keys concurrently on PostgreSQL (16 threads; 16 threads all in
  the same key order; 4 spawned processes x 4 threads), summed         (== 0)
  with ``throughput_rps`` (requests/s of the 16-thread shuffled run) and the split
  of outcomes: first executions, replays, 409 ``IdempotencyKeyInProgress`` retries.

The same single-thread ratios are measured on a SQLite file
(``first_run_ratio_sqlite``, ``replay_ratio_sqlite``, ``replay_cold_ratio_sqlite``).

Method. The benchmark declares its own model (``bench_idem_items``) and its own
Charter with two actions sharing one handler (``counter += 1``): ``bench.bump``
(``idempotency="none"``) and ``bench.bump_keyed`` (``idempotency="required"``),
with the same validated input. Four paths, all through ``charter.execute`` with
default settings:

(unkeyed)       ``bench.bump`` on instance 1, no key;
(keyed first)   ``bench.bump_keyed`` on instance 1 with a fresh key;
(replay)        ``bench.bump_keyed`` on instance 1 with a key instance 1 executed
                earlier (oldest first, each once): its outcome cache may answer;
(replay, cold)  ``bench.bump_keyed`` on instance 2 with a key instance 1 executed
                earlier (oldest first, each once): instance 2's cache never has it,
                so the stored outcome comes from the database. Nothing is disabled
                on either instance.

After a warm-up (which also warms instance 2's pool and statement caches with
cold replays), the four paths run interleaved op by op (one of each per step, the
order cycling through all 24 permutations), rotating over many rows, so that the
four share every moment of a run on a noisy machine. Every single operation is
timed and each figure is the median of all its per-op times (the ratio of the
medians of the per-round means is printed alongside as a drift check). (Until
2026-11-22 the paths ran in blocks of 100-300 ops; on a shared VM whose speed
drifted by 2x within a minute, block-wise figures moved by +-0.15 from run to
run, see benchmarks/RESULTS.md.)

Concurrency: every worker goes through all K keys (each key targets its own
row) in its own shuffled order -- or, in the lockstep variant, all in the same
order, so that the duplicates of a key really overlap. A 409 is retried after
1 ms and counted. Afterwards each key's row must show ``counter == 1``:
``duplicates_executed = sum(max(counter - 1, 0))`` (= ``sum(counter) - K`` when no
key is missing, which is checked too).

Also printed: statements (round trips) per call for each path, a cProfile
summary of the replay path (``--profile``: also the cold replay, keyed-first and
unkeyed paths).

PostgreSQL: ``$CHARTER_PG_URL`` (default the test server) with the database
name replaced by ``charter_bench_idem``, created if missing, so the test
database is never touched. ``--quick``: same figures, smaller sizes (< 60 s).
The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import json
import multiprocessing
import os
import pstats
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import _common
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import String, event, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from charter import ActionContext, Actor, Charter, CharterError, IdempotencyKeyInProgress
from charter.migrate import upgrade

PG_URL = os.environ.get(
    "CHARTER_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/charter_test"
)
BENCH_DB = "charter_bench_idem"
AUDIT_KEYS = {"k1": "bench-audit-key-0123456789"}
TENANT = "t1"
SUBJECT = "bench-user"
ROWS = 200  # rows rotated through by the single-thread measurement
INPUT = {"amount": "1"}
UNKEYED, KEYED, REPLAY, COLD = "unkeyed", "keyed first", "replay", "replay, cold"
SIDES = (UNKEYED, KEYED, REPLAY, COLD)


# -- the benchmark's own application ----------------------------------------------------


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "bench_idem_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    counter: Mapped[int] = mapped_column(default=0)
    version: Mapped[int] = mapped_column(default=1)


class BumpInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    amount: Decimal = Field(gt=0, max_digits=12, decimal_places=2)


def is_member(actor: Any, record: Any, ctx: ActionContext) -> bool:
    return "member" in actor.roles


def bump(ctx: ActionContext, item: Item, data: BumpInput) -> dict[str, int]:
    item.counter += 1
    return {"counter": item.counter}


def build_charter(url: str, cls: type[Charter] = Charter) -> Charter:
    charter = cls(database_url=url, audit_keys=AUDIT_KEYS, rate_limits=_common.rate_limits())
    charter.resource(Item, tenant="tenant_id", version="version")
    charter.action("bench.bump", on=Item, input=BumpInput, allow=is_member, idempotency="none")(
        bump
    )
    charter.action(
        "bench.bump_keyed", on=Item, input=BumpInput, allow=is_member, idempotency="required"
    )(bump)
    return charter


def bench_actor() -> Actor:
    return Actor.make(SUBJECT, TENANT, roles=["member"])


def prepare_schema(engine: Engine, rows: int) -> None:
    """Charter's tables by migration, ours by create_all; fresh rows, empty audit/keys."""
    upgrade(engine)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM charter_audit"))
        conn.execute(text("DELETE FROM charter_idempotency_outcomes"))
        conn.execute(text("DELETE FROM charter_idempotency"))
        conn.execute(
            Item.__table__.insert(),
            [
                {"id": i, "tenant_id": TENANT, "counter": 0, "version": 1}
                for i in range(1, rows + 1)
            ],
        )
    vacuum(engine)


def vacuum(engine: Engine) -> None:
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            for table in (
                "bench_idem_items",
                "charter_audit",
                "charter_idempotency",
                "charter_idempotency_outcomes",
            ):
                conn.execute(text(f"VACUUM ANALYZE {table}"))


def pg_bench_url() -> str | None:
    return _common.pg_bench_url(BENCH_DB)


# -- the three paths ---------------------------------------------------------------------


class KeyPool:
    """Fresh keys for first executions; used keys queued for replays (oldest first).

    Each used key is queued twice: once for a replay by the instance that ran it
    (``used``), once for a replay by the second instance (``used_cold``).
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.n = 0
        self.used: deque[tuple[str, int]] = deque()
        self.used_cold: deque[tuple[str, int]] = deque()

    def fresh(self, item_id: int) -> str:
        self.n += 1
        key = f"{self.prefix}-{self.n}"
        self.used.append((key, item_id))
        self.used_cold.append((key, item_id))
        return key


def make_ops(
    charter: Charter, pool: KeyPool, cold: Charter | None = None
) -> dict[str, Callable[[int], None]]:
    """The paths; ``cold`` is a second instance on the same database (a second worker)."""
    actor = bench_actor()
    execute = charter.execute

    def unkeyed(item_id: int) -> None:
        execute(actor, "bench.bump", INPUT, target=item_id)

    def keyed(item_id: int) -> None:
        out = execute(actor, "bench.bump_keyed", INPUT, target=item_id, key=pool.fresh(item_id))
        assert not out.replayed

    def replay(_item_id: int) -> None:
        key, item_id = pool.used.popleft()
        out = execute(actor, "bench.bump_keyed", INPUT, target=item_id, key=key)
        assert out.replayed

    ops = {UNKEYED: unkeyed, KEYED: keyed, REPLAY: replay}
    if cold is not None:
        cold_execute = cold.execute

        def replay_cold(_item_id: int) -> None:
            key, item_id = pool.used_cold.popleft()
            out = cold_execute(actor, "bench.bump_keyed", INPUT, target=item_id, key=key)
            assert out.replayed

        ops[COLD] = replay_cold
    return ops


def timed_block(op: Callable[[int], None], ids: list[int], sink: list[float]) -> float:
    """Times each op into ``sink``; returns the block's mean per-op seconds."""
    clock = time.perf_counter
    start = clock()
    for i in ids:
        t = clock()
        op(i)
        sink.append(clock() - t)
    return (clock() - start) / len(ids)


@dataclass
class SingleResult:
    per_op: dict[str, list[float]]
    block_means: dict[str, list[float]]  # per round

    def us(self, side: str) -> float:
        return statistics.median(self.per_op[side]) * 1e6

    def block_us(self, side: str) -> float:
        return statistics.median(self.block_means[side]) * 1e6

    def p90_us(self, side: str) -> float:
        return statistics.quantiles(self.per_op[side], n=10)[-1] * 1e6

    @property
    def first_run_ratio(self) -> float:
        return self.us(KEYED) / self.us(UNKEYED)

    @property
    def replay_ratio(self) -> float:
        return self.us(REPLAY) / self.us(KEYED)

    @property
    def replay_cold_ratio(self) -> float:
        return self.us(COLD) / self.us(KEYED)


ORDERS = list(itertools.permutations(SIDES))  # every order of the four paths, in turn


def measure_single(
    charter: Charter, cold: Charter, rounds: int, per_round: int, warmup: int, prefix: str
) -> SingleResult:
    """Per-op interleaving: each step runs the four paths once, in a rotating order."""
    pool = KeyPool(prefix)
    ops = make_ops(charter, pool, cold)
    cursor = 0

    def next_ids(n: int) -> list[int]:
        nonlocal cursor
        ids = [(cursor + k) % ROWS + 1 for k in range(n)]
        cursor += n
        return ids

    scratch: list[float] = []
    # Warm-up: pools, statement caches; leaves a stock of used keys for the replays.
    # Each replay path then has a stock of ``warmup`` keys more than it consumes.
    for side in (UNKEYED, KEYED, KEYED, REPLAY, COLD):
        timed_block(ops[side], next_ids(warmup), scratch)
    per_op, means = _common.interleave(ops, ORDERS, rounds, per_round, next_ids)
    return SingleResult(per_op, means)


# -- statement counts, round-trip latency, profile ---------------------------------------


@contextmanager
def count_statements(engine: Engine) -> Iterator[dict[str, Any]]:
    seen: dict[str, Any] = {"statements": [], "begin": 0, "commit": 0, "rollback": 0}

    def on_execute(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        seen["statements"].append(" ".join(statement.split())[:48])

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


def statements_per_call(charter: Charter, cold: Charter) -> dict[str, dict[str, Any]]:
    pool = KeyPool("count")
    ops = make_ops(charter, pool, cold)
    ops[UNKEYED](1)
    ops[KEYED](2)
    ops[KEYED](3)
    ops[REPLAY](2)  # warm every path once
    ops[COLD](2)
    result = {}
    for side, item_id in ((UNKEYED, 4), (KEYED, 5), (REPLAY, 3), (COLD, 3)):
        engine = cold.engine if side == COLD else charter.engine
        with count_statements(engine) as seen:
            ops[side](item_id)
        stmts = seen["statements"]
        # SQLite's BEGIN IMMEDIATE is a cursor execute of its own (from the begin event);
        # psycopg sends its BEGIN implicitly, as one round trip of its own.
        explicit = sum(1 for s in stmts if s.upper().startswith("BEGIN"))
        result[side] = {
            "statements": [s for s in stmts if not s.upper().startswith("BEGIN")],
            "transactions": seen["begin"],
            "commit": seen["commit"],
            "rollback": seen["rollback"],
            "round_trips": len(stmts)
            + seen["commit"]
            + seen["rollback"]
            + (seen["begin"] - explicit),
        }
    return result


def round_trip_us(engine: Engine, n: int = 2000) -> float:
    """Median client-observed latency of one trivial statement (one round trip)."""
    samples = []
    with engine.connect() as conn:
        raw = conn.connection.driver_connection
        cur = raw.cursor()  # type: ignore[union-attr]
        for _ in range(n):
            t = time.perf_counter()
            cur.execute("SELECT 1")
            cur.fetchone()
            samples.append(time.perf_counter() - t)
        raw.rollback()  # type: ignore[union-attr]
    return statistics.median(samples) * 1e6


DB_WAIT = (
    ("psycopg/cursor.py", "execute"),
    ("psycopg/connection.py", "commit"),
    ("psycopg/connection.py", "rollback"),
    ("sqlite3.Cursor", "execute"),
    ("sqlite3.Connection", "commit"),
    ("sqlite3.Connection", "rollback"),
)


def profile_path(
    charter: Charter, side: str, calls: int, top: int = 22, cold: Charter | None = None
) -> str:
    pool = KeyPool(f"prof-{side.replace(' ', '-').replace(',', '')}")
    ops = make_ops(charter, pool, cold)
    if side in (REPLAY, COLD):
        for i in range(calls + 50):
            ops[KEYED](i % ROWS + 1)
    for i in range(50):
        ops[side](i % ROWS + 1)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for i in range(calls):
        ops[side](i % ROWS + 1)
    profiler.disable()
    wall = (time.perf_counter() - start) / calls * 1e6
    stats = pstats.Stats(profiler)
    rows = []
    db_wait = 0.0
    for (filename, line, fn), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        short = filename.split("site-packages/")[-1].split("src/")[-1]
        name = f"{short}:{line}({fn})" if line else fn
        rows.append((ct / calls * 1e6, tt / calls * 1e6, nc / calls, name))
        if any(f in name and n in name for f, n in DB_WAIT):
            db_wait += ct / calls * 1e6
    rows.sort(reverse=True)
    out = io.StringIO()
    out.write(
        f"  {calls} {side} calls under cProfile: {wall:.0f} us/call wall (profiled); "
        f"in driver execute/commit/rollback: {db_wait:.0f} us/call\n"
    )
    out.write(f"  {'cum us/call':>11} {'own us/call':>11} {'calls/op':>8}  function\n")
    for cum, own, n, name in rows[:top]:
        out.write(f"  {cum:11.1f} {own:11.1f} {n:8.1f}  {name}\n")
    out.write("  -- by own time --\n")
    for cum, own, n, name in sorted(rows, key=lambda r: r[1], reverse=True)[:12]:
        out.write(f"  {cum:11.1f} {own:11.1f} {n:8.1f}  {name}\n")
    return out.getvalue()


# -- concurrency --------------------------------------------------------------------------


@dataclass
class HammerStats:
    first: int = 0
    replays: int = 0
    retries_409: int = 0
    other_retries: Counter[str] = field(default_factory=Counter)
    start: float = 0.0
    end: float = 0.0

    def add(self, other: HammerStats) -> None:
        self.first += other.first
        self.replays += other.replays
        self.retries_409 += other.retries_409
        self.other_retries.update(other.other_retries)

    @property
    def requests(self) -> int:
        return self.first + self.replays


def hammer(
    charter: Charter,
    keys: list[tuple[str, int]],
    threads: int,
    seed: int,
    lockstep: bool,
    outer_barrier: Any = None,
) -> HammerStats:
    """``threads`` workers each execute every key once (retrying 409s); wall-clock stats."""
    actor = bench_actor()
    barrier = threading.Barrier(threads + 1)
    per_worker = [HammerStats() for _ in range(threads)]
    errors: list[BaseException] = []
    shared = keys[:]
    random.Random(seed).shuffle(shared)

    def worker(w: int) -> None:
        st = per_worker[w]
        order = shared if lockstep else random.Random(seed * 1000 + w).sample(keys, len(keys))
        barrier.wait()
        try:
            for key, item_id in order:
                attempts = 0
                while True:
                    try:
                        out = charter.execute(
                            actor, "bench.bump_keyed", INPUT, target=item_id, key=key
                        )
                    except IdempotencyKeyInProgress:
                        st.retries_409 += 1
                        time.sleep(0.001)
                        continue
                    except CharterError as exc:  # e.g. StorageUnavailable: retry, but count
                        st.other_retries[exc.code] += 1
                        attempts += 1
                        if attempts > 20:
                            raise
                        time.sleep(0.01)
                        continue
                    break
                if out.replayed:
                    st.replays += 1
                else:
                    st.first += 1
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
    for t in workers:
        t.start()
    if outer_barrier is not None:
        outer_barrier.wait()
    total = HammerStats()
    total.start = time.time()
    barrier.wait()
    for t in workers:
        t.join()
    total.end = time.time()
    if errors:
        raise errors[0]
    for st in per_worker:
        total.add(st)
    return total


def _process_worker(
    url: str, keys: list[tuple[str, int]], threads: int, seed: int, barrier: Any, results: Any
) -> None:
    charter = build_charter(url)
    try:
        st = hammer(charter, keys, threads, seed, lockstep=False, outer_barrier=barrier)
        results.put(
            (st.first, st.replays, st.retries_409, dict(st.other_retries), st.start, st.end, None)
        )
    except BaseException as exc:  # report, don't hang the parent
        results.put((0, 0, 0, {}, 0.0, 0.0, repr(exc)))
    finally:
        charter.engine.dispose()


def hammer_processes(
    url: str, keys: list[tuple[str, int]], processes: int, threads: int, seed: int
) -> HammerStats:
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    procs = [
        ctx.Process(target=_process_worker, args=(url, keys, threads, seed + p, barrier, results))
        for p in range(processes)
    ]
    for p in procs:
        p.start()
    total = HammerStats()
    starts, ends = [], []
    failures = []
    for _ in procs:
        first, replays, r409, other, start, end, err = results.get(timeout=300)
        if err:
            failures.append(err)
            continue
        total.add(HammerStats(first, replays, r409, Counter(other)))
        starts.append(start)
        ends.append(end)
    for p in procs:
        p.join(60)
    if failures:
        raise RuntimeError(f"worker processes failed: {failures}")
    total.start, total.end = min(starts), max(ends)
    return total


@dataclass
class ConcurrentResult:
    name: str
    keys: int
    workers: str
    stats: HammerStats
    duplicates: int
    missing: int
    sum_minus_k: int
    idem_rows: int
    first_audit: int

    @property
    def seconds(self) -> float:
        return self.stats.end - self.stats.start

    @property
    def rps(self) -> float:
        return self.stats.requests / self.seconds


def check_rows(charter: Charter, keys: list[tuple[str, int]], prefix: str) -> tuple[int, ...]:
    ids = [item_id for _, item_id in keys]
    like = {"like": f"{prefix}-%"}
    with charter.session() as s:
        counters = s.execute(select(Item.counter).where(Item.id.in_(ids))).scalars().all()
        idem = s.execute(
            text("SELECT count(*) FROM charter_idempotency WHERE key LIKE :like"), like
        ).scalar_one()
        first_audit = s.execute(
            text(
                "SELECT count(*) FROM charter_audit WHERE idempotency_key LIKE :like "
                "AND replayed = :no AND outcome = 'ok'"
            ),
            {**like, "no": False},
        ).scalar_one()
    duplicates = sum(max(c - 1, 0) for c in counters)
    missing = sum(1 for c in counters if c == 0) + (len(ids) - len(counters))
    return duplicates, missing, sum(counters) - len(ids), idem, first_audit


def run_concurrent(
    url: str,
    charter: Charter,
    name: str,
    first_id: int,
    k: int,
    threads: int,
    processes: int,
    lockstep: bool,
    seed: int,
) -> ConcurrentResult:
    prefix = f"conc{seed}"
    keys = [(f"{prefix}-{i}", first_id + i) for i in range(k)]
    if processes > 1:
        st = hammer_processes(url, keys, processes, threads, seed)
        workers = f"{processes} proc x {threads} thr"
    else:
        st = hammer(charter, keys, threads, seed, lockstep)
        workers = f"{threads} threads"
    dup, missing, smk, idem, first_audit = check_rows(charter, keys, prefix)
    return ConcurrentResult(name, k, workers, st, dup, missing, smk, idem, first_audit)


# -- reporting -----------------------------------------------------------------------------


machine = _common.machine
loadavg = _common.loadavg


def print_counts(db: str, counts: dict[str, dict[str, Any]]) -> None:
    for side, c in counts.items():
        print(
            f"  {db:<6} {side:<12} {c['round_trips']:>2} round trips, "
            f"{c['transactions']} txn ({c['commit']} commit, {c['rollback']} rollback): "
            + "; ".join(c["statements"])
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (< 60 s)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile the cold replay, keyed-first and unkeyed paths",
    )
    parser.add_argument(
        "--no-processes", action="store_true", help="skip the 4 processes x 4 threads run"
    )
    args = parser.parse_args()

    if args.quick:
        blocks, per_block, warmup, k, prof_calls = 5, 96, 100, 60, 200
    else:
        blocks, per_block, warmup, k, prof_calls = 18, 288, 400, 200, 1500
    threads = 16

    t0 = time.perf_counter()
    info = machine()
    print(
        f"idempotency benchmark: {'quick' if args.quick else 'full'} run, "
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}"
    )
    print(
        f"machine: nproc={info['nproc']} cpu={info['cpu']} arch={info['arch']} "
        f"python={info['python']} charter={info['rev']} loadavg={loadavg()}"
    )
    print(
        f"sizes: {blocks} rounds x {per_block} interleaved steps (one op per path), warm-up "
        f"{warmup}/side; concurrency K={k} keys x {threads} workers"
    )

    figures: dict[str, Any] = dict.fromkeys(
        (
            "first_run_ratio",
            "replay_ratio",
            "replay_cold_ratio",
            "duplicates_executed",
            "throughput_rps",
            "first_run_ratio_sqlite",
            "replay_ratio_sqlite",
            "replay_cold_ratio_sqlite",
            "keyed_us_pg",
            "unkeyed_us_pg",
            "replay_us_pg",
            "replay_cold_us_pg",
        )
    )
    singles: dict[str, SingleResult] = {}
    counts: dict[str, dict[str, dict[str, Any]]] = {}
    profiles: list[str] = []
    rtt: dict[str, float] = {}
    conc: list[ConcurrentResult] = []

    # SQLite ---------------------------------------------------------------------------
    with tempfile.TemporaryDirectory(prefix="charter-bench-idem-") as tmp:
        charter = build_charter(f"sqlite:///{tmp}/bench.db")
        prepare_schema(charter.engine, ROWS)
        # A second worker: a fresh instance on the same database, built like the
        # processes of the concurrency run; its outcome cache has seen no key.
        cold = build_charter(f"sqlite:///{tmp}/bench.db")
        sqlite_version = charter.engine.dialect.dbapi.sqlite_version  # type: ignore[union-attr]
        res = measure_single(charter, cold, blocks, per_block, warmup, "sq")
        singles[f"SQLite {sqlite_version}"] = res
        figures.update(
            first_run_ratio_sqlite=res.first_run_ratio,
            replay_ratio_sqlite=res.replay_ratio,
            replay_cold_ratio_sqlite=res.replay_cold_ratio,
        )
        counts["sqlite"] = statements_per_call(charter, cold)
        charter.engine.dispose()
        cold.engine.dispose()

    # PostgreSQL -----------------------------------------------------------------------
    pg_url = pg_bench_url()
    pg_version = "unavailable"
    if pg_url is not None:
        charter = build_charter(pg_url)
        with charter.engine.connect() as conn:
            pg_version = str(conn.execute(text("SHOW server_version")).scalar()).split()[0]
        conc_rows = 3 * k
        prepare_schema(charter.engine, ROWS + conc_rows)
        cold = build_charter(pg_url)  # the second worker (see SQLite above)
        res = measure_single(charter, cold, blocks, per_block, warmup, "pg")
        singles[f"PostgreSQL {pg_version}"] = res
        figures.update(
            first_run_ratio=res.first_run_ratio,
            replay_ratio=res.replay_ratio,
            replay_cold_ratio=res.replay_cold_ratio,
            keyed_us_pg=res.us(KEYED),
            unkeyed_us_pg=res.us(UNKEYED),
            replay_us_pg=res.us(REPLAY),
            replay_cold_us_pg=res.us(COLD),
        )
        counts["pg"] = statements_per_call(charter, cold)
        rtt["pg"] = round_trip_us(charter.engine)
        profiles.append("PostgreSQL replay path:\n" + profile_path(charter, REPLAY, prof_calls))
        if args.profile:
            profiles.append(
                "PostgreSQL cold replay path (second instance):\n"
                + profile_path(charter, COLD, prof_calls, cold=cold)
            )
            for side in (KEYED, UNKEYED):
                profiles.append(
                    f"PostgreSQL {side} path:\n" + profile_path(charter, side, prof_calls)
                )
        cold.engine.dispose()
        vacuum(charter.engine)
        conc.append(
            run_concurrent(
                pg_url, charter, "threads, shuffled", ROWS + 1, k, threads, 1, False, seed=1
            )
        )
        conc.append(
            run_concurrent(
                pg_url, charter, "threads, lockstep", ROWS + k + 1, k, threads, 1, True, seed=2
            )
        )
        if not args.no_processes:
            conc.append(
                run_concurrent(
                    pg_url, charter, "processes, shuffled", ROWS + 2 * k + 1, k, 4, 4, False, seed=3
                )
            )
        charter.engine.dispose()
        figures.update(
            duplicates_executed=sum(c.duplicates for c in conc), throughput_rps=conc[0].rps
        )
        for c in conc[1:]:
            tag = c.name.split(",")[0] + ("_lockstep" if "lockstep" in c.name else "")
            figures[f"throughput_rps_{tag.replace(' ', '_')}"] = c.rps

    # Report -----------------------------------------------------------------------------
    print()
    print("single thread, per-op time (us): median of every op [p90] (median of round means)")
    print(
        f"  {'database':<18} {'unkeyed':>22} {'keyed first':>22} {'replay':>22} "
        f"{'replay, cold':>22}  first/unkeyed  replay/first  cold/first"
    )
    for db, r in singles.items():
        cells = "".join(
            f" {r.us(s):7.0f} [{r.p90_us(s):5.0f}] ({r.block_us(s):5.0f})" for s in SIDES
        )
        blk_first = r.block_us(KEYED) / r.block_us(UNKEYED)
        blk_replay = r.block_us(REPLAY) / r.block_us(KEYED)
        blk_cold = r.block_us(COLD) / r.block_us(KEYED)
        print(
            f"  {db:<18}{cells}  {r.first_run_ratio:5.2f} ({blk_first:4.2f})"
            f"   {r.replay_ratio:5.2f} ({blk_replay:4.2f})"
            f"  {r.replay_cold_ratio:5.2f} ({blk_cold:4.2f})"
        )
    print(
        "  targets (PostgreSQL): first/unkeyed <= 1.15, replay/first <= 0.5, "
        "cold replay/first <= 0.6"
    )
    print()
    print("statements per call (round trips = statements + BEGIN + COMMIT/ROLLBACK)")
    for db, per in counts.items():
        print_counts(db, per)
    if rtt:
        print(f"  PostgreSQL round trip (SELECT 1 on an open connection): {rtt['pg']:.0f} us")
    if conc:
        print()
        print(
            "PostgreSQL concurrency: every worker executes all K keys once "
            "(each key its own row); 409s retried after 1 ms"
        )
        print(
            f"  {'run':<20} {'workers':<16} {'K':>4} {'requests':>8} {'s':>6} {'req/s':>7} "
            f"{'first':>6} {'replays':>7} {'409s':>5} {'other':>5} {'dups':>4} "
            f"{'missing':>7} {'keys':>5} {'audit':>5}"
        )
        for c in conc:
            st = c.stats
            print(
                f"  {c.name:<20} {c.workers:<16} {c.keys:>4} {st.requests:>8} "
                f"{c.seconds:6.2f} {c.rps:7.0f} {st.first:>6} {st.replays:>7} "
                f"{st.retries_409:>5} {sum(st.other_retries.values()):>5} {c.duplicates:>4} "
                f"{c.missing:>7} {c.idem_rows:>5} {c.first_audit:>5}"
            )
            if st.other_retries:
                print(f"    other retried errors: {dict(st.other_retries)}")
        print(
            "  dups = sum(max(counter-1, 0)) over the K rows (target 0); missing = rows "
            "never bumped; keys = stored key records; audit = non-replay 'ok' entries "
            "(both should be K)"
        )
    if profiles:
        print()
        for p in profiles:
            print(p)
    print(f"total time {time.perf_counter() - t0:.1f} s, loadavg at end {loadavg()}")
    print(
        json.dumps({k_: (round(v, 3) if isinstance(v, float) else v) for k_, v in figures.items()})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
