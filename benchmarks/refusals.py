"""Refusals: does a refused call slow down the allowed calls that follow it? (PostgreSQL)

Every refused call rolls its transaction back, and psycopg's ``rollback()``
forgets every prepared statement of the connection (and sends ``DEALLOCATE
ALL``): the next calls on that connection parse and plan their statements again
until psycopg prepares them anew, at their fifth execution. The gate rolls its
own transactions back through libpq instead (``charter.storage.
keep_prepared_statements``). This benchmark times allowed calls with and
without refusals among them, and the same with psycopg's own rollback, in one
run.

The call is gate_overhead's: the README quickstart's ``invoice.approve`` by an
approver, on a fresh submitted invoice per op, no key, default settings (rate
limits on, with limits no op reaches). Sides, each its own ``Charter`` (own
pool) on one database, interleaved op by op:

(clean)   allowed calls only;
(mixed)   the same, with a refused call (a viewer's approval: 404, audited)
          before every 4th timed call: 1 call in 5 refused;
(psycopg) as ``mixed``, on a Charter whose rollbacks go through psycopg's
          ``rollback()`` (the hook removed): what the hook saves.

Figures (no target in an issue; printed so that a regression shows):

* ``refusal_ratio``          median allowed-call time mixed / clean (about 1: refusals cost
                             the others nothing)
* ``psycopg_rollback_ratio`` the same for the psycopg side / clean
* ``clean_us``, ``mixed_us``, ``psycopg_us``

``--quick``: the same figures at smaller sizes (under a minute). The last line of
output is one JSON object. PostgreSQL: ``$CHARTER_PG_URL`` with the database
``charter_bench`` of gate_overhead (created if missing).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time

import _common
from gate_overhead import (
    ACTION,
    BENCH_DB,
    INPUT,
    TENANT,
    Ids,
    bench_actor,
    build_charter,
    prepare_schema,
)

import charter.pipeline.runtime as runtime
from charter import Actor, Charter, CharterError

SIDES = ("clean", "mixed", "psycopg")
REFUSE_EVERY = 4  # a refused call before every 4th allowed one: 1 call in 5 refused


def without_hook(url: str) -> Charter:
    """A Charter whose rollbacks are psycopg's own (the hook never installed)."""
    hook = runtime.keep_prepared_statements
    runtime.keep_prepared_statements = lambda engine: None  # type: ignore[assignment]
    try:
        return build_charter(url)
    finally:
        runtime.keep_prepared_statements = hook


class SideOp:
    """One side's op: an allowed approval, preceded on a refusing side by a refused one."""

    def __init__(self, charter: Charter, refusing: bool, ids: Ids) -> None:
        self.execute, self.refusing, self.ids = charter.execute, refusing, ids
        self.allowed, self.viewer = bench_actor(), Actor.make("vera", TENANT, roles={"viewer"})
        self.calls = self.refusals = 0
        self.refused_s = 0.0  # time spent in refused calls: taken out of the op's time

    def __call__(self, item_id: int) -> None:
        if self.refusing and self.calls % REFUSE_EVERY == 0:
            started = time.perf_counter()
            try:
                self.execute(self.viewer, ACTION, INPUT, target=self.ids.take(1)[0])
            except CharterError as refused:
                self.refusals += refused.status in (403, 404)
            self.refused_s += time.perf_counter() - started
        self.calls += 1
        self.execute(self.allowed, ACTION, INPUT, target=item_id)


def timed_without_refusals(
    ops: dict[str, SideOp], rounds: int, per_round: int, ids: Ids
) -> dict[str, list[float]]:
    """Interleave the sides op by op; each op's time minus the refused call it may run first."""
    per_op: dict[str, list[float]] = {side: [] for side in ops}
    orders = list(itertools.permutations(ops))
    for step in range(rounds * per_round):
        for side in orders[step % len(orders)]:
            op = ops[side]
            before = op.refused_s
            started = time.perf_counter()
            op(ids.take(1)[0])
            per_op[side].append(time.perf_counter() - started - (op.refused_s - before))
    return per_op


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (< 60 s)")
    args = parser.parse_args()
    rounds, per_round, warmup = (8, 300, 100) if args.quick else (20, 600, 300)
    steps = warmup + rounds * per_round
    rows = len(SIDES) * steps * 2 + 100
    info = _common.machine()
    print(
        f"refusals: {'quick' if args.quick else 'full'} run, {time.strftime('%Y-%m-%d %H:%M:%S')}"
    )
    print(
        f"machine: nproc={info['nproc']} cpu={info['cpu']} python={info['python']} "
        f"charter={info['rev']} loadavg={_common.loadavg()}"
    )
    figures: dict[str, float | None] = dict.fromkeys(
        ("refusal_ratio", "psycopg_rollback_ratio", "clean_us", "mixed_us", "psycopg_us")
    )
    url = _common.pg_bench_url(BENCH_DB)
    if url is None:
        print(json.dumps(figures))
        return 1
    charters = {
        "clean": build_charter(url),
        "mixed": build_charter(url),
        "psycopg": without_hook(url),
    }
    try:
        prepare_schema(charters["clean"].engine, rows)
        ids = Ids(1, rows)
        ops = {side: SideOp(charter, side != "clean", ids) for side, charter in charters.items()}
        for _ in range(warmup):
            for op in ops.values():
                op(ids.take(1)[0])
        per_op = timed_without_refusals(ops, rounds, per_round, ids)
        for side in ("mixed", "psycopg"):  # every refused call was refused, none failed otherwise
            expected = -(-(warmup + rounds * per_round) // REFUSE_EVERY)
            if ops[side].refusals != expected:
                print(f"{side}: {ops[side].refusals} refusals, not {expected}", file=sys.stderr)
                return 1
        us = {side: statistics.median(times) * 1e6 for side, times in per_op.items()}
        figures.update(
            refusal_ratio=us["mixed"] / us["clean"],
            psycopg_rollback_ratio=us["psycopg"] / us["clean"],
            clean_us=us["clean"],
            mixed_us=us["mixed"],
            psycopg_us=us["psycopg"],
        )
        print(f"\n{rounds * per_round} allowed calls per side, interleaved; median µs per call")
        for side in SIDES:
            print(f"  {side:<8} {us[side]:8.1f}   /clean {us[side] / us['clean']:5.3f}")
        print("  1 call in 5 refused on mixed and psycopg; the refused calls are not timed")
    finally:
        for charter in charters.values():
            charter.close()
    _common.print_figures(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
