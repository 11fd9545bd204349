"""Channel parity (issue 12, item 7): one action on one record gives the same decision, the
same effect and the same audit content through FastAPI, Flask, ``charter run``, ``charter
import``, a signed webhook and an MCP tool call. SQLite and PostgreSQL.

The app (:mod:`tests.parity_app`) declares ``invoice.approve`` with one rule — an approver
within their ``approval_limit`` — and gives every channel an actor that rule can mean, each
holding exactly the scope ``invoices:approve`` and the limit 1 000. Each test starts from a
fresh database holding one submitted invoice, id 1 (amount 500: allowed; 5 000: denied), runs
the action once through one channel and compares with the one expectation every channel
shares.

Compared on every channel (equal, field by field): the answer's decision (``allowed``, or the
refusal's stable code); the record after (state, version, ``charge_id`` from the input,
``approved_by``); exactly one audit entry for the action, with its ``action``, ``outcome``,
``decision``, ``rule``, ``tenant``, ``resource_type``, ``resource_id``, ``state_before``,
``state_after``, ``input_digest`` (the same input reached the gate: a JSON body, CLI
``--input``, a CSV row's cells, a webhook's mapped payload, a tool's ``input``), ``detail``,
``scopes`` (the credential's) and ``replayed``.

What each channel defines itself, and so may differ (and is asserted to be what that channel
says it is):

* ``channel`` — ``http`` (FastAPI and Flask), ``cli``, ``batch``, ``webhook``, ``agent``;
* ``request_id`` — each call's own (present on every entry);
* ``at`` — the time (and the ``stream``/``seq``/hash chain that orders it);
* ``real_actor`` — ``ada`` on the agent channel (she acts for alice), ``None`` elsewhere;
* ``subject`` and ``subject_kind`` — alice (``user``) wherever the channel can carry her
  (FastAPI, Flask, and MCP, where the agent acts on her behalf); a command line and an import
  act as their operator (``ops-alice``, ``operator``: an operator directory never yields a
  user), and a webhook as its partner (``payments-provider``, ``partner``). ``approved_by``
  in the record follows the subject;
* ``reason`` — the same text on every channel that carries one (``X-Charter-Reason``,
  ``--reason``, the tool's ``purpose``); a webhook carries none (``None``);
* ``idempotency_key`` — the caller's key where the caller sends one (the same ``parity-key``
  over HTTP, ``--key`` and the tool's ``idempotency_key``); an import derives its own per row
  (``imp:…``) and a webhook uses its message id (``webhook:<id>``);
* ``detail.granted_scopes`` — added on the agent channel only: a call on someone's behalf
  records the scopes its impersonation grant allowed (``["invoices:approve"]``); every other
  key of ``detail`` (none when allowed; the denial's message, kind, explanation and failed
  conditions when denied) is shared.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from flask import Flask
from mcp import Client
from sqlalchemy import insert, select
from typer.testing import CliRunner

from charter import Actor, Charter
from charter.audit.entry import audit_table, digest_input
from charter.cli import app as cli_app
from charter.demo.models import Invoice
from charter.integrations.agent import AgentChannel
from charter.integrations.fastapi import CharterRoutes
from charter.integrations.flask import CharterFlask
from charter.integrations.mcp import mcp_server
from charter.integrations.webhooks import WebhookReceiver, WebhookRoute
from charter.tokens import TokenSigner
from charter.webhooks import StandardWebhookSigner, StandardWebhookVerifier

from . import parity_app
from .parity_app import SCOPE, USERS, Approve, directory

TOKEN_SECRET = "parity-token-secret-0123456789abcdef"
WEBHOOK_SECRET = "whsec_" + "cGFyaXR5LXdlYmhvb2stc2VjcmV0LTAxMjM0NTY3ODk="
REFERENCE = "ref-7"
REASON = "month-end approvals, ticket OPS-12"
KEY = "parity-key"
APP = "tests.parity_app:charter"
CHANNELS = ("fastapi", "flask", "cli", "batch", "webhook", "mcp")
AMOUNT = {"allowed": Decimal("500.00"), "denied": Decimal("5000.00")}
#: The canonical input every channel hands the gate ({"reference": "ref-7"}), as audited.
DIGEST = digest_input(Approve(reference=REFERENCE))

#: What every channel must agree on, per scenario (the audit entry's shared fields).
SHARED: dict[str, dict[str, Any]] = {
    "allowed": {
        "action": "invoice.approve", "outcome": "ok", "decision": "allow",
        "tenant": "acme", "resource_type": "invoices", "resource_id": "1",
        "state_before": "submitted", "state_after": "approved", "scopes": [SCOPE],
        "replayed": False, "rule": "invoice.approve", "input_digest": DIGEST, "detail": {},
    },
    "denied": {
        "action": "invoice.approve", "outcome": "forbidden", "decision": "deny",
        "tenant": "acme", "resource_type": "invoices", "resource_id": "1",
        "state_before": "submitted", "state_after": "submitted", "scopes": [SCOPE],
        "replayed": False, "rule": "default-deny", "input_digest": DIGEST, "detail": {
            "message": "You are not allowed to perform invoice.approve.", "kind": "no_rule",
            "explanation": "no rule allows invoice.approve; nearest rule invoice.approve "
                           "failed: R.amount 5000.00 <= A.approval_limit 1000 is false",
            "failed": ["R.amount 5000.00 <= A.approval_limit 1000 is false"],
        },
    },
}  # fmt: skip
#: The answer every channel gives: allowed, or the refusal's stable code.
ANSWER = {"allowed": "allowed", "denied": "forbidden"}


@dataclass(frozen=True)
class Own:
    """What one channel defines in its entry (see the module docstring)."""

    channel: str
    subject: str
    subject_kind: str
    real_actor: str | None
    reason: str | None
    key: str  # the idempotency key, or its prefix when the channel derives it
    detail: dict[str, Any]  # what the channel adds to the entry's detail


DELEGATED = {"granted_scopes": [SCOPE]}  # the grant's scopes, on a call on someone's behalf
OWN: dict[str, Own] = {
    "fastapi": Own("http", "alice", "user", None, REASON, KEY, {}),
    "flask": Own("http", "alice", "user", None, REASON, KEY, {}),
    "cli": Own("cli", "ops-alice", "operator", None, REASON, KEY, {}),
    "batch": Own("batch", "ops-alice", "operator", None, REASON, "imp:", {}),
    "webhook": Own("webhook", "payments-provider", "partner", None, None, "webhook:msg_parity", {}),
    "mcp": Own("agent", "alice", "user", "ada", REASON, KEY, DELEGATED),
}


@dataclass
class World:
    """One test's database, its Charter and the ways in."""

    charter: Charter
    database_url: str
    tmp: Path
    signer: TokenSigner

    def authenticate(self, header: str | None) -> Actor:
        return self.signer.authenticate(header, directory)

    def headers(self) -> dict[str, str]:
        """alice's bearer token (scope invoices:approve), the key and the reason."""
        token = self.signer.issue("alice", "acme", scopes=[SCOPE])
        return {"Authorization": f"Bearer {token}", "Idempotency-Key": KEY,
                "X-Charter-Reason": REASON}  # fmt: skip

    def fastapi(self) -> tuple[FastAPI, CharterRoutes]:
        app = FastAPI()
        routes = CharterRoutes(
            app,
            self.charter,
            authenticate=lambda r: self.authenticate(r.headers.get("authorization")),
        )
        return app, routes


@pytest.fixture
def world(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, disposing: Any
) -> World:
    monkeypatch.setenv("CHARTER_ENV", "development")
    monkeypatch.setenv("CHARTER_DATABASE_URL", database_url)  # what `charter run --app` reads
    monkeypatch.delenv("CHARTER_OPERATORS", raising=False)
    charter = disposing(parity_app.charter())
    return World(charter, database_url, tmp_path, TokenSigner([TOKEN_SECRET]))


def submitted_invoice(world: World, amount: Decimal) -> None:
    with world.charter.engine.begin() as conn:
        conn.execute(insert(Invoice.__table__).values(
            id=1, tenant_id="acme", customer="ACME", amount=amount, currency="EUR",
            state="submitted", version=1, created_by="carol", created_at=datetime.now(UTC),
        ))  # fmt: skip


# -- the channels: each runs invoice.approve on invoice 1 and says what it answered ----------


def via_fastapi(world: World) -> str:
    app, routes = world.fastapi()
    routes.action("invoice.approve")
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.post(
            "/invoices/1/approve", json={"reference": REFERENCE}, headers=world.headers()
        )
    return "allowed" if r.status_code == 200 else r.json()["code"]


def via_flask(world: World) -> str:
    app = Flask(__name__)
    ext = CharterFlask(authenticate=lambda r: world.authenticate(r.headers.get("Authorization")))
    ext.action("invoice.approve")
    ext.init_app(app, charter=world.charter)
    r = app.test_client().post(
        "/invoices/1/approve", json={"reference": REFERENCE}, headers=world.headers()
    )
    return "allowed" if r.status_code == 200 else r.get_json()["code"]


def cli(*args: str) -> Any:
    return CliRunner().invoke(cli_app, list(args), catch_exceptions=False)


def via_cli(world: World) -> str:
    data = json.dumps({"reference": REFERENCE})
    done = cli("run", "invoice.approve", "--app", APP, "--as", "ops-alice", "--reason", REASON,
               "--input", data, "--target", "1", "--key", KEY)  # fmt: skip
    printed = json.loads(done.stdout.splitlines()[0])
    assert (0 if printed["ok"] else 1) == done.exit_code, done.output
    assert printed["audit_entry"] is not None  # it names the entry it wrote
    return "allowed" if printed["ok"] else printed["code"]


def via_batch(world: World) -> str:
    source, results = world.tmp / "approvals.csv", world.tmp / "approvals.results.jsonl"
    source.write_text(f"id,reference\n1,{REFERENCE}\n", encoding="utf-8")
    done = cli("import", str(source), "--action", "invoice.approve", "--app", APP,
               "--as", "ops-alice", "--reason", REASON, "--results", str(results))  # fmt: skip
    (row,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert (0 if row["status"] == "applied" else 1) == done.exit_code, done.output
    return "allowed" if row["status"] == "applied" else row["code"]


def via_webhook(world: World) -> str:
    app, routes = world.fastapi()
    receiver = WebhookReceiver(
        world.charter, StandardWebhookVerifier([WEBHOOK_SECRET]), partner=parity_app.partner,
        routes={"invoice.reference": WebhookRoute(
            "invoice.approve", input=lambda p: {"reference": p["data"]["reference"]},
            target=lambda p: p["data"]["invoice"])},
    )  # fmt: skip
    routes.webhook("/webhooks/parity", receiver)
    body = json.dumps({"type": "invoice.reference",
                       "data": {"invoice": 1, "reference": REFERENCE}}).encode()  # fmt: skip
    headers = StandardWebhookSigner(WEBHOOK_SECRET).sign("msg_parity", int(time.time()), body)
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.post("/webhooks/parity", content=body,
                        headers={**headers, "content-type": "application/json"})  # fmt: skip
    assert 200 == r.status_code, r.text  # a refusal is acknowledged too: retrying changes nothing
    answer = r.json()
    return "allowed" if answer["status"] == "applied" else answer["refusal"]["code"]


def via_mcp(world: World) -> str:
    agents = AgentChannel(world.charter, directory=directory, signer=world.signer)
    token = agents.issue(USERS["acme", "ada"], USERS["acme", "alice"], scopes={SCOPE})
    server = mcp_server(agents, token=token)

    async def call() -> Any:
        async with Client(server) as client:
            listed = await client.list_tools()
            assert ["invoice.approve"] == [t.name for t in listed.tools]
            return await client.call_tool("invoice.approve", {
                "purpose": REASON, "target": 1, "input": {"reference": REFERENCE},
                "idempotency_key": KEY})  # fmt: skip

    result = anyio.run(call)
    return result.structured_content["code"] if result.is_error else "allowed"


VIA: dict[str, Callable[[World], str]] = {
    "fastapi": via_fastapi, "flask": via_flask, "cli": via_cli, "batch": via_batch,
    "webhook": via_webhook, "mcp": via_mcp,
}  # fmt: skip


def entries(world: World) -> list[dict[str, Any]]:
    a = audit_table
    with world.charter.engine.connect() as conn:
        rows = conn.execute(select(a).where(a.c.action == "invoice.approve").order_by(a.c.id))
        return [dict(r._mapping) for r in rows]


def invoice(world: World) -> tuple[Any, ...]:
    t = Invoice.__table__
    with world.charter.engine.connect() as conn:
        row = conn.execute(select(t.c.state, t.c.version, t.c.charge_id, t.c.approved_by)).one()
    return tuple(row)


@pytest.mark.parametrize("scenario", ["allowed", "denied"])
@pytest.mark.parametrize("channel", CHANNELS)
def test_every_channel_gives_the_same_decision_effect_and_audit(world, channel, scenario):
    submitted_invoice(world, AMOUNT[scenario])
    own = OWN[channel]

    answer = VIA[channel](world)

    assert ANSWER[scenario] == answer
    if scenario == "allowed":
        assert ("approved", 2, REFERENCE, own.subject) == invoice(world)
    else:
        assert ("submitted", 1, None, None) == invoice(world)
    (entry,) = entries(world)
    shared = dict(SHARED[scenario], detail={**SHARED[scenario]["detail"], **own.detail})
    got = dict(entry, detail=entry["detail"] or {})  # no detail at all is stored as NULL
    assert shared == {k: got[k] for k in shared}
    assert (own.channel, own.subject, own.subject_kind, own.real_actor, own.reason) == (
        entry["channel"], entry["subject"], entry["subject_kind"], entry["real_actor"],
        entry["reason"],
    )  # fmt: skip
    key = entry["idempotency_key"]
    assert key == own.key if own.key == KEY else key.startswith(own.key), key
    assert entry["request_id"]
