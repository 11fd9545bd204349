"""Issue 9, section 5: webhooks that never stop retrying.

Over HTTP against the reference service. A partner retries every delivery not
answered 2xx, so an authentic delivery the gate refuses for good must be
acknowledged (200 ``refused``, audited, remembered: its redelivery is a
``duplicate``), and only a transient failure may ask for a retry.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from charter import Charter
from charter.demo.app import create_app
from charter.demo.payments import PaymentClient, PaymentProviderStub
from charter.settings import DEVELOPMENT_TOKEN_SECRET, DEVELOPMENT_WEBHOOK_SECRET, Settings
from charter.webhooks import StandardWebhookSigner
from tests.integrations.test_fastapi import auth, create_invoice

SIGNER = StandardWebhookSigner(DEVELOPMENT_WEBHOOK_SECRET)
AUDIT_KEYS = {"k1": "test-audit-key-0123456789abcdef"}


def settings(payments_url: str | None) -> Settings:
    return Settings(
        environment="development",
        token_secrets=(DEVELOPMENT_TOKEN_SECRET,),
        audit_keys=AUDIT_KEYS,
        payments_url=payments_url,
        webhook_secrets=(DEVELOPMENT_WEBHOOK_SECRET,),
    )


@pytest.fixture
def client(database_url: str) -> Iterator[TestClient]:
    with PaymentProviderStub() as provider:
        charter = Charter(database_url=database_url, audit_keys=AUDIT_KEYS)
        app = create_app(settings(provider.base_url), charter=charter)
        with TestClient(app, raise_server_exceptions=False) as c:
            c.app_state = app.state  # type: ignore[attr-defined]
            yield c


def pay(client: Any) -> tuple[int, str]:
    """An invoice paid through the provider; (its id, the provider's charge id)."""
    invoice = create_invoice(client)
    client.post(f"/invoices/{invoice}/submit", headers=auth("alice"))
    client.post(f"/invoices/{invoice}/approve", headers=auth("bob"))
    paid = client.post(
        f"/invoices/{invoice}/pay", headers=auth("carol", **{"Idempotency-Key": f"p{invoice}"})
    )
    assert 200 == paid.status_code, paid.text
    return invoice, paid.json()["charge_id"]


def deliver(
    client: TestClient, charge: str, invoice: int | str, msg_id: str, tenant: str = "acme"
) -> httpx.Response:
    body = json.dumps(
        {
            "type": "payment.settled",
            "data": {"id": charge, "reference": f"{tenant}:{invoice}", "status": "succeeded"},
        }
    ).encode()
    headers = SIGNER.sign(msg_id, int(time.time()), body)
    return client.post(
        "/webhooks/payments", content=body, headers={**headers, "Content-Type": "application/json"}
    )


def marks(client: TestClient, invoice: int) -> list[tuple[str, str, bool]]:
    """The invoice's mark_paid audit entries: (decision, outcome, replayed)."""
    charter: Charter = client.app_state.charter  # type: ignore[attr-defined]
    return [
        (e["decision"], e["outcome"], e["replayed"])
        for e in charter.history("invoices", invoice)
        if e["action"] == "invoice.mark_paid" and e["channel"] == "webhook"
    ]


def state(client: TestClient, invoice: int) -> str:
    return str(client.get(f"/invoices/{invoice}", headers=auth("bob")).json()["state"])


def test_a_new_message_for_an_already_paid_invoice_is_acknowledged_as_refused(client):
    invoice, charge = pay(client)
    assert "applied" == deliver(client, charge, invoice, "msg_first").json()["status"]
    response = deliver(client, charge, invoice, "msg_second")  # the provider's own resend
    assert 200 == response.status_code, response.text  # was 403: retried forever
    body = response.json()
    assert ("refused", "msg_second") == (body["status"], body["id"])
    assert {"code", "reason"} == set(body["refusal"])
    # The provider may not read invoices, so a refusal on one is concealed as not found.
    assert "not_found" == body["refusal"]["code"]
    assert "paid" == state(client, invoice)
    assert [("allow", "ok", False), ("deny", "not_found", False)] == marks(client, invoice)


def test_the_redelivery_of_a_refused_message_is_a_duplicate_of_the_refusal(client):
    invoice, charge = pay(client)
    deliver(client, charge, invoice, "msg_first")
    refused = deliver(client, charge, invoice, "msg_again").json()
    again = deliver(client, charge, invoice, "msg_again")
    assert 200 == again.status_code, again.text
    assert ("duplicate", refused["refusal"]) == (again.json()["status"], again.json()["refusal"])
    assert ("deny", "not_found", False) == marks(client, invoice)[1]
    assert ("allow", "not_found", True) == marks(client, invoice)[2]  # audited as a replay
    assert 3 == len(marks(client, invoice))


def test_a_refusal_says_the_public_reason_never_the_rule_behind_it(client):
    invoice, _ = pay(client)
    response = deliver(client, "ch_not_ours", invoice, "msg_foreign")
    assert (200, "refused") == (response.status_code, response.json()["status"])
    assert "charge_id" not in response.text
    assert "payment_pending" not in response.text
    assert "payment_pending" == state(client, invoice)


def test_a_delivery_for_another_tenants_invoice_is_refused_as_not_found(client):
    invoice, charge = pay(client)
    response = deliver(client, charge, invoice, "msg_globex", tenant="globex")
    assert (200, "refused", "not_found") == (
        response.status_code,
        response.json()["status"],
        response.json()["refusal"]["code"],
    )  # was 404: retried forever
    assert "duplicate" == deliver(client, charge, invoice, "msg_globex", "globex").json()["status"]


def test_input_the_action_refuses_is_acknowledged_refused_and_audited(client):
    invoice, _ = pay(client)
    response = deliver(client, "c" * 65, invoice, "msg_long")  # charge_id: at most 64
    assert 200 == response.status_code, response.text  # was 422, and unaudited
    assert ("refused", "invalid_input") == (
        response.json()["status"],
        response.json()["refusal"]["code"],
    )
    assert [("deny", "invalid_input", False)] == marks(client, invoice)
    again = deliver(client, "c" * 65, invoice, "msg_long")
    assert (200, "duplicate") == (again.status_code, again.json()["status"])
    assert [("deny", "invalid_input", False), ("deny", "invalid_input", True)] == marks(
        client, invoice
    )


# -- the stub provider's own retries, against the service on a real port --------------------


def _free_socket() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture
def live(database_url: str) -> Iterator[tuple[httpx.Client, PaymentProviderStub]]:
    """The reference service on 127.0.0.1, and the stub provider sending it webhooks."""
    sock = _free_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    stub = PaymentProviderStub(
        webhook_url=f"{url}/webhooks/payments",
        webhook_secret=DEVELOPMENT_WEBHOOK_SECRET,
        webhook_retry_delays=(0.05, 0.05, 0.05),
    )
    stub.start()
    charter = Charter(database_url=database_url, audit_keys=AUDIT_KEYS)
    app = create_app(settings(stub.base_url), charter=charter)
    server = uvicorn.Server(
        uvicorn.Config(app, log_config=None, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "the service did not start"
            time.sleep(0.01)
        with httpx.Client(base_url=url, timeout=10) as http:
            yield http, stub
    finally:
        stub.stop()
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def _wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_the_stubs_genuine_redeliveries_for_a_paid_invoice_are_acknowledged_once(live):
    http, stub = live
    invoice, _ = pay(http)
    _wait_for(lambda: state(http, invoice) == "paid")  # the stub's own payment.settled
    assert [200] == [d.status_code for d in stub.webhook_deliveries]

    same = httpx.post(f"{stub.base_url}/v1/webhooks/redeliver").json()
    resent = httpx.post(f"{stub.base_url}/v1/webhooks/redeliver", json={"new_id": True}).json()
    assert (200, 1) == (same["status_code"], same["attempts"])  # duplicate
    assert (200, 1) == (resent["status_code"], resent["attempts"])  # was 403, then retried
    time.sleep(0.3)  # longer than the whole retry schedule: nothing more is sent
    assert [(200, 1)] * 3 == [(d.status_code, d.attempt) for d in stub.webhook_deliveries]
    assert "paid" == state(http, invoice)


def test_the_stub_retries_what_is_not_acknowledged_and_stops_at_the_first_2xx(live):
    _, stub = live
    assert stub.base_url is not None
    with PaymentClient(stub.base_url) as provider:
        provider.charge("5.00", "EUR", "acme:", "k-broken")  # a reference naming no invoice
    _wait_for(lambda: len(stub.webhook_deliveries) == 4)
    assert [(400, n) for n in (1, 2, 3, 4)] == [
        (d.status_code, d.attempt) for d in stub.webhook_deliveries
    ]  # malformed: a 4xx, retried until the schedule ends
