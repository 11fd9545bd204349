"""An intentionally unsafe application: it produces every finding of ``charter check``.

Each mistake is labelled with the code that must find it. ``app`` is the FastAPI
application (``charter check tests.unsafe_app:app``); ``AGENT_TOOLS`` is what an
agent channel would expose (issue 12), passed to the inventory by the tests.
Nothing here runs a request: the check reads declarations and routes.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from charter import A, Charter, R, Transition
from charter.actor import Actor
from charter.integrations.fastapi import CharterRoutes
from charter.integrations.webhooks import WebhookReceiver, WebhookRoute
from charter.tools.inventory import AgentTool


class Base(DeclarativeBase):
    pass


class Ledger(Base):
    __tablename__ = "unsafe_ledgers"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="open")
    version: Mapped[int] = mapped_column(default=1)
    owner_id: Mapped[str] = mapped_column(String(64))


def _handler(ctx: Any, record: Any, data: Any) -> dict[str, Any]:
    return {}


charter = Charter(database_url="sqlite://", development=True, checkpoint_interval=None)
charter.resource(Ledger, tenant="tenant_id", state="state", version="version")
charter.workflow(
    Ledger, states=("open", "closed"), initial="open",
    transitions=(Transition("ledger.close", "open", "closed"),),
)  # fmt: skip
MINE = R.owner_id == A.id

# CH004 (the rules name a role, never the record), CH005 (the default scope ledgers:write),
# CH006 (irreversible, idempotency optional), CH011 (irreversible, impersonation allowed),
# CH012 (exposed to agents below, without confirmation).
charter.action("ledger.close", on=Ledger, allow=A.has_role("clerk"), tags={"irreversible"})(
    _handler
)
# CH003: no rule allows it.
charter.action("ledger.freeze", on=Ledger, scope="ledgers:freeze")(_handler)
# CH007: tagged admin, no reason required.
charter.action(
    "ledger.reset",
    on=Ledger,
    allow=A.has_role("admin") & MINE,
    scope="ledgers:reset",
    tags={"admin"},
)(_handler)
# CH007: only support staff can ever do it, and no reason is asked.
charter.action(
    "ledger.repair", on=Ledger, allow=A.has_role("support") & MINE, scope="ledgers:repair"
)(_handler)
# CH010: an export on the read class; CH008: it declares no page cap.
charter.action(
    "ledger.export",
    on=Ledger,
    target=None,
    sensitive_read=True,
    allow=MINE,
    scope="ledgers:export",
    rate="read",
    listable=True,
)(_handler)
# A read, listed with a cap above the maximum (CH009, below).
charter.action(
    "ledger.get", on=Ledger, sensitive_read=True, allow=MINE, scope="ledgers:get", listable=True
)(_handler)
# CH014: a change bound to GET (below).
charter.action(
    "ledger.settle",
    on=Ledger,
    allow=MINE,
    scope="ledgers:settle",
    idempotency="required",
    tags={"financial"},
    impersonation=False,
)(_handler)
# Safe: nothing to find (the rules look at the record, its own scope, required key).
charter.action("ledger.note", on=Ledger, allow=MINE, scope="ledgers:note", idempotency="required")(
    _handler
)
charter.action(
    "ledger.sync", idempotency="required", allow=A.has_role("partner"), scope="ledgers:sync"
)(_handler)

app = FastAPI()


def _authenticate(request: Request) -> Actor:
    return Actor.make("nobody", "t", scopes=())


routes = CharterRoutes(app, charter, authenticate=_authenticate)
routes.bind("POST", "/ledgers/{id}/close", "ledger.close")
routes.bind("POST", "/ledgers/{id}/freeze", "ledger.freeze")
routes.bind("POST", "/ledgers/{id}/reset", "ledger.reset")
routes.bind("POST", "/ledgers/{id}/repair", "ledger.repair")
routes.bind("GET", "/ledgers/{id}/settle", "ledger.settle")  # CH014
routes.bind("POST", "/ledgers/{id}/notes", "ledger.note")
routes.bind("GET", "/ledgers/export", "ledger.export", target=None)


class NotAVerifier:
    """Accepts anything: what a hand-rolled 'verification' often amounts to."""

    header_names = ("x-signature",)
    max_header_length = 1024

    def verify(self, headers: Any, body: bytes) -> Any:
        return body


# CH013: a Charter webhook route whose verifier is not a signature verifier.
routes.webhook(
    "/webhooks/partner",
    WebhookReceiver(charter, NotAVerifier(), partner=lambda event: Actor.make("p", "t"),  # type: ignore[arg-type]
                    routes={"sync": WebhookRoute("ledger.sync", input=lambda event: {})}),
)  # fmt: skip


@app.post("/ledgers/{id}/delete")  # CH001: changes state outside the gate
async def delete_ledger(id: int) -> JSONResponse:
    return JSONResponse({"deleted": id})


@app.get("/ledgers/{id}/raw")  # CH002: reads a resource's records outside the gate
async def raw_ledger(id: int) -> JSONResponse:
    return JSONResponse({"id": id})


@app.post("/callbacks/bank")  # CH013: a partner callback nothing verifies
async def bank_callback(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


@app.get("/healthz")  # not a finding: not on a resource's path
async def healthz() -> JSONResponse:
    return JSONResponse({"ok": True})


async def big_page(request: Request) -> JSONResponse:
    return JSONResponse({"items": []})


# CH009: an adapter (marked as Charter's) whose page cap is above the configured maximum.
big_page.__charter__ = {  # type: ignore[attr-defined]
    "kind": "list", "action": "ledger.get", "charter": charter, "page_cap": 100_000,
}  # fmt: skip
app.add_api_route("/ledgers", big_page, methods=["GET"])

#: What an agent channel exposes (issue 12): CH012, an irreversible action, no confirmation.
AGENT_TOOLS = (AgentTool("close_ledger", "ledger.close", confirmation=False),)

#: Every code the unsafe application must produce.
EXPECTED = {f"CH{n:03d}" for n in range(1, 15)}
