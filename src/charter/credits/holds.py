"""Holds: reserve credits before an outside step, then capture or release them.

Modelled on TigerBeetle's pending transfers, inside the application's own
database. A hold moves its amount from the account to the account's
``@held`` system account (the conditional debit of :mod:`.ledger`, so a hold
cannot overdraw) and records a pending hold with an expiry:

* **capture** moves it on to ``@spent`` — only while the hold is pending and
  unexpired; afterwards it fails closed (:class:`~charter.errors.HoldExpired`:
  nothing is taken, the caller is told);
* **release** moves it back to the account (the outside step failed);
* **expiry**: a hold still pending at ``expires_at`` is released by Charter —
  by :func:`sweep` (``charter credits sweep``, or any maintenance loop) and
  lazily, before each new hold of the same account.

A hold made by a keyed request is named after the request's idempotency scope,
so the request resumed after a crash (:mod:`charter.idempotency.recovery`)
finds its own hold again instead of reserving twice; and its expiry must
outlive the request's recovery lease, so a resume still finds it pending.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.engine import Connection

from ..errors import HoldExpired, InsufficientCredits
from .ledger import Movement, move, system_account
from .tables import holds_table

__all__ = ["Hold", "capture", "release", "reserve", "sweep_expired"]

_h = holds_table
_INSERT = insert(_h).returning(_h.c.id)
_FIND = select(_h).where(_h.c.tenant == bindparam("tenant"), _h.c.reference == bindparam("ref"))
_SETTLE = (
    update(_h)
    .where(_h.c.id == bindparam("hold_id"), _h.c.state == "pending")
    .values(state=bindparam("new_state"))
    .returning(_h.c.tenant, _h.c.account, _h.c.amount)
)
_CAPTURE = _SETTLE.where(_h.c.expires_at > bindparam("now"))


@dataclass(frozen=True, slots=True)
class Hold:
    """A reservation: ``amount`` of ``tenant``'s ``account``, pending until ``expires_at``."""

    id: int
    tenant: str
    account: str
    amount: int
    state: str
    expires_at: datetime

    @classmethod
    def of(cls, row: Any) -> Hold:
        expires = row.expires_at
        if expires.tzinfo is None:  # SQLite keeps no zone; Charter writes UTC
            expires = expires.replace(tzinfo=UTC)
        return cls(row.id, row.tenant, row.account, int(row.amount), row.state, expires)


def reserve(
    connection: Connection,
    *,
    tenant: str,
    account: str,
    amount: int,
    reference: str,
    now: datetime,
    expires_at: datetime,
    action: str | None,
    request_id: str | None,
    postgres: bool,
) -> Hold:
    """Reserve ``amount``, or return the hold already made under ``reference`` (a resume)."""
    found = connection.execute(_FIND, {"tenant": tenant, "ref": reference}).first()
    if found is not None:
        return Hold.of(found)
    hold_id = connection.execute(
        _INSERT,
        {
            "tenant": tenant, "account": account, "reference": reference, "amount": amount,
            "state": "pending", "created_at": now, "expires_at": expires_at, "action": action,
            "request_id": request_id,
        },
    ).scalar_one()  # fmt: skip
    moved = move(
        connection,
        Movement(
            tenant,
            account,
            system_account(account, "held"),
            amount,
            "hold",
            now,
            action=action,
            request_id=request_id,
            hold_id=hold_id,
        ),
        postgres=postgres,
    )
    if moved is None:
        raise InsufficientCredits(
            f"the {account} balance does not cover a hold of {amount}; nothing was reserved"
        )
    return Hold(int(hold_id), tenant, account, amount, "pending", expires_at)


def capture(
    connection: Connection, hold: Hold, *, now: datetime, postgres: bool, **about: Any
) -> int:
    """Take a pending, unexpired hold; its amount. :class:`HoldExpired` otherwise (fail closed)."""
    row = connection.execute(
        _CAPTURE, {"hold_id": hold.id, "new_state": "captured", "now": now}
    ).first()
    if row is None:
        raise HoldExpired(
            f"hold {hold.id} expired at {hold.expires_at.isoformat()} or was already settled: "
            "nothing was captured"
        )
    _settle(connection, row, "spent", "capture", hold.id, now, postgres, about)
    return int(row.amount)


def release(
    connection: Connection,
    hold: Hold,
    *,
    now: datetime,
    postgres: bool,
    state: str = "released",
    **about: Any,
) -> bool:
    """Give a pending hold back to its account; ``False`` if it was no longer pending."""
    row = connection.execute(_SETTLE, {"hold_id": hold.id, "new_state": state}).first()
    if row is None:
        return False
    _settle(connection, row, None, "release", hold.id, now, postgres, about)
    return True


_EXPIRED = (
    select(_h)
    .where(_h.c.state == "pending", _h.c.expires_at <= bindparam("now"))
    .order_by(_h.c.expires_at, _h.c.id)
    .limit(bindparam("limit"))
)


def sweep_expired(
    connection: Connection,
    *,
    now: datetime,
    postgres: bool,
    limit: int = 100,
    tenant: str | None = None,
    account: str | None = None,
) -> int:
    """Release up to ``limit`` holds pending past their expiry (state ``expired``); how many."""
    statement = _EXPIRED
    if tenant is not None:
        statement = statement.where(_h.c.tenant == tenant, _h.c.account == account)
    if postgres:
        statement = statement.with_for_update(skip_locked=True)  # sweepers do not queue
    released = 0
    for row in connection.execute(statement, {"now": now, "limit": limit}).all():
        hold = Hold.of(row)
        if release(connection, hold, now=now, postgres=postgres, state="expired"):
            released += 1
    return released


def _settle(
    connection: Connection,
    row: Any,
    to: str | None,
    kind: str,
    hold_id: int,
    now: datetime,
    postgres: bool,
    about: dict[str, Any],
) -> None:
    account = row.account
    target = account if to is None else system_account(account, to)
    moved = move(
        connection,
        Movement(
            row.tenant,
            system_account(account, "held"),
            target,
            int(row.amount),
            kind,
            now,
            hold_id=hold_id,
            **about,
        ),
        postgres=postgres,
    )
    if moved is None:  # the @held account always covers its pending holds
        raise InsufficientCredits(f"the held credits of {account} do not cover hold {hold_id}")
