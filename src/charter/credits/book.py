"""The credits facade: open accounts, grant, refund, hold, sweep and verify.

``Credits.of(charter)`` works on the Charter's database::

    credits = Credits.of(charter)
    credits.open("acme", currency="CREDIT", exponent=0)
    credits.grant("acme", 100)                 # credits@issued -> credits
    credits.balance("acme")                    # 100

Actions are charged by the gate (``cost=``, :mod:`.stage`); a handler with an
outside step holds credits in its own transaction (:meth:`Credits.hold`, then
:meth:`Credits.capture` or :meth:`Credits.release`). Every change is a
movement of :mod:`.ledger`: nothing here writes a balance directly.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import bindparam, insert, select
from sqlalchemy.engine import Connection, Engine

from ..errors import ConfigurationError, Conflict, InsufficientCredits, NotFound
from ..storage import WRITE_OPTION, is_postgres, translate_errors
from . import holds
from .amounts import check_amount, check_currency
from .costs import DEFAULT_ACCOUNT
from .holds import Hold
from .ledger import Moved, Movement, move, system_account
from .tables import accounts_table, ledger_table
from .verify import LedgerReport, verify_ledger

if TYPE_CHECKING:
    from ..context import ActionContext

__all__ = ["Account", "Credits"]

#: The system accounts every customer account comes with (see :mod:`.tables`).
SYSTEM_ROLES = ("issued", "spent", "held")
DEFAULT_HOLD = timedelta(minutes=15)
_a, _l = accounts_table, ledger_table
_ACCOUNT = select(_a).where(_a.c.tenant == bindparam("tenant"), _a.c.name == bindparam("name"))


class _Gate(Protocol):
    @property
    def engine(self) -> Engine: ...

    @property
    def clock(self) -> Callable[[], datetime]: ...

    @property
    def recovery_lease(self) -> timedelta: ...


@dataclass(frozen=True, slots=True)
class Account:
    """An account: its tenant and name, currency and minor-unit exponent, and its balance."""

    tenant: str
    name: str
    currency: str
    exponent: int
    balance: int


class Credits:
    """Accounts, balances and holds on one database (see the module docstring)."""

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Callable[[], datetime],
        recovery_lease: timedelta = timedelta(seconds=30),
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.recovery_lease = recovery_lease
        self.postgres = is_postgres(engine)

    @classmethod
    def of(cls, charter: _Gate) -> Credits:
        """The credits of ``charter``'s database, on its clock and recovery lease."""
        return cls(charter.engine, clock=charter.clock, recovery_lease=charter.recovery_lease)

    # -- accounts ----------------------------------------------------------------------

    def open(
        self,
        tenant: str,
        account: str = DEFAULT_ACCOUNT,
        *,
        currency: str = "CREDIT",
        exponent: int = 0,
        ctx: ActionContext | None = None,
    ) -> Account:
        """Open ``tenant``'s ``account`` (and its system accounts) at zero; idempotent.

        Opening an existing account with another currency or exponent is
        :class:`~charter.errors.Conflict`: an account's currency never changes.
        """
        currency, exponent = check_currency(currency, exponent)
        with self._connection(ctx) as connection:
            found = self._account(connection, tenant, account)
            if found is not None:
                if (found.currency, found.exponent) != (currency, exponent):
                    raise Conflict(
                        f"account {tenant}/{account} is in {found.currency} (exponent "
                        f"{found.exponent}), not {currency} (exponent {exponent})"
                    )
                return found
            now = self.clock()
            rows = [(account, True)] + [
                (system_account(account, role), role == "held") for role in SYSTEM_ROLES
            ]
            connection.execute(
                insert(_a),
                [
                    {
                        "tenant": tenant, "name": name, "currency": currency,
                        "exponent": exponent, "balance": 0, "bounded": bounded,
                        "created_at": now,
                    }
                    for name, bounded in rows
                ],
            )  # fmt: skip
        return Account(tenant, account, currency, exponent, 0)

    def account(self, tenant: str, account: str = DEFAULT_ACCOUNT) -> Account:
        """``tenant``'s ``account`` as it is now (:class:`~charter.errors.NotFound` if none)."""
        with translate_errors(), self.engine.connect() as connection:
            found = self._account(connection, tenant, account)
        if found is None:
            raise NotFound(f"{tenant} has no account {account!r}")
        return found

    def balance(self, tenant: str, account: str = DEFAULT_ACCOUNT) -> int:
        """What ``tenant``'s ``account`` holds now, in minor units."""
        return self.account(tenant, account).balance

    # -- movements outside an action ------------------------------------------------------

    def grant(
        self,
        tenant: str,
        amount: int,
        *,
        account: str = DEFAULT_ACCOUNT,
        ctx: ActionContext | None = None,
    ) -> int:
        """Add ``amount`` to the account (from its ``@issued`` account); the new balance.

        ``ctx``: in that action's transaction (a top-up action), else in one of its own.
        """
        amount = check_amount(amount)
        with self._connection(ctx) as connection:
            moved = self._move(
                connection, tenant, system_account(account, "issued"), account, amount, "grant"
            )
        return moved.credit_balance

    def refund(self, tenant: str, movement: int, *, ctx: ActionContext | None = None) -> int:
        """Give back a charge (a ledger movement to ``@spent``), once; the account's balance.

        A second refund of the same movement is :class:`~charter.errors.Conflict`.
        """
        with self._connection(ctx) as connection:
            row = connection.execute(
                select(_l, _a.c.name)
                .join(_a, _a.c.id == _l.c.debit)
                .where(_l.c.id == movement, _l.c.tenant == tenant)
                .where(_l.c.kind.in_(("charge", "capture")))
            ).first()
            if row is None:
                raise NotFound(f"{tenant} has no charge {movement}")
            account = str(row.name).removesuffix("@held")
            moved = self._move(
                connection, tenant, system_account(account, "spent"), account,
                int(row.amount), "refund", refund_of=movement,
            )  # fmt: skip
        return moved.credit_balance

    # -- holds (inside an action's transaction) -------------------------------------------

    def hold(
        self,
        ctx: ActionContext,
        amount: int,
        *,
        account: str = DEFAULT_ACCOUNT,
        name: str = "hold",
        expires_in: timedelta = DEFAULT_HOLD,
    ) -> Hold:
        """Reserve ``amount`` of the actor's tenant's account until ``expires_in`` from now.

        In the handler's transaction, before its ``ctx.external`` step: the
        hold commits with the step's recovery point. The same keyed request
        (resumed after a crash) gets its own hold back instead of a second
        one. ``expires_in`` must outlive the recovery lease, so that a resumed
        request still finds its hold pending.
        """
        amount = check_amount(amount)
        if expires_in <= self.recovery_lease:
            raise ConfigurationError(
                f"a hold must outlive the recovery lease ({self.recovery_lease}); "
                f"expires_in={expires_in} does not"
            )
        tenant, now = ctx.actor.tenant_id, ctx.now
        with self._connection(ctx) as connection:
            # Expired holds of this account go back first (lazily, besides the sweep).
            holds.sweep_expired(
                connection, now=now, postgres=self.postgres, tenant=tenant, account=account
            )
            return holds.reserve(
                connection, tenant=tenant, account=account, amount=amount,
                reference=_reference(ctx, name), now=now, expires_at=now + expires_in,
                action=ctx.action, request_id=ctx.request_id, postgres=self.postgres,
            )  # fmt: skip

    def capture(self, ctx: ActionContext, hold: Hold) -> int:
        """Take a pending hold of the actor's tenant; its amount.

        :class:`~charter.errors.HoldExpired` once it expired or was settled, and
        for a hold that is not this tenant's (the same answer as an unknown hold).
        Any actor of the tenant may capture it (a later request, a system actor).
        """
        with self._connection(ctx) as connection:
            return holds.capture(
                connection, hold, tenant=ctx.actor.tenant_id, now=self.clock(),
                postgres=self.postgres, action=ctx.action, request_id=ctx.request_id,
            )  # fmt: skip

    def release(self, ctx: ActionContext, hold: Hold) -> bool:
        """Give a pending hold of the actor's tenant back; ``False`` when there is none."""
        with self._connection(ctx) as connection:
            return holds.release(
                connection, hold, tenant=ctx.actor.tenant_id, now=self.clock(),
                postgres=self.postgres, action=ctx.action, request_id=ctx.request_id,
            )  # fmt: skip

    def sweep(self, *, limit: int = 100) -> int:
        """Release every hold pending past its expiry (up to ``limit``); how many were.

        Each hold on its own: one that cannot be released is set aside
        (``unreleasable``, logged) and the others are still released.
        """
        with self._transaction() as connection:
            return holds.sweep_expired(
                connection, now=self.clock(), postgres=self.postgres, limit=limit
            )

    # -- verification ---------------------------------------------------------------------

    def verify(self) -> LedgerReport:
        """Check every balance against the ledger, and the ledger's sum (one snapshot)."""
        engine = self.engine
        if self.postgres:
            engine = engine.execution_options(isolation_level="REPEATABLE READ")
        with translate_errors(), engine.connect() as connection, connection.begin():
            return verify_ledger(connection)

    # -- helpers --------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        with (
            translate_errors(),
            self.engine.execution_options(**{WRITE_OPTION: True}).begin() as connection,
        ):
            yield connection

    @contextmanager
    def _connection(self, ctx: ActionContext | None) -> Iterator[Connection]:
        """The action's transaction when called from a handler, else one of its own."""
        if ctx is None:
            with self._transaction() as connection:
                yield connection
            return
        if ctx.session is None:
            raise ConfigurationError("credits need the action's session: call from a handler")
        yield ctx.session.connection()

    def _account(self, connection: Connection, tenant: str, name: str) -> Account | None:
        row = connection.execute(_ACCOUNT, {"tenant": tenant, "name": name}).first()
        if row is None:
            return None
        return Account(row.tenant, row.name, row.currency, int(row.exponent), int(row.balance))

    def _move(
        self, connection: Connection, tenant: str, debit: str, credit: str, amount: int,
        kind: str, **about: Any,
    ) -> Moved:  # fmt: skip
        moved = move(
            connection, Movement(tenant, debit, credit, amount, kind, self.clock(), **about),
            postgres=self.postgres,
        )  # fmt: skip
        if moved is None:
            if self._account(connection, tenant, credit.partition("@")[0]) is None:
                raise NotFound(f"{tenant} has no account {credit.partition('@')[0]!r}: open it")
            raise InsufficientCredits(f"the {debit} balance does not cover {amount}")
        return moved


def _reference(ctx: ActionContext, name: str) -> str:
    """A hold's name: per keyed request and hold name (a resume finds it), else unique."""
    if ctx.idempotency_key is None:
        return uuid.uuid4().hex
    scope = "\x1f".join((*ctx.idempotency_scope, ctx.action, name))
    return hashlib.sha256(scope.encode()).hexdigest()[:64]
