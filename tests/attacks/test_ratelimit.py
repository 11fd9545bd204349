"""Issue 10, rate limits, attacked over HTTP against the reference service.

Each test names the hole it closes. On the code before rate limits each of
them fails: a flood of writes, of payments, of list pages or of forged tokens
was answered one by one, with no 429 and no ``RateLimit`` fields; a flood of
denials would have left one audit entry per request.

The reference service runs here with small classes (a few calls a minute) on
an injected clock, so a window fills in a handful of requests and closes when
the test says; the suite runs over the in-process store and over Redis
(``CHARTER_REDIS_URL``, required under CI).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select

from charter import Charter
from charter.audit.entry import audit_table
from charter.demo.app import create_app
from charter.ratelimit import FAIL_OPEN, SUMMARY, RateClass, RateLimiter
from tests.conftest import REDIS_URL, require_redis
from tests.integrations.test_fastapi import SETTINGS, auth

START = datetime(2026, 1, 1, 12, 0, 15, tzinfo=UTC)  # 15 s into a minute
CLASSES = [
    RateClass("write", "4/minute"),
    RateClass("read", "6/minute"),
    RateClass("financial", "2/minute", fail="closed"),
    RateClass("anonymous", "3/minute"),
]
PROBLEM = "application/problem+json"


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    url = require_redis()
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.flushdb()  # only this suite's database number
    finally:
        client.close()
    return url


@pytest.fixture
def service(database_url: str, store: str) -> Iterator[Callable[..., tuple[TestClient, Clock]]]:
    opened: list[Any] = []

    def start(storage: str | None = None, client: tuple[str, int] = ("203.0.113.7", 5000)) -> Any:
        clock = Clock()
        limiter = RateLimiter(storage or store, classes=CLASSES)
        charter = Charter(
            database_url=database_url, audit_keys=SETTINGS.audit_keys, clock=clock,
            rate_limits=limiter,
        )  # fmt: skip
        app = create_app(SETTINGS, charter=charter)
        test_client = TestClient(app, raise_server_exceptions=False, client=client)
        test_client.__enter__()
        test_client.charter = charter  # type: ignore[attr-defined]
        opened.append(test_client)
        return test_client, clock

    yield start
    for client in opened:
        client.__exit__(None, None, None)


def create(client: TestClient, user: str = "alice") -> Any:
    return client.post(
        "/invoices", json={"customer": "ACME", "amount": "10.00"}, headers=auth(user)
    )


def outcomes(client: TestClient, outcome: str) -> list[Any]:
    with client.charter.engine.connect() as conn:  # type: ignore[attr-defined]
        return list(conn.execute(select(audit_table).where(audit_table.c.outcome == outcome)))


def test_a_flood_of_writes_gets_429_with_retry_after_and_the_ratelimit_fields(service):
    client, _ = service()
    answers = [create(client) for _ in range(5)]
    assert [201, 201, 201, 201, 429] == [a.status_code for a in answers]
    assert ['"write";r=3;t=45', '"write";r=0;t=45'] == [
        answers[0].headers["ratelimit"],
        answers[3].headers["ratelimit"],
    ]
    assert '"write";q=4;w=60' == answers[0].headers["ratelimit-policy"]
    refused = answers[4]
    assert (PROBLEM, "rate_limited") == (refused.headers["content-type"], refused.json()["code"])
    assert ("45", '"write";q=4;w=60', '"write";r=0;t=45') == (
        refused.headers["retry-after"],
        refused.headers["ratelimit-policy"],
        refused.headers["ratelimit"],
    )
    assert not any(h.lower().startswith("x-ratelimit") for h in refused.headers)
    assert 201 == create(client, "bob").status_code  # another actor has his own count


def test_payments_are_limited_more_strictly_than_other_writes(service):
    client, _ = service()
    invoice = create(client, "carol").json()["id"]
    pays = [
        client.post(
            f"/invoices/{invoice}/pay", headers=auth("carol", **{"Idempotency-Key": f"k{i}"})
        )
        for i in range(3)
    ]
    assert 429 == pays[2].status_code  # the financial class allows 2 a minute
    assert '"financial";q=2;w=60' == pays[2].headers["ratelimit-policy"]
    assert 201 == create(client, "carol").status_code  # while writes still pass


def test_a_flood_of_list_pages_is_limited_like_reads(service):
    client, _ = service()
    pages = [client.get("/invoices", headers=auth("alice")).status_code for _ in range(7)]
    assert [200] * 6 + [429] == pages


def test_requests_without_a_credential_are_limited_per_address_before_authentication(service):
    client, clock = service()
    answers = [client.get("/invoices").status_code for _ in range(4)]
    assert [401, 401, 401, 429] == answers
    # The address has used its allowance: even a valid token is refused before it is checked.
    refused = client.get("/invoices", headers=auth("alice"))
    assert (429, "rate_limited") == (refused.status_code, refused.json()["code"])
    assert '"anonymous";q=3;w=60' == refused.headers["ratelimit-policy"]
    other, _ = service(client=("198.51.100.9", 5000))  # another address is not affected
    assert 200 == other.get("/invoices", headers=auth("alice")).status_code
    clock.now = START + timedelta(seconds=45)  # the next window
    assert 200 == client.get("/invoices", headers=auth("alice")).status_code


def test_an_ipv6_client_is_counted_by_its_64_whichever_address_it_sends_from(service):
    """A subscriber is given a whole /64: a new address per request must not be a new count.
    An IPv4-mapped address (a dual-stack socket's form) counts as its IPv4 address."""
    first, _ = service(client=("2001:db8:7:1::1", 5000))

    def anonymous(host: str) -> int:
        peer = TestClient(first.app, raise_server_exceptions=False, client=(host, 5000))
        return peer.get("/invoices").status_code

    hosts = ["2001:db8:7:1::2", "2001:db8:7:1:ffff::3", "2001:db8:7:1:1:2:3:4"]
    assert [401, 401, 401, 429] == [first.get("/invoices").status_code] + [
        anonymous(h) for h in hosts
    ]
    assert 401 == anonymous("2001:db8:7:2::1")  # the next /64 is another client
    assert [401, 401, 401, 429] == [
        anonymous(h) for h in ("192.0.2.44", "::ffff:192.0.2.44", "192.0.2.44", "::ffff:c000:22c")
    ]


def test_forged_tokens_count_against_the_address_and_stop_being_verified(service):
    client, _ = service()
    forged = {"Authorization": "Bearer not-a-token"}
    answers = [client.get("/invoices", headers=forged).status_code for _ in range(5)]
    assert [401, 401, 401, 429, 429] == answers
    assert (
        200
        == service(client=("198.51.100.10", 1))[0]
        .get("/invoices", headers=auth("alice"))
        .status_code
    )


def test_a_credential_no_route_accepted_counts_like_none(service):
    """Only 401s were counted: a junk ``Authorization`` sent to a route that never reads it
    (the health check, the OpenAPI document, an unknown path) was never counted, so such a
    flood was answered without end. A credential now counts unless it was accepted."""
    client, _ = service()
    junk = {"Authorization": "x"}
    paths = ("/healthz", "/openapi.json", "/no-such-path")
    assert [200, 200, 404] == [client.get(p, headers=junk).status_code for p in paths]
    refused = client.get("/healthz", headers=junk)
    assert (429, "rate_limited") == (refused.status_code, refused.json()["code"])
    # Users whose credential the route accepted are not counted against their address.
    other, _ = service(client=("198.51.100.11", 1))
    assert [200] * 5 == [other.get("/invoices", headers=auth("bob")).status_code for _ in range(5)]
    assert [401, 401, 401, 429] == [other.get("/invoices").status_code for _ in range(4)]


def test_a_webhook_counts_against_its_address_unless_its_signature_verified(database_url, store):
    """A malformed or unsigned delivery (400, 401) counts; a verified one does not."""
    from charter.settings import DEVELOPMENT_WEBHOOK_SECRET
    from tests.attacks.test_webhook_ack import SIGNER

    settings = dataclasses.replace(SETTINGS, webhook_secrets=(DEVELOPMENT_WEBHOOK_SECRET,))
    charter = Charter(
        database_url=database_url, audit_keys=SETTINGS.audit_keys, clock=Clock(),
        rate_limits=RateLimiter(store, classes=CLASSES),
    )  # fmt: skip
    body = b'{"type": "customer.created", "data": {}}'  # an event nobody subscribed to
    with TestClient(create_app(settings, charter=charter), raise_server_exceptions=False) as http:

        def post(headers: dict[str, str]) -> int:
            return http.post("/webhooks/payments", content=body, headers=headers).status_code

        signed = [SIGNER.sign(f"msg_{i}", int(time.time()), body) for i in range(4)]
        assert [200] * 4 == [post(headers) for headers in signed]  # verified: not counted
        malformed = {"webhook-signature": "v1,AAAA", "webhook-id": "m", "webhook-timestamp": "x"}
        assert [400, 400, 400, 429] == [post(malformed) for _ in range(4)]


def test_a_flood_of_denials_leaves_two_audit_entries_not_one_per_request(service):
    client, clock = service()
    answers = [create(client).status_code for _ in range(40)]
    assert (4, 36) == (answers.count(201), answers.count(429))
    (first,) = outcomes(client, "rate_limited")
    assert ("alice", "invoice.create", "write") == (
        first.subject,
        first.action,
        first.detail["rate_class"],
    )
    assert [] == outcomes(client, SUMMARY)  # the window is still open
    clock.now = START + timedelta(seconds=46)
    client.charter.rate_limiter.denials.flush()  # type: ignore[attr-defined]  (the thread's job)
    (summary,) = outcomes(client, SUMMARY)
    assert 35 == summary.detail["denied"]


DOWN = "redis://127.0.0.1:1/0"  # nothing listens on port 1


def test_redis_unreachable_payments_fail_closed_with_503_and_retry_after(service):
    client, _ = service(DOWN)
    invoice = create(client, "carol")
    assert 201 == invoice.status_code  # writes fail open
    paid = client.post(
        f"/invoices/{invoice.json()['id']}/pay", headers=auth("carol", **{"Idempotency-Key": "k"})
    )
    assert (503, "rate_limit_unavailable") == (paid.status_code, paid.json()["code"])
    assert "retry-after" in paid.headers


def test_redis_unreachable_reads_fail_open_counted_here_with_one_audited_warning(service):
    client, _ = service(DOWN)
    answers = [client.get("/invoices", headers=auth("alice")).status_code for _ in range(7)]
    assert [200] * 6 + [429] == answers  # still limited, by this process
    (warning,) = outcomes(client, FAIL_OPEN)
    assert "charter.rate_limit" == warning.action


def test_behind_a_proxy_the_address_is_the_one_the_proxy_names(database_url, store):
    from fastapi import FastAPI

    from charter.errors import Unauthenticated
    from charter.integrations.fastapi import CharterRoutes

    def forwarded(scope: Any) -> str:
        headers = dict(scope["headers"])
        return headers.get(b"x-forwarded-for", b"unknown").decode("latin-1").split(",")[0]

    def refuse(request: Any) -> Any:
        raise Unauthenticated("no credential")

    charter = Charter(
        database_url=database_url, audit_keys=SETTINGS.audit_keys, clock=Clock(),
        rate_limits=RateLimiter(store, classes=CLASSES),
    )  # fmt: skip
    app = FastAPI()
    CharterRoutes(app, charter, authenticate=refuse, client_address=forwarded)
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            one = {"X-Forwarded-For": "192.0.2.1"}
            seen = [client.get("/anything", headers=one).status_code for _ in range(4)]
            assert [404, 404, 404, 429] == seen  # one client, behind the proxy's single peer
            other = client.get("/anything", headers={"X-Forwarded-For": "192.0.2.2"})
            assert 404 == other.status_code  # another client, counted apart
    finally:
        charter.close()


def test_a_flood_of_exports_does_not_ride_on_the_read_limit(service):
    client, _ = service()
    exports = [client.get("/invoices/export", headers=auth("alice")) for _ in range(11)]
    assert [200] * 10 + [429] == [e.status_code for e in exports]  # export: 10 a minute
    assert (
        '"export";q=10;w=60, "export-concurrency";q=2;qu="concurrent-requests"'
        == (exports[0].headers["ratelimit-policy"])
    )
    assert '"export";q=10;w=60' == exports[10].headers["ratelimit-policy"]
    assert 200 == client.get("/invoices", headers=auth("alice")).status_code  # reads still pass
