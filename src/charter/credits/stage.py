"""The ``charge`` stage: an action's cost, taken inside the action's own transaction.

Placed after ``decide`` and before ``handler``: a call that is refused
charges nothing, a call whose handler fails rolls the charge back with its
effect, and a replayed call (answered from its idempotency record, claimed
in this same transaction) is never charged again. A request resumed after a
recovery point was charged in its first phase, which committed: it is not
charged again either.

The charge is one conditional statement (:func:`charter.credits.ledger.move`
or :func:`charter.credits.quotas.consume_quota`). When a debit does not cover,
the account's holds past their expiry are released first (in the same
transaction) and the debit tried once more, so expired holds never refuse a
charge while waiting for the sweep; when it still does not cover, the call is
refused — 402 ``insufficient_credits`` or 429 ``quota_exceeded`` —
and the refusal is audited like a denial. The resulting balance (or the uses
left in the period) is the outcome's ``balance``.
"""

from __future__ import annotations

import logging
from typing import Protocol

from ..actions import ActionSpec
from ..errors import CharterError, HandlerFailed, InsufficientCredits, QuotaExceeded
from ..pipeline.call import Call, Refusal, Stage
from ..pipeline.runtime import Runtime
from .costs import Cost
from .holds import sweep_expired
from .ledger import Movement, move, system_account
from .quotas import Quota, consume_quota

__all__ = ["charge"]

log = logging.getLogger("charter")


class _Declared(Protocol):
    """What the factory reads of :class:`charter.pipeline.stages.Assembly`."""

    @property
    def spec(self) -> ActionSpec: ...

    @property
    def runtime(self) -> Runtime: ...


def charge(a: _Declared) -> Stage | None:
    cost = a.spec.cost
    if cost is None:
        return None
    if isinstance(cost, Quota):
        return _quota_stage(a.spec, cost, a.runtime.postgres)
    return _credit_stage(a.spec, cost, a.runtime.postgres)


def _credit_stage(spec: ActionSpec, cost: Cost, postgres: bool) -> Stage:
    spent = system_account(cost.account, "spent")

    def charge(call: Call) -> None:
        """Charge the action's cost: one conditional debit of the tenant's account, ledgered."""
        if call.resume is not None:
            return  # charged in the request's first phase, which committed
        ctx = call.ctx
        amount = _amount(spec, cost, call)
        movement = Movement(
            ctx.actor.tenant_id, cost.account, spent, amount, "charge", ctx.now,
            action=spec.name, request_id=ctx.request_id,
        )  # fmt: skip
        assert call.connection is not None  # set by the runner for the transaction
        moved = move(call.connection, movement, postgres=postgres)
        if moved is None and sweep_expired(
            call.connection, now=ctx.now, postgres=postgres,
            tenant=movement.tenant, account=cost.account,
        ):  # fmt: skip
            # Credits still reserved by holds past their expiry are the account's
            # again: released now (in this transaction), not at the next sweep.
            moved = move(call.connection, movement, postgres=postgres)
        if moved is None:
            raise Refusal(
                InsufficientCredits(
                    f"{spec.name} costs {amount} and the {cost.account} balance does not "
                    "cover it: nothing was charged or done. Top up, then retry.",
                    cost=amount,
                    account=cost.account,
                ),
                call.decision,
                call.record,
            )
        call.writes.balance = moved.debit_balance

    return Stage("charge", charge)


def _quota_stage(spec: ActionSpec, quota: Quota, postgres: bool) -> Stage:
    def charge(call: Call) -> None:
        """Use the action's period quota: one conditional counter write for the tenant."""
        if call.resume is not None:
            return
        ctx = call.ctx
        assert call.connection is not None
        tenant = ctx.actor.tenant_id
        left = consume_quota(call.connection, quota, tenant, ctx.now, postgres=postgres)
        if left is None:
            resets = quota.resets_at(ctx.now)
            raise Refusal(
                QuotaExceeded(
                    f"the {quota.name} quota ({quota.limit} per {quota.per}) is used up; "
                    f"it resets at {resets.isoformat()}",
                    retry_after=int((resets - ctx.now).total_seconds()) + 1,
                    quota=quota.name,
                    limit=quota.limit,
                    resets_at=resets.isoformat(),
                ),
                call.decision,
                call.record,
            )
        call.writes.balance = left

    return Stage("charge", charge)


def _amount(spec: ActionSpec, cost: Cost, call: Call) -> int:
    try:
        return cost.amount_for(call.data, call.record)
    except CharterError:
        raise  # InvalidAmount: the input asked for no valid amount (422, nothing written)
    except Exception as exc:
        log.exception("the cost function of %s failed", spec.name)
        raise HandlerFailed(
            "The action's cost could not be computed; nothing was charged or done.",
            request_id=call.ctx.request_id,
        ) from exc
