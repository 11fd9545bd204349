"""Bulk actions: a per-item batch through Charter vs the same loop written by hand (issue 11).

The action is gate_overhead's quickstart approval (``invoice.approve`` on
``Invoice``, the approver rule, ``idempotency="optional"``, real audit keys),
declared with ``bulk="per_item"``. Every item approves a fresh submitted invoice
with the input ``{"note": "ok"}``, on PostgreSQL.

The sides (each batch is ``--items`` items, every item its own transaction):

(charter) ``charter.execute_many(bob, "invoice.approve", [{"target": id, "input":
    {"note": "ok"}}, ...])``: the default path (no batch key), each item through the
    action's whole pipeline: validation, tenant-scoped ``SELECT ... FOR UPDATE``,
    policy, handler, version bump, sealed audit entry (HMAC-chained), COMMIT.
(core) the fastest hand-written loop doing the same per item, one transaction
    each — gate_overhead's (core) side: SQLAlchemy Core, statements built once::

        for id in ids:
            data = Approve.model_validate(payload)
            with write_engine.begin() as conn:
                row = conn.execute(SELECT_FOR_UPDATE, {"id": id, "tenant": tenant}).one_or_none()
                <rule in Python>
                conn.execute(UPDATE_STATE_VERSION_PLUS_1, ...)
                conn.execute(AUDIT_INSERT, entry)   # HMAC-chained, as gate_overhead's

The Charter side has the default rate limits (every item counts as its single
call, through the ``rate_limit`` stage) with limits no run reaches
(``_common.rate_limits()``): the default write class (300 a minute per actor)
would refuse most of a 1,000-item batch by design.

Method. After a warm-up batch per side, the batches alternate side by side in
ABBA order (charter, core, core, charter, ...), so drift hits both alike. Figures:

* ``ratio``  charter items/s ÷ core items/s over all batches (target >= 0.6)
* ``ratio_median``  the median of the per-pair ratios (drift check)
* ``keyed_ratio``  informational: the charter side with a batch key (item ``i``
  claimed under ``<key>#<i>`` in its own transaction, its outcome stored)
* ``charter_items_s``, ``core_items_s``

``--quick``: 4 batches of 250 items per side (< 60 s). The last line is JSON.
PostgreSQL: ``$CHARTER_PG_URL`` with the database name ``charter_bench_bulk``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import _common
from gate_overhead import (
    ACTION,
    AUDIT_KEYS,
    INPUT,
    Approve,
    Handwritten,
    Ids,
    Invoice,
    bench_actor,
    core_op,
    prepare_schema,
)
from sqlalchemy import text

from charter import Actor, Charter

BENCH_DB = "charter_bench_bulk"


def build_charter(url: str) -> Charter:
    """gate_overhead's quickstart action, declared for bulk requests (one transaction per item)."""
    charter = Charter(database_url=url, audit_keys=AUDIT_KEYS, rate_limits=_common.rate_limits())
    charter.resource(Invoice, tenant="tenant_id", state="state", version="version")

    @charter.action(
        ACTION, on=Invoice, input=Approve, idempotency="optional",
        allow=_common.APPROVER_RULE, bulk="per_item",
    )  # fmt: skip
    def approve(ctx: Any, invoice: Invoice, data: Approve) -> dict[str, Any]:
        invoice.state = "approved"
        return {"id": invoice.id, "state": invoice.state}

    return charter


def charter_batch(charter: Charter, actor: Actor, *, keyed: bool) -> Callable[[list[int]], None]:
    def batch(ids: list[int]) -> None:
        items = [{"target": i, "input": INPUT} for i in ids]
        key = uuid.uuid4().hex if keyed else None
        outcome = charter.execute_many(actor, ACTION, items, key=key)
        if outcome.applied != len(ids):
            raise RuntimeError(f"{outcome.refused} items refused: {outcome.items[0]}")

    return batch


def core_batch(hw: Handwritten, actor: Actor) -> Callable[[list[int]], None]:
    op = core_op(hw, actor)

    def batch(ids: list[int]) -> None:
        for i in ids:
            op(i)

    return batch


def timed(batch: Callable[[list[int]], None], ids: list[int]) -> float:
    start = time.perf_counter()
    batch(ids)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (< 60 s)")
    args = parser.parse_args()
    batches, items, keyed_batches = (4, 250, 2) if args.quick else (10, 1000, 3)

    t0 = time.perf_counter()
    info = _common.machine()
    print(f"bulk: {'quick' if args.quick else 'full'} run, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(
        f"machine: nproc={info['nproc']} cpu={info['cpu']} arch={info['arch']} "
        f"python={info['python']} charter={info['rev']} loadavg={_common.loadavg()}"
    )
    url = _common.pg_bench_url(BENCH_DB)
    if url is None:
        print(json.dumps({"ratio": None}))
        return 1
    charter = build_charter(url)
    actor = bench_actor()
    rows = items * (2 * batches + 2 + 2 * keyed_batches)
    prepare_schema(charter.engine, rows)
    with charter.engine.connect() as conn:
        version = str(conn.execute(text("SHOW server_version")).scalar()).split()[0]
    print(f"PostgreSQL {version}; {batches} batches of {items} items per side, ABBA order")
    ids = Ids(1, rows)
    hw = Handwritten(charter.engine)
    sides = {
        "charter": charter_batch(charter, actor, keyed=False),
        "core": core_batch(hw, actor),
    }
    try:
        for side in sides.values():  # warm-up
            side(ids.take(items))
        times: dict[str, list[float]] = {"charter": [], "core": []}
        for n in range(batches):
            order = ("charter", "core") if n % 2 == 0 else ("core", "charter")
            for side in order:
                times[side].append(timed(sides[side], ids.take(items)))
        keyed = charter_batch(charter, actor, keyed=True)
        keyed_times, core_times = [], []
        for _ in range(keyed_batches):
            keyed_times.append(timed(keyed, ids.take(items)))
            core_times.append(timed(sides["core"], ids.take(items)))
    finally:
        charter.close()

    rate = {side: batches * items / sum(t) for side, t in times.items()}
    ratio = rate["charter"] / rate["core"]
    pairs = [core / mine for mine, core in zip(times["charter"], times["core"], strict=True)]
    keyed_ratio = sum(core_times) / sum(keyed_times)
    print()
    print("items/s per batch (each item one transaction)")
    for side, t in times.items():
        print(
            f"  {side:<8} {rate[side]:8.0f} items/s   batches (s): "
            + ", ".join(f"{x:.2f}" for x in t)
        )
    print(
        f"  ratio charter/core {ratio:.3f} (target >= 0.6); median of pair ratios "
        f"{statistics.median(pairs):.3f}"
    )
    print(
        f"  keyed (batch key, <key>#<i> per item) vs core: {keyed_ratio:.3f} over "
        f"{keyed_batches} pairs"
    )
    print(f"total time {time.perf_counter() - t0:.1f} s, loadavg at end {_common.loadavg()}")
    figures = {
        "ratio": ratio,
        "ratio_median": statistics.median(pairs),
        "keyed_ratio": keyed_ratio,
        "charter_items_s": rate["charter"],
        "core_items_s": rate["core"],
    }
    print(json.dumps({k: round(v, 3) for k, v in figures.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
