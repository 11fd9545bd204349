"""The reference service as a Flask application (``charter.demo.flask_app:create_app``).

The same declarations (:func:`~charter.demo.service.build_charter`), the same
tokens and the same routes as the FastAPI service (:mod:`charter.demo.app`), through
:class:`~charter.integrations.flask.CharterFlask`: for the same requests it gives
the same answers (tests/integrations/test_flask.py compares them).
"""

from __future__ import annotations

from flask import Flask, Request

from ..actor import Actor
from ..gate import Charter
from ..integrations.flask import CharterFlask
from ..integrations.http import ON_BEHALF_HEADER, on_behalf_claim
from ..migrate import upgrade
from ..settings import Settings
from ..tokens import TokenSigner
from .app import DEMO_MIGRATIONS
from .service import build_charter, directory, invoice_view

__all__ = ["create_app", "routes"]


def routes(ext: CharterFlask) -> CharterFlask:
    """The reference service's routes (those of charter.demo.app that need no outside service)."""
    ext.bind("POST", "/invoices", "invoice.create", target=None)
    ext.export("/invoices/export", "invoice.export")  # before /invoices/{id}, as on FastAPI
    ext.bind("GET", "/invoices/{id}", "invoice.get")
    for verb in ("submit", "approve", "void"):
        ext.bind("POST", f"/invoices/{{id}}/{verb}", f"invoice.{verb}")
    ext.bind("POST", "/plan-upgrades", "plan_upgrade.start", target=None)
    ext.bind("GET", "/plan-upgrades/{id}", "plan_upgrade.get")
    for step in ("verify", "capture", "complete"):
        ext.bind("POST", f"/plan-upgrades/{{id}}/{step}", f"plan_upgrade.{step}")
    ext.bind("GET", "/charges/{charge_id}/invoice", "invoice.find_by_charge", target="charge_id")
    ext.bind("POST", "/credits/top-up", "credits.top_up", target=None)
    ext.bind("GET", "/credits", "credits.balance", target=None)
    ext.list("/invoices", "invoice.get", render=invoice_view)
    ext.list("/approvals", "invoice.approve", render=invoice_view)
    return ext


def create_app(
    settings: Settings | None = None,
    *,
    charter: Charter | None = None,
    impersonation_claims: bool = False,
) -> Flask:
    """Build the Flask reference service; refuses default secrets outside development.

    As the FastAPI service: a plain token's ``X-On-Behalf-Of`` is refused (401) unless
    ``impersonation_claims=True`` (acting for someone happens inside a support session,
    which this adapter's service does not serve).
    """
    settings = settings or Settings.from_env()
    if charter is None:
        charter = Charter(
            database_url=settings.database_url, audit_keys=settings.audit_keys,
            development=settings.development, audit_anchor=settings.audit_anchor_uri,
            rate_limits=settings.rate_limits,
        )  # fmt: skip
        upgrade(charter.engine, extra_locations=DEMO_MIGRATIONS)
    build_charter(charter)
    signer = TokenSigner(settings.token_secrets)

    def authenticate(request: Request) -> Actor:
        claimed = on_behalf_claim(
            request.headers.get(ON_BEHALF_HEADER), accepted=impersonation_claims
        )
        return signer.authenticate(
            request.headers.get("Authorization"), directory, on_behalf_of=claimed
        )

    app = Flask("charter.demo")
    routes(CharterFlask(authenticate=authenticate, max_body_bytes=64 * 1024)).init_app(
        app, charter=charter
    )
    return app
