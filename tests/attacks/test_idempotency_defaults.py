"""Issue 9 §4, attacked over HTTP: Idempotency-Key as the draft defines it.

Before the fix an action declared without ``idempotency=`` ignored the key (a
retry ran twice), a key sent to an action that takes none was silently
dropped, and a replay answered without the original ``ETag`` and
``Location``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from charter import Charter, IdempotencyMode

from . import giftcards
from .giftcards import token
from .test_defaults import as_user, issue_card, reference  # noqa: F401 - the fixture


@pytest.fixture
def cards(database_url: str) -> Iterator[tuple[Charter, TestClient]]:
    with giftcards.running(database_url) as running:
        yield running


def test_a_mutating_action_takes_a_key_by_default_and_a_retry_runs_once(cards):
    charter, client = cards
    assert IdempotencyMode.OPTIONAL is charter.spec("card.redeem").idempotency
    assert IdempotencyMode.NONE is charter.spec("card.read").idempotency  # a read: no key
    card = issue_card(client)
    headers = {**token("olga", ["cards:*"]), "Idempotency-Key": "redeem-1"}
    first = client.post(f"/cards/{card}/redeem", json={"amount": "30"}, headers=headers)
    retry = client.post(f"/cards/{card}/redeem", json={"amount": "30"}, headers=headers)
    assert (200, 200) == (first.status_code, retry.status_code)
    assert first.json() == retry.json() == {"id": card, "balance": 70}
    assert "true" == retry.headers["idempotent-replayed"]
    read = client.get(f"/cards/{card}", headers=token("olga", ["cards:*"]))
    assert 70 == read.json()["balance"]


def test_a_key_sent_to_an_action_that_takes_none_is_refused(cards, reference):  # noqa: F811
    _, client = cards
    card = issue_card(client)
    headers = {**token("olga", ["cards:*"]), "Idempotency-Key": "read-1"}
    response = client.get(f"/cards/{card}", headers=headers)
    assert (400, "idempotency_key_unsupported") == (response.status_code, response.json()["code"])
    invoice = reference.get("/invoices/1", headers={**as_user("alice"), "Idempotency-Key": "x"})
    assert (400, "idempotency_key_unsupported") == (invoice.status_code, invoice.json()["code"])


def test_none_must_be_declared_and_is_then_kept(database_url, disposing):
    charter = disposing(giftcards.build(Charter(database_url=database_url,
                                                audit_keys=giftcards.AUDIT_KEYS)))  # fmt: skip
    charter.action("card.touch", on=giftcards.Card, idempotency="none")(lambda c, r, d: None)
    assert IdempotencyMode.NONE is charter.spec("card.touch").idempotency


def test_a_201_carries_location_and_a_replay_answers_the_same_location_and_etag(cards):
    _, client = cards
    headers = {**token("clerk", ["cards:write"]), "Idempotency-Key": "issue-1"}
    first = client.post("/cards", json={"owner": "olga", "balance": 5}, headers=headers)
    assert 201 == first.status_code
    assert f"/cards/{first.json()['id']}" == first.headers["location"]
    assert '"1"' == first.headers["etag"]
    again = client.post("/cards", json={"owner": "olga", "balance": 5}, headers=headers)
    assert (201, "true") == (again.status_code, again.headers["idempotent-replayed"])
    assert (first.headers["location"], first.headers["etag"]) == (
        again.headers["location"], again.headers["etag"],
    )  # fmt: skip


def test_a_replay_of_a_change_answers_the_original_etag(cards, disposing):
    charter, client = cards
    card = issue_card(client)
    headers = {**token("olga", ["cards:*"]), "Idempotency-Key": "r-2"}
    first = client.post(f"/cards/{card}/redeem", json={"amount": "1"}, headers=headers)
    client.post(f"/cards/{card}/redeem", json={"amount": "1"}, headers=token("olga", ["*"]))
    assert '"2"' == first.headers["etag"]
    # A second worker (cold cache) answers from the database, with the same ETag.
    url = charter.engine.url.render_as_string(hide_password=False)
    cold = disposing(giftcards.build(Charter(database_url=url, audit_keys=giftcards.AUDIT_KEYS)))
    with TestClient(giftcards.create_app(cold)) as other:
        again = other.post(f"/cards/{card}/redeem", json={"amount": "1"}, headers=headers)
    assert (200, '"2"', {"id": card, "balance": 99}) == (
        again.status_code, again.headers["etag"], again.json(),
    )  # fmt: skip
