"""Rate limit overhead: a gate call counted against a rate class vs. the same call without limits.

The call is gate_overhead's: the README quickstart's ``invoice.approve`` (input
model, approver rule, optional idempotency, real audit keys), called without a
key by an approver, each op approving a fresh submitted invoice, on
PostgreSQL. The sides differ only in ``Charter(rate_limits=)``:

(plain)  no rate limits: the pipeline has no ``rate_limit`` stage;
(memory) ``RateLimiter("memory://")``: the default in-process store;
(redis)  ``RateLimiter($CHARTER_REDIS_URL)``: the shared store, one round trip
         per call (``limits``' ``incr_expire`` script: INCRBY, EXPIRE on the first).

Each limited side counts every call against the ``write`` class, with a limit
high enough never to refuse (so every op does the whole call); the class, the
window arithmetic, the key hashing, the RateLimit states on the Outcome are
the default path's. All sides run interleaved op by op (the order cycling
through all permutations), each figure the median of all per-op times; the
ratio of the medians of per-round means is printed as a drift check.

Figures (targets from the issue):

* ``redis_overhead_ratio``   median per-op time redis / plain   (<= 1.1)
* ``memory_overhead_ratio``  median per-op time memory / plain  (<= 1.03)
* ``plain_us``, ``memory_us``, ``redis_us``, and ``redis_check_us`` (one
  check alone, the Redis round trip included), informational.

``--quick``: the same figures with smaller sizes (under 60 s). The last line
of output is one JSON object. PostgreSQL: ``$CHARTER_PG_URL`` with the
database ``charter_bench_ratelimit`` (created if missing); Redis:
``$CHARTER_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``), keys under the
``charter-rl`` prefix only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import _common
from gate_overhead import (
    ACTION,
    AUDIT_KEYS,
    INPUT,
    Approve,
    Ids,
    Invoice,
    bench_actor,
    prepare_schema,
)
from sqlalchemy import text

from charter import Charter
from charter.ratelimit import RateClass, RateLimiter

BENCH_DB = "charter_bench_ratelimit"
REDIS_URL = os.environ.get("CHARTER_REDIS_URL", "redis://127.0.0.1:6379/0")
SIDES = ("plain", "memory", "redis")
#: Never refuses: every op is a whole call (the class and its arithmetic are the default's).
WRITE = RateClass("write", "1000000000/minute")


def build(url: str, rate_limits: RateLimiter | None) -> Charter:
    charter = Charter(database_url=url, audit_keys=AUDIT_KEYS, rate_limits=rate_limits)
    charter.resource(Invoice, tenant="tenant_id", state="state", version="version")

    @charter.action(
        ACTION, on=Invoice, input=Approve, idempotency="optional", allow=_common.APPROVER_RULE
    )
    def approve(ctx: Any, invoice: Invoice, data: Approve) -> dict[str, Any]:
        invoice.state = "approved"
        return {"id": invoice.id, "state": invoice.state}

    return charter


def gate_op(charter: Charter) -> Callable[[int], None]:
    execute, actor = charter.execute, bench_actor()

    def op(item_id: int) -> None:
        execute(actor, ACTION, INPUT, target=item_id)

    return op


def check_us(limiter: RateLimiter, calls: int) -> float:
    """Median time of one check alone (the store's round trip included), in us."""
    cls, who = limiter.rate_class("write"), RateLimiter.who("acme", "bob")
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        limiter.check(cls, who, datetime.now(UTC))
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (< 60 s)")
    args = parser.parse_args()
    rounds, per_round, warmup = (5, 150, 100) if args.quick else (20, 600, 400)
    rows = len(SIDES) * (warmup + rounds * per_round) + 100
    info = _common.machine()
    print(
        f"ratelimit: {'quick' if args.quick else 'full'} run, "
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}"
    )
    print(
        f"machine: nproc={info['nproc']} cpu={info['cpu']} arch={info['arch']} "
        f"python={info['python']} charter={info['rev']} loadavg={_common.loadavg()}"
    )
    print(f"sizes: {rounds} rounds x {per_round} steps, warm-up {warmup}/side")
    figures: dict[str, float | None] = dict.fromkeys(
        ("redis_overhead_ratio", "memory_overhead_ratio", "plain_us", "memory_us", "redis_us",
         "redis_check_us")
    )  # fmt: skip
    url = _common.pg_bench_url(BENCH_DB)
    if url is None:
        print(json.dumps(figures))
        return 1
    redis_limiter = RateLimiter(REDIS_URL, classes=[WRITE])
    charters = {
        "plain": build(url, None),
        "memory": build(url, RateLimiter("memory://", classes=[WRITE])),
        "redis": build(url, redis_limiter),
    }
    try:
        with charters["plain"].engine.connect() as conn:
            version = str(conn.execute(text("SHOW server_version")).scalar()).split()[0]
        print(f"versions: PostgreSQL {version}, Redis at {redis_limiter.counters!r}")
        prepare_schema(charters["plain"].engine, rows)
        ops = {side: gate_op(charter) for side, charter in charters.items()}
        ids = Ids(1, rows)
        for op in ops.values():
            for i in ids.take(warmup):
                op(i)
        orders = list(itertools.permutations(ops))
        per_op, means = _common.interleave(ops, orders, rounds, per_round, ids.take)
        us = {s: statistics.median(v) * 1e6 for s, v in per_op.items()}
        round_us = {s: statistics.median(v) * 1e6 for s, v in means.items()}
        figures.update(
            redis_overhead_ratio=us["redis"] / us["plain"],
            memory_overhead_ratio=us["memory"] / us["plain"],
            plain_us=us["plain"],
            memory_us=us["memory"],
            redis_us=us["redis"],
            redis_check_us=check_us(redis_limiter, 2000 if args.quick else 10000),
        )
        print()
        print("median per-op time (us); in parentheses the drift check (ratio of round means)")
        for side in SIDES:
            print(
                f"  {side:<7} {us[side]:8.1f}   /plain {us[side] / us['plain']:5.3f} "
                f"({round_us[side] / round_us['plain']:5.3f})"
            )
        print(f"  one Redis check alone: {figures['redis_check_us']:.1f} us")
        print("  targets: redis/plain <= 1.1, memory/plain <= 1.03")
    finally:
        for charter in charters.values():
            charter.close()
    _common.print_figures(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
