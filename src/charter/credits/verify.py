"""``charter credits verify``: every balance equals its ledger entries; the ledger sums to zero.

An account's balance is what the ledger credited to it minus what it debited
from it. The check recomputes that for every account, in one read
transaction (a consistent snapshot: balances and entries change together),
and reports each account whose stored balance disagrees — by tenant and name —
plus, per currency, a sum of balances that is not zero (money made or lost
outside a movement) and any movement between two currencies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from .tables import accounts_table, ledger_table

__all__ = ["LedgerProblem", "LedgerReport", "verify_ledger"]


@dataclass(frozen=True, slots=True)
class LedgerProblem:
    """One disagreement: which account (or currency), and what was found."""

    kind: str  # "balance" | "sum" | "currency"
    subject: str
    detail: str

    def as_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "subject": self.subject, "detail": self.detail}


@dataclass(slots=True)
class LedgerReport:
    """What :func:`verify_ledger` checked and found."""

    accounts: int = 0
    movements: int = 0
    problems: list[LedgerProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "accounts": self.accounts,
            "movements": self.movements,
            "problems": [p.as_json() for p in self.problems],
        }


def verify_ledger(connection: Connection) -> LedgerReport:
    """Check the ledger against the balances, in ``connection``'s transaction."""
    a, lg = accounts_table, ledger_table
    credited = dict(
        connection.execute(select(lg.c.credit, func.sum(lg.c.amount)).group_by(lg.c.credit)).all()
    )
    debited = dict(
        connection.execute(select(lg.c.debit, func.sum(lg.c.amount)).group_by(lg.c.debit)).all()
    )
    report = LedgerReport(
        movements=int(connection.execute(select(func.count()).select_from(lg)).scalar_one())
    )
    sums: dict[str, int] = {}
    currency_of: dict[int, str] = {}
    for row in connection.execute(select(a).order_by(a.c.tenant, a.c.name)):
        report.accounts += 1
        currency_of[row.id] = row.currency
        expected = int(credited.get(row.id) or 0) - int(debited.get(row.id) or 0)
        if int(row.balance) != expected:
            report.problems.append(
                LedgerProblem(
                    "balance",
                    f"{row.tenant}/{row.name}",
                    f"balance {row.balance} but the ledger says {expected}",
                )
            )
        sums[row.currency] = sums.get(row.currency, 0) + int(row.balance)
    for currency, total in sorted(sums.items()):
        if total != 0:
            report.problems.append(
                LedgerProblem("sum", currency, f"the {currency} balances sum to {total}, not 0")
            )
    mixed = connection.execute(
        select(lg.c.id, lg.c.debit, lg.c.credit).where(
            select(a.c.currency).where(a.c.id == lg.c.debit).scalar_subquery()
            != select(a.c.currency).where(a.c.id == lg.c.credit).scalar_subquery()
        )
    ).all()
    for row in mixed:
        report.problems.append(
            LedgerProblem("currency", f"movement {row.id}", "moves between two currencies")
        )
    return report
