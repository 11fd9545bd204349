"""An action with an outside step (a card charge), for the recovery-point tests."""

from __future__ import annotations

import os
import weakref
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict

from charter import Charter
from charter.context import ActionContext
from charter.demo.payments import PaymentClient

from . import app as test_app
from .app import Doc, OverLimit, is_member
from .conftest import AUDIT_KEYS


class Pay(BaseModel):
    model_config = ConfigDict(extra="forbid")
    amount: Decimal


def build(url: str, provider_url: str, *, crash: str | None = None, **options: Any) -> Charter:
    charter = test_app.build(Charter(database_url=url, audit_keys=AUDIT_KEYS, **options))
    client = PaymentClient(provider_url, timeout=5)
    # The client's keep-alive socket closes with the charter that uses it, not at
    # whatever moment the garbage collector reaches it (an unclosed-socket warning).
    weakref.finalize(charter, client.close)

    @charter.action("doc.pay", on=Doc, input=Pay, allow=is_member, idempotency="required")
    def pay(ctx: ActionContext, doc: Doc, data: Pay) -> dict[str, Any]:
        doc.state = "paying"  # local phase 1: committed with the recovery point

        def charge(key: str) -> dict[str, str]:
            if crash == "before_charge":
                os._exit(21)
            result = client.charge(data.amount, "EUR", f"doc-{doc.id}", key)
            if crash == "after_charge":
                os._exit(22)  # charged, but the result never reached our database
            return {"id": result.id}

        charged = ctx.external("charge", charge)
        if crash == "after_step":
            os._exit(23)
        doc.state = "paid"  # final phase: committed with the outcome
        doc.title = charged["id"]
        doc.counter += 1
        return {"charge": charged["id"]}

    @charter.action("doc.pay_refused", on=Doc, input=Pay, allow=is_member, idempotency="required")
    def pay_refused(ctx: ActionContext, doc: Doc, data: Pay) -> dict[str, Any]:
        """Refuses after its outside step: a business refusal of a multi-phase request."""
        doc.state = "paying"
        ctx.external(
            "charge", lambda key: {"id": client.charge(data.amount, "EUR", f"doc-{doc.id}", key).id}
        )
        raise OverLimit("the provider's answer says no")  # fmt: skip

    return charter
