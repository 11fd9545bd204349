"""Credits: consuming prepaid credits through the gate vs. the same work by hand, 16 processes.

Setup (PostgreSQL): 8 tenants, one ``credits`` account each; 16 worker
processes, two per account (worker ``i`` spends from tenant ``i % 8``); each
worker attempts ``attempts`` consumptions, and each account is granted 80% of
the attempts made against it, so the last fifth of the attempts find the
balance empty (they are refused and audited). Every attempt consumes 1 credit.

The sides (each attempt is one transaction, same database, same locks):

(gate) ``charter.execute(actor, "bench.consume")`` for an action declared with
    ``cost=1``: the default path a user gets — validation, policy, the charge
    stage (one conditional debit of the tenant's account, the credit of its
    ``@spent`` account and the ledger row: one statement on PostgreSQL), the
    handler, a sealed audit entry, COMMIT; a refusal (402) is audited on its own.
(core) the fastest hand-written SQLAlchemy Core loop doing the same work with the
    same locks, statements built once::

        with write_engine.begin() as conn:
            row = conn.execute(CONDITIONAL_UPDATE, ...).first()  # balance - 1 WHERE balance >= 1
            if row: conn.execute(LEDGER_INSERT, ...)             # one charter_ledger row
            conn.execute(AUDIT_INSERT, entry)                    # HMAC-chained audit row

Figures (targets from the issue):

* ``throughput_ratio``  consumptions per second through the gate / by hand, the
  median of alternating runs (>= 0.6). On 2 saturated cores this is a ratio of
  client CPU per call.
* ``overspend``  on the gate side, the credits consumed beyond what the balances
  covered, plus every balance that ended below zero (== 0); successes must equal
  what the balances covered exactly (``exact``), and ``charter credits verify``
  must pass (``ledger_ok``).

``--quick``: the same figures with fewer attempts and one run per side (under
60 s). The last line of output is one JSON object. PostgreSQL: ``$CHARTER_PG_URL``
with the database name replaced by ``charter_bench_credits``, created if missing.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import multiprocessing
import os
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import _common
from sqlalchemy import MetaData, Table, bindparam, insert, text, update
from sqlalchemy.engine import Engine

from charter import Actor, Charter, InsufficientCredits
from charter.credits import Credits
from charter.credits.tables import accounts_table, ledger_table
from charter.migrate import upgrade
from charter.storage import WRITE_OPTION, make_engine

ACTION = "bench.consume"
AUDIT_KEYS = {"bench": "bench-audit-key-0123456789abcdef0123"}
TENANTS = 8
WORKERS = 16
COVER = 0.8


def tenant(worker: int) -> str:
    return f"tenant-{worker % TENANTS}"


def build_charter(url: str) -> Charter:
    charter = Charter(
        engine=make_engine(url, pool_size=1, max_overflow=0),
        audit_keys=AUDIT_KEYS,
        rate_limits=_common.rate_limits(),
    )

    @charter.action(ACTION, allow=True, cost=1)
    def consume(ctx: Any, record: Any, data: Any) -> dict[str, Any]:
        return {"ok": True}

    return charter


# -- the hand-written side --------------------------------------------------------------


class Core:
    """The hand-written loop's statements, built once per engine."""

    def __init__(self, engine: Engine) -> None:
        self.write = engine.execution_options(**{WRITE_OPTION: True})
        a = accounts_table
        self.debit = (
            update(a)
            .where(a.c.tenant == bindparam("b_tenant"), a.c.name == "credits")
            .where(a.c.balance >= bindparam("b_amount"))
            .values(balance=a.c.balance - bindparam("b_amount"))
            .returning(a.c.id, a.c.balance)
        )
        self.ledger = insert(ledger_table).inline()
        self.audit = insert(Table("charter_audit", MetaData(), autoload_with=engine)).inline()
        self.key = AUDIT_KEYS["bench"].encode()
        self.stream, self.seq, self.head = uuid.uuid4().hex, 0, ""
        # The ledger's credit side, found once (the gate's statement finds it each time).
        with engine.connect() as conn:
            self.spent = {
                row.tenant: row.id
                for row in conn.execute(
                    text("SELECT tenant, id FROM charter_credit_accounts WHERE name = :n"),
                    {"n": "credits@spent"},
                )
            }

    def consume(self, actor: Actor) -> bool:
        now = datetime.now(UTC)
        with self.write.begin() as conn:
            row = conn.execute(self.debit, {"b_tenant": actor.tenant, "b_amount": 1}).first()
            if row is not None:
                conn.execute(
                    self.ledger,
                    {
                        "at": now, "tenant": actor.tenant, "debit": row.id,
                        "credit": self.spent[actor.tenant], "amount": 1, "kind": "charge",
                        "action": ACTION, "request_id": os.urandom(16).hex(),
                    },
                )  # fmt: skip
            entry = self.entry(actor, now, "ok" if row is not None else "insufficient_credits")
            conn.execute(self.audit, entry)
        self.seq, self.head = entry["seq"], entry["hash"]
        return row is not None

    def entry(self, actor: Actor, now: datetime, outcome: str) -> dict[str, Any]:
        row: dict[str, Any] = {
            "stream": self.stream, "seq": self.seq + 1, "prev_hash": self.head,
            "key_id": "bench", "at": now, "tenant": actor.tenant, "subject": actor.id,
            "subject_kind": "user", "real_actor": None, "scopes": [], "channel": "http",
            "action": ACTION, "resource_type": None, "resource_id": None, "reason": None,
            "decision": "allow", "rule": ACTION, "outcome": outcome,
            "request_id": os.urandom(16).hex(), "idempotency_key": None, "replayed": False,
            "state_before": None, "state_after": None,
            "input_digest": hashlib.sha256(b"{}").hexdigest(), "detail": None,
        }  # fmt: skip
        message = json.dumps(row, sort_keys=True, separators=(",", ":"), default=str).encode()
        row["hash"] = hmac.new(self.key, message, hashlib.sha256).hexdigest()
        return row


# -- workers ----------------------------------------------------------------------------


def worker(url: str, side: str, index: int, attempts: int, start: Any, results: Any) -> None:
    actor = Actor.make(f"user-{index}", tenant(index), roles={"member"})
    if side == "gate":
        charter = build_charter(url)

        def attempt() -> bool:
            try:
                charter.execute(actor, ACTION)
            except InsufficientCredits:
                return False
            return True

        engine = charter.engine
    else:
        engine = make_engine(url, pool_size=1, max_overflow=0)
        core = Core(engine)

        def attempt() -> bool:
            return core.consume(actor)

    attempt()  # warm-up (connection, statement caches), before the clock starts
    start.wait()
    began = time.perf_counter()
    successes = 1 + sum(attempt() for _ in range(attempts - 1))
    results.put((index, successes, began, time.perf_counter()))
    engine.dispose()


def prepare(url: str, attempts: int) -> int:
    """Fresh accounts, each granted 80% of the attempts made against it; the grant."""
    engine = make_engine(url)
    try:
        upgrade(engine)
        with engine.begin() as conn:
            conn.execute(
                text(
                    "TRUNCATE charter_ledger, charter_credit_holds, charter_credit_accounts, "
                    "charter_audit, charter_audit_links RESTART IDENTITY CASCADE"
                )
            )
        credits = Credits(engine, clock=lambda: datetime.now(UTC))
        grant = int(COVER * attempts * WORKERS // TENANTS)
        for t in range(TENANTS):
            credits.open(f"tenant-{t}")
            credits.grant(f"tenant-{t}", grant)
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE charter_credit_accounts"))
    finally:
        engine.dispose()
    return grant


def run(url: str, side: str, attempts: int) -> dict[str, Any]:
    grant = prepare(url, attempts)
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(WORKERS), ctx.Queue()
    procs = [
        ctx.Process(target=worker, args=(url, side, i, attempts, start, results))
        for i in range(WORKERS)
    ]
    for p in procs:
        p.start()
    rows = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(60)
    if any(p.exitcode != 0 for p in procs):
        raise SystemExit(f"a {side} worker failed")
    began, ended = min(r[2] for r in rows), max(r[3] for r in rows)
    successes = [0] * TENANTS
    for index, ok, _, _ in rows:
        successes[index % TENANTS] += ok
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            balances = dict(
                conn.execute(
                    text("SELECT tenant, balance FROM charter_credit_accounts WHERE name = :n"),
                    {"n": "credits"},
                ).all()
            )
        ledger_ok = Credits(engine, clock=lambda: datetime.now(UTC)).verify().ok
    finally:
        engine.dispose()
    overspend = sum(max(0, s - grant) for s in successes) + sum(
        1 for b in balances.values() if b < 0
    )
    return {
        "side": side,
        "rps": WORKERS * (attempts - 1) / (ended - began),
        "successes": sum(successes),
        "covered": grant * TENANTS,
        "exact": all(s == grant for s in successes),
        "overspend": overspend,
        "ledger_ok": ledger_ok,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (under 60 s)")
    args = parser.parse_args()
    url = _common.pg_bench_url("charter_bench_credits")
    if url is None:
        sys.exit("this benchmark needs PostgreSQL ($CHARTER_PG_URL)")
    attempts, rounds = (150, 1) if args.quick else (1000, 3)
    print(f"machine: {_common.machine()}  load: {_common.loadavg()}")
    print(f"{WORKERS} processes, {TENANTS} tenants, {attempts} attempts per worker")
    runs: dict[str, list[dict[str, Any]]] = {"gate": [], "core": []}
    for r in range(rounds):
        for side in ("core", "gate") if r % 2 == 0 else ("gate", "core"):
            result = run(url, side, attempts)
            runs[side].append(result)
            print(json.dumps(result))
    gate = statistics.median(r["rps"] for r in runs["gate"])
    core = statistics.median(r["rps"] for r in runs["core"])
    figures = {
        "throughput_ratio": round(gate / core, 3),
        "overspend": sum(r["overspend"] for r in runs["gate"]),
        "exact": all(r["exact"] for r in runs["gate"]),
        "ledger_ok": all(r["ledger_ok"] for r in runs["gate"]),
        "gate_rps": round(gate, 1),
        "core_rps": round(core, 1),
        "core_overspend": sum(r["overspend"] for r in runs["core"]),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
