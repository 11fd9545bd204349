"""Workflow: a declared transition against the same action with a hand-coded state check.

The action is the README quickstart's ``invoice.approve`` (approver role, amount
within ``A.approval_limit``, not the creator; input ``{"note": "ok"}``; real
audit keys; ``idempotency="optional"``, called without a key), on a fresh
submitted invoice per operation, through the gate's default path, on
PostgreSQL. The two sides differ only in where the state lives:

(declared) ``charter.workflow(Invoice, ...)`` declares ``invoice.approve`` as the
    transition submitted → approved: the ``transition`` stage checks the locked
    state (409 otherwise), ``advance`` sets it, ``state_guard`` refuses any other
    write of it; the rule says only who may approve; the handler returns.
(hand) no workflow: the state check is a clause of the rule
    (``R.state == "submitted"``, 403 otherwise) and the handler sets
    ``invoice.state = "approved"`` itself, as the README's quickstart does.

Figures (targets from issue 10):

* ``transition_ratio``  median per-op time declared / hand (<= 1.03)
* ``statements_declared``, ``statements_hand``  statements per call of each side;
  ``added_statements`` their difference (must be 0: the check runs on the row
  the gate already loaded and locked, the new state rides on the UPDATE the
  call sends anyway; tests/test_workflow.py pins it too)

Method: as benchmarks/gate_overhead.py: a warm-up, then both sides interleaved
op by op, alternating which goes first, for ``rounds`` x ``per_round`` steps;
the figure is the ratio of the medians of all per-op times, with the ratio of
the medians of per-round means printed as a drift check. ``--quick``: the same
figures at smaller sizes (under a minute). Run: ``python benchmarks/workflow.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import _common
from pydantic import BaseModel, ConfigDict
from sqlalchemy import Numeric, String, event, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from charter import A, Actor, Charter, R, Transition
from charter.migrate import upgrade

BENCH_DB = "charter_bench_workflow"
AUDIT_KEYS = {"k1": "bench-audit-key-0123456789"}
TENANT = "acme"
ACTION = "invoice.approve"
INPUT = {"note": "ok"}
SIDES = ("declared", "hand")
WHO = A.has_role("approver") & (R.amount <= A.approval_limit) & (R.created_by != A.id)


class Base(DeclarativeBase):
    pass


class Invoice(Base):
    __tablename__ = "bench_workflow_invoices"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    amount: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    created_by: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(default=1)


class Approve(BaseModel):
    model_config = ConfigDict(extra="forbid")
    note: str | None = None


def build(url: str, *, declared: bool) -> Charter:
    charter = Charter(database_url=url, audit_keys=AUDIT_KEYS, rate_limits=_common.rate_limits())
    charter.resource(Invoice, tenant="tenant_id", state="state", version="version")
    if declared:
        charter.workflow(
            Invoice,
            states=("submitted", "approved"),
            initial="submitted",
            transitions=(Transition(ACTION, "submitted", "approved"),),
        )

        def approve(ctx: Any, invoice: Invoice, data: Approve) -> dict[str, Any]:
            return {"id": invoice.id, "state": invoice.state}

        rule = WHO
    else:

        def approve(ctx: Any, invoice: Invoice, data: Approve) -> dict[str, Any]:
            invoice.state = "approved"
            return {"id": invoice.id, "state": invoice.state}

        rule = WHO & (R.state == "submitted")
    charter.action(ACTION, on=Invoice, input=Approve, idempotency="optional", allow=rule)(approve)
    return charter


def prepare(url: str, rows: int) -> None:
    charter = build(url, declared=False)
    engine = charter.engine
    try:
        upgrade(engine)
        Base.metadata.drop_all(engine)
        Base.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM charter_audit"))
            conn.execute(
                text(
                    f"INSERT INTO {Invoice.__tablename__} "
                    "(id, tenant_id, state, amount, created_by, version) "
                    f"SELECT g, '{TENANT}', 'submitted', 1200, 'alice', 1 "
                    "FROM generate_series(1, :n) AS g"
                ),
                {"n": rows},
            )
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f"VACUUM ANALYZE {Invoice.__tablename__}"))
            conn.execute(text("VACUUM ANALYZE charter_audit"))
    finally:
        charter.close()


def operation(charter: Charter, actor: Actor) -> Callable[[int], None]:
    execute = charter.execute

    def op(item_id: int) -> None:
        execute(actor, ACTION, INPUT, target=item_id)

    return op


def statements(charter: Charter, op: Callable[[int], None], item_id: int) -> list[str]:
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement.split()[0])

    event.listen(charter.engine, "before_cursor_execute", record)
    try:
        op(item_id)
    finally:
        event.remove(charter.engine, "before_cursor_execute", record)
    return seen


class Ids:
    def __init__(self) -> None:
        self.next = 1

    def take(self, n: int) -> list[int]:
        ids = list(range(self.next, self.next + n))
        self.next += n
        return ids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, same figures")
    args = parser.parse_args()
    warmup, rounds, per_round = (200, 5, 200) if args.quick else (1000, 20, 1000)
    t0 = time.perf_counter()
    url = _common.pg_bench_url(BENCH_DB)
    if url is None:
        print(json.dumps({"transition_ratio": None, "added_statements": None}))
        return 1
    ids = Ids()
    prepare(url, warmup * 2 + rounds * per_round * 2 + 10)
    actor = Actor.make("bob", TENANT, roles={"approver"}, attributes={"approval_limit": 5000})
    charters = {side: build(url, declared=side == "declared") for side in SIDES}
    ops = {side: operation(c, actor) for side, c in charters.items()}
    try:
        counted = {side: statements(charters[side], ops[side], ids.take(1)[0]) for side in SIDES}
        for _ in range(warmup):
            for side in SIDES:
                ops[side](ids.take(1)[0])
        per_op, means = _common.interleave(ops, [SIDES, SIDES[::-1]], rounds, per_round, ids.take)
    finally:
        for charter in charters.values():
            charter.close()
    median = {side: statistics.median(times) for side, times in per_op.items()}
    drift = statistics.median(means["declared"]) / statistics.median(means["hand"])
    figures = {
        "transition_ratio": median["declared"] / median["hand"],
        "statements_declared": len(counted["declared"]),
        "statements_hand": len(counted["hand"]),
        "added_statements": len(counted["declared"]) - len(counted["hand"]),
        "declared_us": median["declared"] * 1e6,
        "hand_us": median["hand"] * 1e6,
    }
    print(f"machine: {_common.machine()}")
    print(f"PostgreSQL, {rounds} x {per_round} interleaved ops per side after {warmup} warm-up")
    for side in SIDES:
        print(f"  {side:<9} {median[side] * 1e6:8.1f} us   statements: {', '.join(counted[side])}")
    print(
        f"  declared/hand {figures['transition_ratio']:.3f} (drift check {drift:.3f}); "
        "target <= 1.03, added statements must be 0"
    )
    print(f"total time {time.perf_counter() - t0:.1f} s, loadavg at end {_common.loadavg()}")
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
