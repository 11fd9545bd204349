"""Partner webhooks over HTTP: verified, replay-proof, run through the gate as the partner."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, insert

from charter import A, Charter
from charter.demo.app import create_app
from charter.demo.models import Invoice
from charter.demo.payments import PaymentProviderStub
from charter.demo.service import Settle, build_charter, payments_partner
from charter.errors import ConfigurationError, HandlerFailed, StorageUnavailable
from charter.idempotency import idempotency_table
from charter.idempotency.keys import fingerprint, fingerprint_key
from charter.integrations.webhooks import WebhookReceiver, WebhookRoute
from charter.settings import DEVELOPMENT_TOKEN_SECRET, DEVELOPMENT_WEBHOOK_SECRET, Settings
from charter.webhooks import StandardWebhookSigner, StandardWebhookVerifier

from .test_fastapi import auth, create_invoice

SIGNER = StandardWebhookSigner(DEVELOPMENT_WEBHOOK_SECRET)


@pytest.fixture
def provider() -> Iterator[PaymentProviderStub]:
    with PaymentProviderStub() as stub:
        yield stub


@pytest.fixture
def client(database_url: str, provider: PaymentProviderStub) -> Iterator[TestClient]:
    settings = Settings(
        environment="development",
        token_secrets=(DEVELOPMENT_TOKEN_SECRET,),
        audit_keys={"k1": "test-audit-key-0123456789abcdef"},
        payments_url=provider.base_url,
        webhook_secrets=(DEVELOPMENT_WEBHOOK_SECRET,),
    )
    charter = Charter(database_url=database_url, audit_keys=settings.audit_keys)
    app = create_app(settings, charter=charter)
    with TestClient(app, raise_server_exceptions=False) as c:
        c.app_state = app.state  # type: ignore[attr-defined]
        yield c


def paid_pending_invoice(client: TestClient) -> tuple[int, str]:
    invoice = create_invoice(client)
    client.post(f"/invoices/{invoice}/submit", headers=auth("alice"))
    client.post(f"/invoices/{invoice}/approve", headers=auth("bob"))
    paid = client.post(
        f"/invoices/{invoice}/pay", headers=auth("carol", **{"Idempotency-Key": "p1"})
    )
    assert 200 == paid.status_code, paid.text
    assert "payment_pending" == paid.json()["state"]
    return invoice, paid.json()["charge_id"]


def settled(
    charge_id: str, invoice: int, *, msg_id: str = "msg_1", age: int = 0, tenant: str = "acme"
) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(
        {
            "type": "payment.settled",
            "data": {"id": charge_id, "reference": f"{tenant}:{invoice}", "status": "succeeded"},
        }
    ).encode()
    return body, SIGNER.sign(msg_id, int(time.time()) - age, body)


def post(client: TestClient, body: bytes, headers: dict[str, str]):
    return client.post(
        "/webhooks/payments", content=body, headers={**headers, "Content-Type": "application/json"}
    )


def state(client: TestClient, invoice: int) -> str:
    return client.get(f"/invoices/{invoice}", headers=auth("bob")).json()["state"]


def test_the_settled_webhook_marks_the_invoice_paid_as_the_partner(client, provider):
    invoice, charge = paid_pending_invoice(client)
    response = post(client, *settled(charge, invoice))
    assert (200, "applied") == (response.status_code, response.json()["status"])
    assert ("msg_1", "paid") == (response.json()["id"], response.json()["result"]["state"])
    assert "paid" == state(client, invoice)
    entry = next(
        h
        for h in client.app_state.charter.history("invoices", invoice)
        if h["action"] == "invoice.mark_paid"
    )
    assert ("payments-provider", "webhook") == (entry["subject"], entry["channel"])
    assert 1 == provider.stats()["charges_created"]


def test_a_replayed_message_is_acknowledged_and_not_processed_again(client):
    invoice, charge = paid_pending_invoice(client)
    body, headers = settled(charge, invoice)
    assert "applied" == post(client, body, headers).json()["status"]
    again = post(client, body, headers)
    assert (200, "duplicate") == (again.status_code, again.json()["status"])
    marks = [
        h
        for h in client.app_state.charter.history("invoices", invoice)
        if h["action"] == "invoice.mark_paid"
    ]
    assert [False, True] == [m["replayed"] for m in marks]


def test_a_stale_timestamp_is_refused_even_with_a_fresh_id(client):
    invoice, charge = paid_pending_invoice(client)
    response = post(client, *settled(charge, invoice, msg_id="msg_fresh", age=600))
    assert (401, "webhook_timestamp_stale") == (response.status_code, response.json()["code"])
    assert "payment_pending" == state(client, invoice)


def test_a_forged_signature_is_refused(client):
    invoice, charge = paid_pending_invoice(client)
    body, headers = settled(charge, invoice)
    headers["webhook-signature"] = "v1,AAAA" + headers["webhook-signature"][7:]
    response = post(client, body, headers)
    assert (401, "webhook_signature_invalid") == (response.status_code, response.json()["code"])


def test_missing_headers_and_bad_bodies_are_clean_4xx(client):
    assert 400 == post(client, b"{}", {}).status_code
    body = b"not json"
    response = post(client, body, SIGNER.sign("msg_x", int(time.time()), body))
    assert (400, "webhook_malformed") == (response.status_code, response.json()["code"])


def test_a_settlement_for_another_charge_is_acknowledged_as_refused_and_changes_nothing(client):
    invoice, _ = paid_pending_invoice(client)
    response = post(client, *settled("ch_someone_else", invoice, msg_id="msg_2"))
    assert (200, "refused", "not_found") == (
        response.status_code,
        response.json()["status"],
        response.json()["refusal"]["code"],
    )
    assert "payment_pending" == state(client, invoice)


def test_a_partner_cannot_reach_another_tenants_invoice(client):
    invoice, charge = paid_pending_invoice(client)
    response = post(client, *settled(charge, invoice, msg_id="msg_3", tenant="globex"))
    assert (200, "refused", "not_found") == (
        response.status_code,
        response.json()["status"],
        response.json()["refusal"]["code"],
    )


def test_users_cannot_call_the_partner_action_over_the_api(client):
    invoice, charge = paid_pending_invoice(client)
    charter: Charter = client.app_state.charter
    from charter import Actor
    from charter.errors import Forbidden

    admin = Actor.make("carol", "acme", roles={"admin"}, scopes={"*"})
    with pytest.raises(Forbidden):
        charter.execute(admin, "invoice.mark_paid", {"charge_id": charge}, target=invoice, key="x")


def test_unknown_event_types_are_acknowledged_and_ignored(client):
    body = json.dumps({"type": "payment.refunded", "data": {}}).encode()
    response = post(client, body, SIGNER.sign("msg_9", int(time.time()), body))
    assert (200, "ignored") == (response.status_code, response.json()["status"])


def test_a_receiver_refuses_actions_without_idempotency(client):
    charter: Charter = client.app_state.charter
    charter.action("invoice.nudge", on=Invoice, idempotency="none")(lambda ctx, r, d: None)
    with pytest.raises(ConfigurationError, match=r"invoice\.nudge"):
        WebhookReceiver(
            charter,
            StandardWebhookVerifier(DEVELOPMENT_WEBHOOK_SECRET),
            partner=lambda e: None,  # type: ignore[arg-type,return-value]
            routes={"x": WebhookRoute("invoice.nudge", input=lambda e: {})},
        )


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_concurrent_deliveries_of_one_message_are_applied_once(client):
    invoice, charge = paid_pending_invoice(client)
    body, headers = settled(charge, invoice, msg_id="msg_race")
    workers = 12
    barrier = threading.Barrier(workers)

    def deliver():
        barrier.wait()
        return post(client, body, headers)

    with ThreadPoolExecutor(workers) as pool:
        responses = [f.result() for f in [pool.submit(deliver) for _ in range(workers)]]
    assert [200] * workers == [r.status_code for r in responses]
    assert 1 == sum(r.json()["status"] == "applied" for r in responses)
    assert workers - 1 == sum(r.json()["status"] == "duplicate" for r in responses)
    assert "paid" == state(client, invoice)


def test_a_signed_webhook_with_a_duplicate_member_is_a_clear_400_not_the_last_value(client):
    body = b'{"type": "payment.settled", "type": "payment.refunded", "data": {}}'
    headers = SIGNER.sign("msg_dup_1", int(time.time()), body)
    response = client.post(
        "/webhooks/payments", content=body, headers={**headers, "Content-Type": "application/json"}
    )
    assert (400, "webhook_malformed") == (response.status_code, response.json()["code"])
    assert "twice" in response.json()["detail"]


# -- what the answer tells the sender: retry, or stop --------------------------------------


def marks(client: TestClient, invoice: int) -> list[tuple[str, str, bool]]:
    return [
        (h["decision"], h["outcome"], h["replayed"])
        for h in client.app_state.charter.history("invoices", invoice)
        if h["action"] == "invoice.mark_paid"
    ]


def test_a_delivery_lacking_a_field_the_route_needs_is_a_400_and_runs_nothing(client):
    invoice, charge = paid_pending_invoice(client)
    body = json.dumps({"type": "payment.settled", "data": {"id": charge}}).encode()
    response = post(client, body, SIGNER.sign("msg_nofield", int(time.time()), body))
    assert (400, "webhook_malformed") == (response.status_code, response.json()["code"])
    assert [] == marks(client, invoice)


def test_a_key_still_in_progress_asks_the_sender_to_retry_and_the_retry_is_applied(client):
    invoice, charge = paid_pending_invoice(client)
    charter: Charter = client.app_state.charter
    scope = {"tenant": "acme", "subject": "payments-provider", "key": "webhook:msg_busy"}
    now = datetime.now(UTC)
    with charter.engine.begin() as conn:  # another worker holds the message id
        conn.execute(
            insert(idempotency_table).values(
                **scope,
                fingerprint=fingerprint(
                    "invoice.mark_paid",
                    str(invoice),
                    Settle(charge_id=charge),
                    key=fingerprint_key(charter.keyring),
                ),
                action="invoice.mark_paid",
                phase=0,
                created_at=now,
                expires_at=now + timedelta(hours=1),
            )
        )
    busy = post(client, *settled(charge, invoice, msg_id="msg_busy"))
    assert (503, "webhook_retry_later", "1") == (
        busy.status_code,
        busy.json()["code"],
        busy.headers["retry-after"],
    )
    assert "idempotency_key_in_progress" == busy.json()["cause"]
    with charter.engine.begin() as conn:  # the holder rolled back
        conn.execute(delete(idempotency_table).filter_by(**scope))
    assert "applied" == post(client, *settled(charge, invoice, msg_id="msg_busy")).json()["status"]


def test_an_unreachable_database_is_a_503_with_retry_after_and_nothing_is_remembered():
    down = build_charter(
        Charter(database_url="postgresql+psycopg://postgres@127.0.0.1:1/none", development=True)
    )
    receiver = WebhookReceiver(
        down,
        StandardWebhookVerifier(DEVELOPMENT_WEBHOOK_SECRET),
        partner=lambda event: payments_partner("acme"),
        routes={
            "payment.settled": WebhookRoute(
                "invoice.mark_paid", input=lambda e: {"charge_id": "ch_1"}, target=lambda e: 1
            )
        },
    )
    body, headers = settled("ch_1", 1, msg_id="msg_down")
    try:
        with pytest.raises(StorageUnavailable) as info:
            receiver.handle(headers, body)
    finally:
        down.engine.dispose()
    assert (503, "1", True) == (
        info.value.status,
        info.value.headers["Retry-After"],
        info.value.transient,
    )


def test_a_crashing_handler_is_a_500_and_not_remembered_so_the_retry_runs(client):
    invoice, charge = paid_pending_invoice(client)
    charter: Charter = client.app_state.charter
    crashes = [RuntimeError("the handler's bug")]

    @charter.action(
        "invoice.flaky_settle",
        on=Invoice,
        input=Settle,
        allow=A.has_role("payments"),
        scope="invoices:settle",
        idempotency="required",
    )
    def flaky(ctx, invoice_, data):
        if crashes:
            raise crashes.pop()
        # Not the state: on a resource with a workflow only a transition writes it.
        invoice_.paid_at = ctx.now
        return invoice_

    receiver = WebhookReceiver(
        charter,
        StandardWebhookVerifier(DEVELOPMENT_WEBHOOK_SECRET),
        partner=lambda event: payments_partner("acme"),
        routes={
            "payment.settled": WebhookRoute(
                "invoice.flaky_settle",
                input=lambda e: {"charge_id": e["data"]["id"]},
                target=lambda e: invoice,
            )
        },
    )
    body, headers = settled(charge, invoice, msg_id="msg_flaky")
    with pytest.raises(HandlerFailed) as info:
        receiver.handle(headers, body)
    assert (500, False, False) == (
        info.value.status,
        info.value.transient,
        info.value.permanent,
    )
    assert "applied" == receiver.handle(headers, body).status
    with charter.session() as session:
        assert session.get(Invoice, invoice).paid_at is not None


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_concurrent_deliveries_of_a_refused_message_are_refused_once_then_duplicates(client):
    invoice, _ = paid_pending_invoice(client)
    body, headers = settled("ch_not_ours", invoice, msg_id="msg_refused_race")
    workers = 12
    barrier = threading.Barrier(workers)

    def deliver():
        barrier.wait()
        return post(client, body, headers)

    with ThreadPoolExecutor(workers) as pool:
        responses = [f.result() for f in [pool.submit(deliver) for _ in range(workers)]]
    assert [200] * workers == [r.status_code for r in responses]
    statuses = sorted(r.json()["status"] for r in responses)
    assert ["duplicate"] * (workers - 1) + ["refused"] == statuses
    assert {"not_found"} == {r.json()["refusal"]["code"] for r in responses}
    assert "payment_pending" == state(client, invoice)


def test_a_malformed_event_is_told_what_is_wrong_without_pythons_exception_text(client):
    body = b'{"type": "payment.settled", "data": 5}'
    response = post(client, body, SIGNER.sign("msg_data_5", int(time.time()), body))
    assert (400, "webhook_malformed") == (response.status_code, response.json()["code"])
    detail = response.json()["detail"]
    assert "payment.settled" in detail
    assert "subscriptable" not in detail  # was Python's TypeError text
