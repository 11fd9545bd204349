"""Movements: one conditional debit, one credit and one ledger row, in the caller's transaction.

A movement takes ``amount`` from one account and gives it to another of the
same tenant. The debit is the one statement that decides whether it may
happen::

    UPDATE charter_credit_accounts SET balance = balance - :amount
     WHERE tenant = :tenant AND name = :debit AND (balance >= :amount OR NOT bounded)

— no read before it, so two concurrent consumers of the last credit cannot
both pass a check: the second one's UPDATE waits for the first one's row lock
and then re-evaluates its condition against the committed balance (PostgreSQL
READ COMMITTED), or runs after it altogether (SQLite, ``BEGIN IMMEDIATE``).
The credit and the append-only ledger row follow in the same transaction; on
PostgreSQL all three are one statement (data-modifying CTEs), so a charge
costs one round trip.

Every statement is built once, at import.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    Integer,
    String,
    bindparam,
    exists,
    insert,
    not_,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.engine import Connection

from .tables import accounts_table, ledger_table

__all__ = ["Moved", "Movement", "move", "system_account"]

_a, _l = accounts_table, ledger_table
_ID = BigInteger().with_variant(Integer, "sqlite")


def system_account(account: str, role: str) -> str:
    """The name of ``account``'s system account ``role`` (issued, spent, held)."""
    return f"{account}@{role}"


@dataclass(frozen=True, slots=True)
class Movement:
    """What to move: ``amount`` minor units of ``tenant`` from ``debit`` to ``credit``."""

    tenant: str
    debit: str
    credit: str
    amount: int
    kind: str
    at: datetime
    action: str | None = None
    request_id: str | None = None
    hold_id: int | None = None
    refund_of: int | None = None

    def params(self) -> dict[str, Any]:
        return {
            "p_tenant": self.tenant,
            "p_debit_name": self.debit,
            "p_credit_name": self.credit,
            "p_amount": self.amount,
            "p_kind": self.kind,
            "p_at": self.at,
            "p_action": self.action,
            "p_request_id": self.request_id,
            "p_hold_id": self.hold_id,
            "p_refund_of": self.refund_of,
        }


@dataclass(frozen=True, slots=True)
class Moved:
    """A movement that happened: its ledger row and both accounts' new balances."""

    id: int
    debit_balance: int
    credit_balance: int


def _account_update(name: str, sign: int, *, conditional: bool) -> Any:
    amount = bindparam("p_amount", type_=BigInteger)
    statement = update(_a).where(_a.c.tenant == bindparam("p_tenant"), _a.c.name == bindparam(name))
    if conditional:
        statement = statement.where(or_(_a.c.balance >= amount, not_(_a.c.bounded)))
    balance = _a.c.balance - amount if sign < 0 else _a.c.balance + amount
    return statement.values(balance=balance).returning(_a.c.id, _a.c.balance)


_DEBIT = _account_update("p_debit_name", -1, conditional=True)
_CREDIT = _account_update("p_credit_name", +1, conditional=False)
_ROW_COLUMNS = (
    "at", "tenant", "debit", "credit", "amount", "kind", "action", "request_id", "hold_id",
    "refund_of",
)  # fmt: skip
_LEDGER_INSERT = (
    insert(_l)
    .values(
        {
            name: bindparam(f"p_{name}_id" if name in ("debit", "credit") else f"p_{name}")
            for name in _ROW_COLUMNS
        }
    )
    .returning(_l.c.id)
)


def _folded() -> Any:
    """PostgreSQL: debit, credit and ledger row as one statement (data-modifying CTEs)."""
    d = _DEBIT.cte("charter_debit")
    c = (
        update(_a)
        .where(_a.c.tenant == bindparam("p_tenant"), _a.c.name == bindparam("p_credit_name"))
        .where(exists(select(d.c.id)))
        .values(balance=_a.c.balance + bindparam("p_amount", type_=BigInteger))
        .returning(_a.c.id, _a.c.balance)
        .cte("charter_credit")
    )
    row = select(
        bindparam("p_at", type_=DateTime(timezone=True)),
        bindparam("p_tenant", type_=String),
        d.c.id,
        c.c.id,
        bindparam("p_amount", type_=BigInteger),
        bindparam("p_kind", type_=String),
        bindparam("p_action", type_=String),
        bindparam("p_request_id", type_=String),
        bindparam("p_hold_id", type_=_ID),
        bindparam("p_refund_of", type_=_ID),
    ).select_from(d.join(c, true()))
    entry = insert(_l).from_select(list(_ROW_COLUMNS), row).returning(_l.c.id).cte("charter_entry")
    return select(
        entry.c.id, d.c.balance.label("debit_balance"), c.c.balance.label("credit_balance")
    ).select_from(d.join(c, true()).join(entry, true()))


_FOLDED = _folded()
# Both accounts of a movement, locked in name order: see move().
_LOCK_PAIR = (
    select(_a.c.id)
    .where(
        _a.c.tenant == bindparam("p_tenant"),
        _a.c.name.in_([bindparam("p_debit_name"), bindparam("p_credit_name")]),
    )
    .order_by(_a.c.name)
    .with_for_update()
)


def move(connection: Connection, movement: Movement, *, postgres: bool) -> Moved | None:
    """Move ``movement`` in ``connection``'s transaction; ``None``: the debit did not cover it.

    ``None`` also when an account is missing; nothing was moved then, and the
    caller refuses (its transaction rolls back).
    """
    params = movement.params()
    if postgres:
        # Row locks are taken in the order the statement updates: debit, then
        # credit. Every movement locks its pair in name order instead (an account
        # before its system accounts: ``credits`` < ``credits@spent``), so a
        # refund or a release (system account -> account) cannot deadlock with a
        # charge or a hold (account -> system account) of the same account. A
        # charge and a hold are in that order already and pay nothing for it; the
        # others (grant, refund, release, expiry) lock first, one statement more.
        if movement.debit > movement.credit:
            connection.execute(_LOCK_PAIR, params)
        row = connection.execute(_FOLDED, params).first()
        if row is None:
            return None
        return Moved(int(row.id), int(row.debit_balance), int(row.credit_balance))
    debited = connection.execute(_DEBIT, params).first()
    if debited is None:
        return None
    credited = connection.execute(_CREDIT, params).first()
    if credited is None:
        return None
    params.update(p_debit_id=debited.id, p_credit_id=credited.id)
    entry = connection.execute(_LEDGER_INSERT, params).scalar_one()
    return Moved(int(entry), int(debited.balance), int(credited.balance))
