"""The reference service's HTTP application (``charter.demo:app``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from ..actor import Actor
from ..credits import Credits
from ..decision import Decision
from ..errors import InsufficientCredits, NotFound, Unauthenticated
from ..gate import Charter
from ..integrations.agent import AgentChannel
from ..integrations.agentapi import confirmation_routes
from ..integrations.fastapi import CharterRoutes
from ..integrations.openapi import problem_responses
from ..integrations.support import session_authenticator, support_routes
from ..integrations.webhooks import WebhookReceiver, WebhookRoute
from ..migrate import upgrade
from ..sessions import ImpersonationSessions
from ..settings import Settings
from ..tokens import TokenSigner
from ..webhooks import StandardWebhookVerifier
from .models import Invoice
from .payment_client import PaymentClient, PaymentProviderError, PaymentProviderUnavailable
from .sender import SenderClient, SenderFailed, SenderNotConfigured
from .service import build_charter, directory, invoice_view, payments_partner

__all__ = ["DEMO_MIGRATIONS", "create_app", "demo_scopes"]

log = logging.getLogger("charter.demo")

DEMO_MIGRATIONS = ("charter.demo:migrations",)
#: How often the service finishes abandoned requests and sweeps expired keys. (Audit
#: checkpoints are the library's: every Charter writes its own, see charter.audit.schedule.)
MAINTENANCE_SECONDS = 60


def demo_scopes(user: Actor) -> list[str]:
    """The scopes the demo issues per user (a real service asks the user to consent)."""
    # account:read: everyone sees who acted on their behalf (GET /me/impersonations).
    scopes = ["invoices:read", "invoices:write", "plan:upgrade", "account:read"]
    if "approver" in user.roles:
        scopes.append("invoices:approve")
    if "support" in user.roles:
        scopes.append("invoices:*")
    if user.roles & {"support", "admin"}:
        scopes.append("support:sessions")  # open, list, close and revoke support sessions
    if "admin" in user.roles:
        scopes.append("credits:write")  # prepaid credits (credits.top_up)
    return scopes


def create_app(
    settings: Settings | None = None,
    *,
    charter: Charter | None = None,
    impersonation_claims: bool = False,
) -> FastAPI:
    """Build the reference service; refuses to start with default secrets outside development.

    Support acts for a user inside an impersonation session only;
    ``impersonation_claims=True`` also accepts a plain token's ``X-On-Behalf-Of``
    claim, checked by the gate against the grants (the tests of the grant rule).
    """
    settings = settings or Settings.from_env()
    if charter is None:
        charter = Charter(
            database_url=settings.database_url,
            audit_keys=settings.audit_keys,
            development=settings.development,
            audit_anchor=settings.audit_anchor_uri,
            rate_limits=settings.rate_limits,
        )
    payments = PaymentClient(settings.payments_url) if settings.payments_url else None
    sender = SenderClient(settings.sender_url) if settings.sender_url else None
    build_charter(charter, payments=payments, sender=sender)
    signer = TokenSigner(settings.token_secrets)
    sessions = ImpersonationSessions.of(charter)
    sessions.signer = signer  # each opened session's token

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(upgrade, charter.engine, extra_locations=DEMO_MIGRATIONS)
        task = asyncio.create_task(_maintenance(charter))
        try:
            yield
        finally:
            task.cancel()
            charter.close()  # a last audit checkpoint, then the database
            if payments is not None:
                payments.close()
            if sender is not None:
                sender.close()

    app = FastAPI(title="Charter reference service", version="0.1.0", lifespan=lifespan)
    app.state.charter = charter
    app.state.signer = signer
    # The agent channel (ada's tools): `charter mcp serve --app charter.demo:app` serves them.
    agents = AgentChannel(charter, directory=directory, signer=signer)
    app.state.agents = agents

    # Plain tokens and support session tokens, whose session is looked up at every request:
    # acting for someone happens inside a session only (X-On-Behalf-Of is refused).
    authenticate = session_authenticator(signer, directory, sessions, claims=impersonation_claims)
    routes = CharterRoutes(app, charter, authenticate=authenticate, max_body_bytes=64 * 1024)
    routes.bind("POST", "/invoices", "invoice.create", target=None)
    routes.bulk("/invoices/bulk", "invoice.create")  # per item
    routes.bulk("/invoices/bulk-approve", "invoice.approve")  # all or nothing
    # Before /invoices/{id}, which would otherwise take "export" for an id.
    routes.export("/invoices/export", "invoice.export")  # streamed CSV / JSON lines
    routes.bind("GET", "/invoices/{id}", "invoice.get")
    routes.bind("POST", "/invoices/{id}/submit", "invoice.submit")
    routes.bind("POST", "/invoices/{id}/approve", "invoice.approve")
    routes.bind(
        "POST", "/invoices/{id}/pay", "invoice.pay",
        errors=(PaymentProviderError, PaymentProviderUnavailable),
    )  # fmt: skip
    routes.bind("POST", "/invoices/{id}/void", "invoice.void")
    routes.bind("POST", "/plan-upgrades", "plan_upgrade.start", target=None)
    routes.bind("GET", "/plan-upgrades/{id}", "plan_upgrade.get")
    for step in ("verify", "capture", "complete"):
        routes.bind("POST", f"/plan-upgrades/{{id}}/{step}", f"plan_upgrade.{step}")
    routes.bind("GET", "/charges/{charge_id}/invoice", "invoice.find_by_charge", target="charge_id")
    routes.bind(
        "POST", "/invoices/{id}/remind", "invoice.remind",
        errors=(SenderNotConfigured, SenderFailed, InsufficientCredits),
    )  # fmt: skip
    routes.bind("POST", "/credits/top-up", "credits.top_up", target=None)
    routes.bind("GET", "/credits", "credits.balance", target=None)
    routes.list("/invoices", "invoice.get", render=invoice_view)
    if settings.webhook_secrets:
        routes.webhook(
            "/webhooks/payments",
            WebhookReceiver(
                charter,
                StandardWebhookVerifier(settings.webhook_secrets),
                partner=lambda event: payments_partner(_reference(event)[0]),
                routes={
                    "payment.settled": WebhookRoute(
                        "invoice.mark_paid",
                        input=lambda event: {"charge_id": event["data"]["id"]},
                        target=lambda event: _reference(event)[1],
                    )
                },
            ),
        )
    routes.list("/approvals", "invoice.approve", render=invoice_view)
    support_routes(routes, sessions)  # /support/sessions..., /me/impersonations
    confirmation_routes(routes, agents)  # /agent/confirmations...: a person confirms ada's calls

    @app.get("/invoices/{id}/actions", responses=problem_responses(Unauthenticated, NotFound))
    async def next_actions(id: int, request: Request) -> JSONResponse:
        """What the caller may do next with this invoice, and why not (for UI buttons)."""
        actor = await routes.actor(request)
        decisions = await run_in_threadpool(_allowed, charter, actor, id)
        return JSONResponse(
            {
                name: {
                    "allowed": d.allowed,
                    # False: not possible in the invoice's state, for anyone (its workflow).
                    "possible": d.possible,
                    "reason": d.public_reason if not d.allowed else None,
                }
                for name, d in decisions.items()
            }
        )

    @app.get("/healthz", responses={503: {"description": "The database is unreachable."}})
    async def healthz() -> JSONResponse:
        def ping() -> None:
            with charter.engine.connect() as conn:
                conn.execute(text("SELECT 1"))

        try:
            await run_in_threadpool(ping)
        except Exception:
            log.warning("health check: database unreachable", exc_info=True)
            return JSONResponse({"status": "unavailable", "database": "down"}, status_code=503)
        return JSONResponse({"status": "ok", "database": "up"})

    return app


def _reference(event: Mapping[str, Any]) -> tuple[str, str]:
    """The (tenant, invoice id) our charge reference carries (set by invoice.pay)."""
    tenant, _, invoice_id = str(event["data"]["reference"]).partition(":")
    if not tenant or not invoice_id:
        raise ValueError("reference")
    return tenant, invoice_id


def _allowed(charter: Charter, actor: Actor, invoice_id: int) -> dict[str, Decision]:
    key = charter.resources["invoices"].coerce(None, invoice_id)  # None: no row can have it
    with charter.session() as session:
        invoice = None if key is None else session.get(Invoice, key)
        if invoice is None or invoice.tenant_id != actor.tenant_id:
            raise NotFound(f"invoices {invoice_id} was not found")
        return charter.allowed_actions(actor, invoice)


async def _maintenance(charter: Charter) -> None:
    """Periodic upkeep: finish abandoned multi-phase requests, sweep expired idempotency
    records, release expired credit holds. (The audit checkpoints and their anchor are
    written by the Charter itself.)"""
    credits = Credits.of(charter)
    while True:
        await asyncio.sleep(MAINTENANCE_SECONDS)
        for job in (charter.resume_abandoned, charter.purge_idempotency, credits.sweep):
            try:
                await run_in_threadpool(job)
            except Exception:
                log.warning("maintenance job %s failed; will retry", job.__name__, exc_info=True)
