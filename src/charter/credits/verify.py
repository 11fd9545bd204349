"""``charter credits verify``: every balance equals its ledger entries; the ledger sums to zero.

An account's balance is what the ledger credited to it minus what it debited
from it. The check recomputes that for every account, in one read
transaction (a consistent snapshot: balances and entries change together),
and reports each account whose stored balance disagrees — by tenant and name —
plus a balance that is not a whole number of minor units (SQLite keeps a
``REAL`` written into the column), each ``@held`` account that does not hold
exactly what its tenant's pending holds reserve, per currency a sum of
balances that is not zero (money made or lost outside a movement), any
movement between two currencies, and the accounts that ledger movements point
at but that no longer exist. Lists of movements or missing accounts stop at
:data:`SHOWN` entries, with a last problem that counts the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select, union_all
from sqlalchemy.engine import Connection

from .tables import accounts_table, holds_table, ledger_table

__all__ = ["SHOWN", "LedgerProblem", "LedgerReport", "verify_ledger"]

#: The most movements or missing accounts one report names (one more problem counts the rest).
SHOWN = 100
_a, _h, _l = accounts_table, holds_table, ledger_table
_HELD = "@held"  # the system account of pending holds (see .tables)


@dataclass(frozen=True, slots=True)
class LedgerProblem:
    """One disagreement: which account (or currency, movement, hold), and what was found."""

    kind: str  # "balance" | "held" | "sum" | "currency" | "missing"
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

    def add(self, kind: str, subject: str, detail: str) -> None:
        self.problems.append(LedgerProblem(kind, subject, detail))


def verify_ledger(connection: Connection) -> LedgerReport:
    """Check the ledger against the balances, in ``connection``'s transaction."""
    report = LedgerReport(
        movements=int(connection.execute(select(func.count()).select_from(_l)).scalar_one())
    )
    sums = _check_balances(connection, report)
    for currency, total in sorted(sums.items()):
        if total is not None and total != 0:  # None: a balance of it is already named
            report.add("sum", currency, f"the {currency} balances sum to {total}, not 0")
    _check_currencies(connection, report)
    _check_missing_accounts(connection, report)
    return report


def _check_balances(connection: Connection, report: LedgerReport) -> dict[str, int | None]:
    """Each account's balance against its ledger entries (and ``@held`` against its holds).

    Returns the sum of the balances per currency (``None``: one is not a whole number).
    """
    credited = _sums(connection, _l.c.credit, _l.c.amount)
    debited = _sums(connection, _l.c.debit, _l.c.amount)
    pending = _pending_holds(connection)
    sums: dict[str, int | None] = {}
    for row in connection.execute(select(_a).order_by(_a.c.tenant, _a.c.name)):
        report.accounts += 1
        subject = f"{row.tenant}/{row.name}"
        balance, total = _whole(row.balance), sums.get(row.currency, 0)
        sums[row.currency] = None if balance is None or total is None else total + balance
        if balance is None:
            report.add("balance", subject, f"balance {row.balance!r} is not a whole number")
            continue
        expected = _difference(credited.get(row.id, 0), debited.get(row.id, 0))
        if expected is None:
            report.add("balance", subject, "its ledger amounts are not whole numbers")
        elif balance != expected:
            report.add("balance", subject, f"balance {balance} but the ledger says {expected}")
        if row.name.endswith(_HELD):
            reserved = pending.get((row.tenant, row.name.removesuffix(_HELD)), 0)
            if balance != reserved:
                detail = f"holds {balance} but its pending holds reserve {reserved}"
                report.add("held", subject, detail)
    return sums


def _check_currencies(connection: Connection, report: LedgerReport) -> None:
    """Movements between two currencies, by id (at most :data:`SHOWN`)."""
    currency = select(_a.c.currency).where(_a.c.id == _l.c.debit).scalar_subquery()
    other = select(_a.c.currency).where(_a.c.id == _l.c.credit).scalar_subquery()
    mixed = connection.execute(
        select(_l.c.id).where(currency != other).order_by(_l.c.id).limit(SHOWN + 1)
    ).scalars()
    for shown, movement in enumerate(mixed):
        if shown == SHOWN:
            report.add("currency", "more movements", f"past the first {SHOWN}: not listed")
            break
        report.add("currency", f"movement {movement}", "moves between two currencies")


def _check_missing_accounts(connection: Connection, report: LedgerReport) -> None:
    """Accounts that movements debit or credit but that do not exist (at most :data:`SHOWN`)."""
    ends = union_all(
        select(_l.c.debit.label("account"), _l.c.id), select(_l.c.credit, _l.c.id)
    ).subquery()
    exists = select(_a.c.id).where(_a.c.id == ends.c.account).exists()
    missing = connection.execute(
        select(ends.c.account, func.count(), func.min(ends.c.id))
        .where(~exists)
        .group_by(ends.c.account)
        .order_by(ends.c.account)
        .limit(SHOWN + 1)
    ).all()
    for shown, (account, movements, first) in enumerate(missing):
        if shown == SHOWN:
            report.add("missing", "more accounts", f"past the first {SHOWN}: not listed")
            break
        report.add(
            "missing",
            f"account #{account}",
            f"does not exist, but {movements} movements point at it (the first: {first})",
        )


def _sums(connection: Connection, key: Any, amount: Any) -> dict[Any, Any]:
    return dict(connection.execute(select(key, func.sum(amount)).group_by(key)).all())


def _pending_holds(connection: Connection) -> dict[tuple[str, str], int]:
    """What the pending holds reserve, per (tenant, account)."""
    rows = connection.execute(
        select(_h.c.tenant, _h.c.account, func.sum(_h.c.amount))
        .where(_h.c.state == "pending")
        .group_by(_h.c.tenant, _h.c.account)
    ).all()
    return {(tenant, account): _whole(total) or 0 for tenant, account, total in rows}


def _difference(credited: Any, debited: Any) -> int | None:
    """Credited minus debited, or ``None`` when either is not a whole number."""
    plus, minus = _whole(credited), _whole(debited)
    return None if plus is None or minus is None else plus - minus


def _whole(value: Any) -> int | None:
    """``value`` as an ``int`` when it is a whole number, else ``None``.

    PostgreSQL sums ``bigint`` as ``numeric`` (a :class:`~decimal.Decimal`);
    SQLite may hold a ``REAL`` or a text written into an integer column.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, Decimal) and value.is_finite() and value == value.to_integral_value():
        return int(value)
    return None
