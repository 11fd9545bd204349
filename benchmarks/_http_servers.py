"""The two applications benchmarks/http.py serves under uvicorn (``--factory``).

Both are started as ``python -m uvicorn benchmarks._http_servers:<factory> --factory
--workers 2`` from the repository root, configured by the environment the driver sets
(``HTTPBENCH_DB_URL``, ``HTTPBENCH_TOKEN_SECRET``). Imported as ``benchmarks._http_servers``
(never with benchmarks/ ahead of the standard library on ``sys.path``: benchmarks/http.py
would shadow the standard ``http`` package that uvicorn, starlette and httpx import).

* :func:`charter_app` — the reference service as users get it: ``charter.demo.app:
  create_app`` with a default Charter (rate limits on: every default class and its
  failure mode, with limits no run reaches, ``_common.rate_limits()``), its middleware
  (request id, body limit, the per-address limit of unauthenticated requests), the
  bearer-token authenticator and ``POST /invoices/{id}/approve`` bound to the gate.
* :func:`bare_app` — the same endpoint written by hand on FastAPI: the same token check
  (``TokenSigner.authenticate`` + the demo's directory lookup), the same scope, input
  model and rule, then the fastest hand-written SQLAlchemy Core transaction (statements
  built once: ``SELECT ... FOR UPDATE``, ``UPDATE ... version + 1``, an HMAC-chained
  audit row into ``charter_audit`` from benchmarks/gate_overhead.py's ``HandAudit``,
  ``COMMIT``) in a sync endpoint (FastAPI's thread pool, as the gate's calls run), and the
  same JSON answer with its ``ETag``.
"""

from __future__ import annotations

import os
import queue
import sys
from pathlib import Path
from typing import Any

# After the standard library, never before it: see the module docstring.
sys.path.append(str(Path(__file__).resolve().parent))

import gate_overhead
from _common import rate_limits
from fastapi import FastAPI, Header
from fastapi.responses import JSONResponse
from sqlalchemy import bindparam, insert, select, update

from charter import Actor, Charter
from charter.demo.app import create_app
from charter.demo.models import Invoice
from charter.demo.service import Approve, directory
from charter.errors import Unauthenticated
from charter.settings import Settings
from charter.storage import WRITE_OPTION, make_engine
from charter.tokens import TokenSigner

ACTION = "invoice.approve"
SCOPE = "invoices:approve"


def _settings() -> Settings:
    return Settings(
        environment="production",
        database_url=os.environ["HTTPBENCH_DB_URL"],
        token_secrets=(os.environ["HTTPBENCH_TOKEN_SECRET"],),
        audit_keys=gate_overhead.AUDIT_KEYS,
        audit_anchor="none",
    )


def charter_app() -> FastAPI:
    """The reference service with a default Charter (rate limits on, no limit reached)."""
    settings = _settings()
    charter = Charter(
        database_url=settings.database_url,
        audit_keys=settings.audit_keys,
        audit_anchor=None,
        rate_limits=rate_limits(),
    )
    return create_app(settings, charter=charter)


def may_approve(actor: Actor, row: Any) -> bool:
    """The demo's CAN_APPROVE and its workflow step, by hand (the tenant is in the WHERE)."""
    return (
        "approver" in actor.roles
        and row.state == "submitted"
        and row.amount <= actor.attributes["approval_limit"]
        and row.created_by != actor.id
    )


def view(row: Any, approved_by: str, version: int) -> dict[str, Any]:
    """The demo's invoice_view of the approved row (finance-only bank_account left out)."""
    return {
        "id": row.id, "tenant": row.tenant_id, "customer": row.customer,
        "amount": str(row.amount), "currency": row.currency, "state": "approved",
        "version": version, "created_by": row.created_by, "submitted_by": row.submitted_by,
        "approved_by": approved_by, "charge_id": row.charge_id,
    }  # fmt: skip


class AuditStreams:
    """HandAudit chains checked out per transaction (two requests never share a chain)."""

    def __init__(self) -> None:
        self.free: queue.SimpleQueue[gate_overhead.HandAudit] = queue.SimpleQueue()

    def take(self) -> gate_overhead.HandAudit:
        try:
            return self.free.get_nowait()
        except queue.Empty:
            return gate_overhead.HandAudit(action=ACTION, resource_type=Invoice.__tablename__)

    def give_back(self, audit: gate_overhead.HandAudit) -> None:
        self.free.put(audit)


def bare_app() -> FastAPI:
    """``POST /invoices/{id}/approve`` by hand: token, scope, rule, Core transaction, audit."""
    settings = _settings()
    signer = TokenSigner(settings.token_secrets)
    engine = make_engine(settings.database_url).execution_options(**{WRITE_OPTION: True})
    t = Invoice.__table__
    select_locked = (
        select(
            t.c.id, t.c.tenant_id, t.c.customer, t.c.amount, t.c.currency, t.c.state,
            t.c.version, t.c.created_by, t.c.submitted_by, t.c.charge_id,
        )
        .where(t.c.id == bindparam("id"), t.c.tenant_id == bindparam("tenant"))
        .with_for_update()
    )  # fmt: skip
    approve_row = (
        update(t)
        .where(t.c.id == bindparam("b_id"))
        .values(state="approved", approved_by=bindparam("b_by"), version=t.c.version + 1)
    )
    audit_insert = insert(gate_overhead.reflect_audit(engine)).inline()
    streams = AuditStreams()
    app = FastAPI()

    @app.post("/invoices/{id}/approve")
    def approve(
        id: int, body: Approve, authorization: str | None = Header(default=None)
    ) -> JSONResponse:
        try:
            actor = signer.authenticate(authorization, directory)
        except Unauthenticated as exc:
            return JSONResponse({"detail": str(exc)}, status_code=401)
        if SCOPE not in (actor.scopes or ()):
            return JSONResponse({"detail": "missing scope"}, status_code=403)
        audit = streams.take()
        with engine.begin() as conn:
            row = conn.execute(select_locked, {"id": id, "tenant": actor.tenant}).one_or_none()
            if row is None:
                return JSONResponse({"detail": "not found"}, status_code=404)
            if not may_approve(actor, row):
                return JSONResponse({"detail": "forbidden"}, status_code=403)
            conn.execute(approve_row, {"b_id": id, "b_by": actor.id})
            entry = audit.entry(actor, id, row.state, "approved", body)
            conn.execute(audit_insert, entry)
        audit.committed(entry)
        streams.give_back(audit)  # a failed transaction drops its chain (never reused)
        version = row.version + 1
        return JSONResponse(view(row, actor.id, version), headers={"ETag": f'"{version}"'})

    return app
