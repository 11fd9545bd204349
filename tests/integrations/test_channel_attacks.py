"""Channel attacks: webhook ids that collided in their key, and repeated query parameters."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from charter import Charter
from charter.demo.app import create_app as create_fastapi
from charter.demo.flask_app import create_app as create_flask
from charter.demo.payments import PaymentProviderStub
from charter.errors import InvalidPage
from charter.idempotency.keys import MAX_KEY_LENGTH, validate_key
from charter.integrations import webhooks as webhook_channel
from charter.integrations.http import query_parameters
from charter.integrations.webhooks import webhook_key
from charter.settings import DEVELOPMENT_TOKEN_SECRET, DEVELOPMENT_WEBHOOK_SECRET, Settings

from .test_fastapi import SETTINGS, auth, create_invoice
from .test_webhook_channel import post, settled, state

# -- webhook message ids: one key per id ------------------------------------------------------

PREFIX = "msg_" + "x" * 243  # 247 characters: what the old cut key kept of an id


@pytest.fixture
def client(database_url: str) -> Iterator[TestClient]:
    """The reference service (FastAPI) with its payment provider, as test_webhook_channel's."""
    with PaymentProviderStub() as provider:
        settings = Settings(
            environment="development",
            token_secrets=(DEVELOPMENT_TOKEN_SECRET,),
            audit_keys=SETTINGS.audit_keys,
            payments_url=provider.base_url,
            webhook_secrets=(DEVELOPMENT_WEBHOOK_SECRET,),
        )
        charter = Charter(database_url=database_url, audit_keys=settings.audit_keys)
        app = create_fastapi(settings, charter=charter)
        with TestClient(app, raise_server_exceptions=False) as c:
            c.app_state = app.state  # type: ignore[attr-defined]
            yield c
        charter.engine.dispose()


def paid_pending_invoice(client: TestClient) -> tuple[int, str]:
    """An invoice charged at the provider, waiting for its settlement webhook."""
    invoice = create_invoice(client)
    client.post(f"/invoices/{invoice}/submit", headers=auth("alice"))
    client.post(f"/invoices/{invoice}/approve", headers=auth("bob"))
    key = {"Idempotency-Key": f"pay-{invoice}"}
    paid = client.post(f"/invoices/{invoice}/pay", headers=auth("carol", **key))
    assert (200, "payment_pending") == (paid.status_code, paid.json()["state"]), paid.text
    return invoice, paid.json()["charge_id"]


def mark_paid_entries(client: TestClient, invoice: int) -> list[bool]:
    return [
        h["replayed"]
        for h in client.app_state.charter.history("invoices", invoice)
        if h["action"] == "invoice.mark_paid"
    ]


def test_two_long_message_ids_sharing_their_first_247_characters_are_two_messages(client):
    first, first_charge = paid_pending_invoice(client)
    second, second_charge = paid_pending_invoice(client)
    id_a, id_b = PREFIX + "_event_A", PREFIX + "_event_B"  # 255 characters each, distinct
    a = post(client, *settled(first_charge, first, msg_id=id_a))
    b = post(client, *settled(second_charge, second, msg_id=id_b))
    assert (200, "applied") == (a.status_code, a.json()["status"]), a.text
    assert (200, "applied") == (b.status_code, b.json()["status"]), b.text
    assert ("paid", "paid") == (state(client, first), state(client, second))


def test_a_long_message_id_delivered_again_is_a_duplicate(client):
    invoice, charge = paid_pending_invoice(client)
    body, headers = settled(charge, invoice, msg_id=PREFIX + "y" * 9)  # 256: the longest
    assert "applied" == post(client, body, headers).json()["status"]
    again = post(client, body, headers)
    assert (200, "duplicate") == (again.status_code, again.json()["status"])
    assert [False, True] == mark_paid_entries(client, invoice)


def test_the_key_of_a_message_id_is_injective_and_unchanged_for_ids_that_fit():
    assert "webhook:msg_1" == webhook_key("msg_1")
    fits = "m" * (MAX_KEY_LENGTH - len("webhook:"))  # 247: the longest id kept as it is
    assert "webhook:" + fits == webhook_key(fits)
    long_ids = [fits + "a", fits + "b", fits + "ab", PREFIX + "z" * 9]
    keys = [webhook_key(i) for i in [fits, *long_ids]]
    assert len(set(keys)) == len(keys)
    for message_id in long_ids:
        key = webhook_key(message_id)
        assert key.startswith("webhook-sha256:")
        assert len(key) <= MAX_KEY_LENGTH
        assert key == validate_key(key)  # a key the gate accepts
    # An id that spells a digest key still gets the plain form: the forms cannot meet.
    spelled = webhook_key(long_ids[0]).removeprefix("webhook")
    assert webhook_key(spelled) != webhook_key(long_ids[0])


def test_a_delivery_stored_under_the_old_cut_key_is_replayed_not_run_again(client, monkeypatch):
    """An upgrade within retention: the id's old (cut) key still answers its redelivery."""
    invoice, charge = paid_pending_invoice(client)
    other, other_charge = paid_pending_invoice(client)
    old_id, new_id = PREFIX + "_event_A", PREFIX + "_event_B"
    body, headers = settled(charge, invoice, msg_id=old_id)
    with monkeypatch.context() as before_the_upgrade:
        before_the_upgrade.setattr(
            webhook_channel, "webhook_key", lambda message_id: f"webhook:{message_id}"[:255]
        )
        assert "applied" == post(client, body, headers).json()["status"]
    again = post(client, body, headers)
    assert (200, "duplicate") == (again.status_code, again.json()["status"]), again.text
    assert [False, True] == mark_paid_entries(client, invoice)
    # Another message whose id shares the cut key's characters is not that message.
    fresh = post(client, *settled(other_charge, other, msg_id=new_id))
    assert (200, "applied") == (fresh.status_code, fresh.json()["status"]), fresh.text
    assert ("paid", "paid") == (state(client, invoice), state(client, other))


# -- a repeated query parameter: one answer on both adapters ------------------------------------


class Answer:
    def __init__(self, status: int, body: Any) -> None:
        self.status, self.body = status, body


Call = Callable[..., Answer]


@pytest.fixture(params=["fastapi", "flask"])
def call(request: pytest.FixtureRequest, database_url: str, disposing: Any) -> Iterator[Call]:
    """Either reference service (accepting X-On-Behalf-Of claims), on the same database."""
    charter = disposing(Charter(database_url=database_url, audit_keys=SETTINGS.audit_keys))
    if request.param == "fastapi":
        app = create_fastapi(SETTINGS, charter=charter, impersonation_claims=True)
        with TestClient(app) as fastapi_client:

            def fastapi_call(method: str, path: str, **kw: Any) -> Answer:
                r = fastapi_client.request(method, path, **kw)
                is_json = "json" in r.headers.get("content-type", "")
                return Answer(r.status_code, r.json() if is_json else r.text)

            yield fastapi_call
    else:
        app = create_flask(SETTINGS, charter=charter, impersonation_claims=True)
        flask_client = app.test_client()

        def flask_call(method: str, path: str, **kw: Any) -> Answer:
            r = flask_client.open(path, method=method, **kw)
            return Answer(r.status_code, r.get_json(silent=True))

        yield flask_call


def invoices(call: Call) -> list[int]:
    ids = []
    for customer in ("A", "B", "C"):
        answer = call(
            "POST",
            "/invoices",
            json={"customer": customer, "amount": "10.00"},
            headers=auth("alice"),
        )
        assert 201 == answer.status, answer.body
        ids.append(int(answer.body["id"]))
    assert 200 == call("POST", f"/invoices/{ids[1]}/submit", headers=auth("alice")).status
    return ids


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("filter.state=draft&filter.state=submitted", "filter.state"),
        ("limit=1&limit=3", "limit"),
        ("sort=id&sort=-id", "sort"),
        ("sort=id&after=x&after=y", "after"),
    ],
)
def test_a_repeated_list_parameter_is_refused_alike_on_both_adapters(call, query, parameter):
    invoices(call)
    answer = call("GET", f"/invoices?{query}", headers=auth("alice"))
    assert (400, "invalid_page", parameter, "repeated") == (
        answer.status,
        answer.body["code"],
        answer.body["parameter"],
        answer.body["reason"],
    ), answer.body


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("format=csv&format=jsonl", "format"),
        ("filter.state=draft&filter.state=submitted", "filter.state"),
        ("sort=id&sort=-id", "sort"),
    ],
)
def test_a_repeated_export_parameter_is_refused_alike_on_both_adapters(call, query, parameter):
    invoices(call)
    answer = call("GET", f"/invoices/export?{query}", headers=auth("alice"))
    assert (400, "invalid_page", parameter) == (
        answer.status,
        answer.body["code"],
        answer.body["parameter"],
    ), answer.body


def test_single_parameters_still_answer_alike(call):
    ids = invoices(call)
    drafts = call("GET", "/invoices?filter.state=draft&sort=-id&limit=5", headers=auth("alice"))
    assert (200, [ids[2], ids[0]]) == (drafts.status, [i["id"] for i in drafts.body["items"]])


@pytest.mark.parametrize("path", ["/invoices", "/invoices/export"])
def test_a_list_or_export_on_someones_behalf_passes_the_reason_header(call, path):
    """The gate asks a reason of a list or export on someone's behalf: both adapters send it."""
    invoices(call)
    for_alice = {"X-On-Behalf-Of": "alice"}
    unreasoned = call("GET", path, headers=auth("sam", **for_alice))
    assert (400, "reason_required") == (unreasoned.status, unreasoned.body["code"])
    reasoned = call("GET", path, headers=auth("sam", **for_alice, **{"X-Charter-Reason": "t 6"}))
    assert 200 == reasoned.status, reasoned.body


def test_query_parameters_reads_each_name_once():
    assert {"a": "1", "b": ""} == query_parameters([("a", "1"), ("b", "")])
    with pytest.raises(InvalidPage) as refused:
        query_parameters([("sort", "id"), ("limit", "2"), ("sort", "id")])
    assert ("invalid_page", 400, "sort") == (
        refused.value.code,
        refused.value.status,
        refused.value.attrs["parameter"],
    )
