"""The reference service for the import tests, with two test-only stages on invoice.create.

``OPS_BLOCK_CUSTOMER``: the row of that customer waits inside its transaction (after
the key's claim and the handler's INSERT), having written ``OPS_READY_FILE``, so a
test can SIGKILL the import there. A customer named ``fail-after-write`` has its
invoice flushed to the database and then refused (a DomainError): the row must
leave nothing behind. ``tally.add`` takes a strict integer and a boolean, for CSV cells.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from charter import Charter
from charter.demo.service import build_charter
from charter.errors import DomainError
from charter.pipeline import Assembly, Call, Stage
from charter.policy import A
from charter.ratelimit import RateLimiter

FAIL = "fail-after-write"

operators = {
    "ops-olga": {
        "tenant": "acme",
        "roles": ["admin"],
        "scopes": ["invoices:read", "invoices:write"],
    },
    "ops-oscar": {"tenant": "acme", "roles": ["member"], "scopes": ["invoices:write"]},
    "ops-ada": {
        "tenant": "acme",
        "roles": ["approver"],
        "scopes": ["invoices:approve"],
        "attributes": {"approval_limit": 1000},
    },
}


class Tally(BaseModel):
    model_config = ConfigDict(extra="forbid")
    count: int = Field(strict=True, ge=0)
    flag: bool = False
    label: str | None = None


def _block(a: Assembly) -> Stage | None:
    if a.spec.name != "invoice.create":
        return None
    customer, ready = os.environ.get("OPS_BLOCK_CUSTOMER"), os.environ.get("OPS_READY_FILE")

    def block(call: Call) -> None:
        """Test only: wait here for the SIGKILL, inside the row's transaction."""
        assert call.session is not None
        call.session.flush()  # the row's INSERT is in the database, uncommitted
        if customer and ready and call.data.customer == customer:  # type: ignore[attr-defined]
            Path(ready).write_text("waiting")
            time.sleep(120)
        if call.data.customer == FAIL:  # type: ignore[attr-defined]
            raise DomainError("refused after its invoice was written")

    return Stage("block", block)


def make(
    database_url: str | None = None, *, rate_limits: Any = "memory://", clock: Any = None
) -> Charter:
    """The app (``--app tests.ops_import_app:make``): CHARTER_DATABASE_URL's database."""
    url = database_url or os.environ["CHARTER_DATABASE_URL"]
    timed = {} if clock is None else {"clock": clock}  # the Charter's own clock by default
    charter = Charter(database_url=url, development=True, checkpoint_interval=None,
                      rate_limits=rate_limits, **timed)  # fmt: skip
    charter.add_stage("block", _block, after="handler")
    build_charter(charter)

    @charter.action("tally.add", input=Tally, allow=A.has_role("admin"), scope="invoices:write",
                    idempotency="optional")  # fmt: skip
    def tally(ctx: Any, _: None, data: Tally) -> dict[str, Any]:
        return {"count": data.count, "flag": data.flag, "label": data.label}

    return charter


def limited(database_url: str, clock: Any = None) -> Charter:
    """The app with a write class of one call a second (rows wait their turn)."""
    from charter.ratelimit import RateClass

    limits = RateLimiter(classes=[RateClass("write", "1/second")])
    return make(database_url, rate_limits=limits, clock=clock)
