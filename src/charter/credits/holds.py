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

Each of these is all or nothing, in a SAVEPOINT: a hold that does not fit
leaves no hold row behind (a handler that catches the 402 commits nothing
reserved), and a settle whose movement cannot be applied leaves the hold as
it was. A hold is settled only by its own tenant: another tenant's hold is
indistinguishable from an unknown one. The sweep releases each hold on its
own, so one hold that cannot be released (its amount is not on ``@held``: a
ledger damaged outside Charter) is set aside as ``unreleasable`` and logged,
and the others are still released.

A hold made by a keyed request is named after the request's idempotency scope,
so the request resumed after a crash (:mod:`charter.idempotency.recovery`)
finds its own hold again instead of reserving twice; and its expiry must
outlive the request's recovery lease, so a resume still finds it pending.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.engine import Connection

from ..errors import HoldExpired, InsufficientCredits
from .ledger import Movement, move, system_account
from .tables import holds_table

__all__ = ["Hold", "capture", "release", "reserve", "sweep_expired"]

log = logging.getLogger("charter")

_h = holds_table
_INSERT = insert(_h).returning(_h.c.id)
_FIND = select(_h).where(_h.c.tenant == bindparam("tenant"), _h.c.reference == bindparam("ref"))
# The claim of a settle: only the tenant's own pending hold (another tenant's is no hold).
_SETTLE = (
    update(_h)
    .where(
        _h.c.id == bindparam("hold_id"),
        _h.c.tenant == bindparam("of_tenant"),
        _h.c.state == "pending",
    )
    .values(state=bindparam("new_state"))
    .returning(_h.c.tenant, _h.c.account, _h.c.amount)
)
_CAPTURE = _SETTLE.where(_h.c.expires_at > bindparam("now"))


@dataclass(frozen=True, slots=True)
class _Settlement:
    """How a settle claims a hold, and where the held amount goes."""

    claim: Any  # the UPDATE of the hold's state
    kind: str  # the ledger movement
    to: str | None  # the system account it goes to; None: back to the account itself


_TAKE = _Settlement(_CAPTURE, "capture", "spent")
_GIVE_BACK = _Settlement(_SETTLE, "release", None)
_SET_ASIDE = (
    update(_h)
    .where(_h.c.id == bindparam("hold_id"), _h.c.state == "pending")
    .values(state="unreleasable")
)


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
    # All or nothing: a hold that does not fit must leave no pending row behind,
    # even when the handler catches the 402 and its transaction commits.
    with connection.begin_nested():
        hold_id = connection.execute(
            _INSERT,
            {
                "tenant": tenant, "account": account, "reference": reference, "amount": amount,
                "state": "pending", "created_at": now, "expires_at": expires_at,
                "action": action, "request_id": request_id,
            },
        ).scalar_one()  # fmt: skip
        movement = Movement(
            tenant, account, system_account(account, "held"), amount, "hold", now,
            action=action, request_id=request_id, hold_id=hold_id,
        )  # fmt: skip
        if move(connection, movement, postgres=postgres) is None:
            raise InsufficientCredits(
                f"the {account} balance does not cover a hold of {amount}; nothing was reserved"
            )
    return Hold(int(hold_id), tenant, account, amount, "pending", expires_at)


def capture(
    connection: Connection,
    hold: Hold,
    *,
    tenant: str,
    now: datetime,
    postgres: bool,
    **about: Any,
) -> int:
    """Take ``tenant``'s pending, unexpired hold; its amount. :class:`HoldExpired` otherwise.

    Fails closed: an expired, settled or unknown hold, or one of another tenant,
    takes nothing.
    """
    amount = _settle(
        connection, _TAKE, hold, tenant=tenant, state="captured", now=now, postgres=postgres,
        about=about,
    )  # fmt: skip
    if amount is None:
        raise HoldExpired(
            f"hold {hold.id} is not pending (it expired at {hold.expires_at.isoformat()}, "
            "was already settled, or is unknown): nothing was captured"
        )
    return amount


def release(
    connection: Connection,
    hold: Hold,
    *,
    tenant: str,
    now: datetime,
    postgres: bool,
    state: str = "released",
    **about: Any,
) -> bool:
    """Give ``tenant``'s pending hold back to its account; ``False`` if there is no such hold."""
    amount = _settle(
        connection, _GIVE_BACK, hold, tenant=tenant, state=state, now=now, postgres=postgres,
        about=about,
    )  # fmt: skip
    return amount is not None


@functools.cache
def _expired(*, of_account: bool, postgres: bool) -> Any:
    """The pending holds past their expiry, oldest first (built once per form: a refused
    charge sweeps its account's holds, and building this select cost a refusal ~150 µs)."""
    statement = (
        select(_h)
        .where(_h.c.state == "pending", _h.c.expires_at <= bindparam("now"))
        .order_by(_h.c.expires_at, _h.c.id)
        .limit(bindparam("limit"))
    )
    if of_account:
        statement = statement.where(
            _h.c.tenant == bindparam("of_tenant"), _h.c.account == bindparam("of_account")
        )
    if postgres:
        statement = statement.with_for_update(skip_locked=True)  # sweepers do not queue
    return statement


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
    statement = _expired(of_account=tenant is not None, postgres=postgres)
    params = {"now": now, "limit": limit, "of_tenant": tenant, "of_account": account}
    released = 0
    for row in connection.execute(statement, params).all():
        released += _expire(connection, Hold.of(row), now=now, postgres=postgres)
    return released


def _expire(connection: Connection, hold: Hold, *, now: datetime, postgres: bool) -> bool:
    """Release one expired hold; one that cannot be released is set aside, not retried forever.

    Its amount is not on ``@held`` (a ledger damaged outside Charter, or a hold
    left by an older version without its reservation): giving it back would take
    another hold's credits. Nothing moves; the hold is marked ``unreleasable``
    and logged, and ``charter credits verify`` names the ``@held`` account.
    """
    try:
        return release(
            connection, hold, tenant=hold.tenant, now=now, postgres=postgres, state="expired"
        )
    except InsufficientCredits:
        log.error(
            "hold %s of %s/%s (%s) cannot be released: its amount is not on %s; set aside",
            hold.id, hold.tenant, hold.account, hold.amount, system_account(hold.account, "held"),
        )  # fmt: skip
        connection.execute(_SET_ASIDE, {"hold_id": hold.id})
        return False


def _settle(
    connection: Connection,
    how: _Settlement,
    hold: Hold,
    *,
    tenant: str,
    state: str,
    now: datetime,
    postgres: bool,
    about: dict[str, Any],
) -> int | None:
    """Claim ``tenant``'s pending hold and move its amount off ``@held``; ``None``: no such hold.

    The claim and the movement are one SAVEPOINT: when the movement cannot be
    applied, the hold is left as it was.
    """
    if hold.tenant != tenant:  # another tenant's hold is no hold of this one
        return None
    params = {"hold_id": hold.id, "of_tenant": tenant, "new_state": state, "now": now}
    with connection.begin_nested():
        row = connection.execute(how.claim, params).first()
        if row is None:
            return None
        account, amount = row.account, int(row.amount)
        target = account if how.to is None else system_account(account, how.to)
        movement = Movement(
            tenant, system_account(account, "held"), target, amount, how.kind, now,
            hold_id=hold.id, **about,
        )  # fmt: skip
        if move(connection, movement, postgres=postgres) is None:
            raise InsufficientCredits(
                f"the held credits of {account} do not cover hold {hold.id}: nothing was moved"
            )
    return amount
