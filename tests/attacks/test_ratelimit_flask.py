"""Issue 10 on Flask: requests without an accepted credential are limited per client address.

The FastAPI adapter's ASGI middleware has a Flask twin: the same rule
(:class:`charter.integrations.ratelimit.AddressLimit`) in CharterFlask's
request hooks, before any authentication work. Before it, a flood of missing or
forged tokens against the Flask reference service was answered 401 after 401,
each forged token verified, without end. Over the in-process store and Redis.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from flask import Flask, Request
from flask.testing import FlaskClient
from sqlalchemy import select

from charter import Actor, Charter
from charter.audit.entry import audit_table
from charter.demo.flask_app import create_app
from charter.demo.flask_app import routes as demo_routes
from charter.demo.service import build_charter, directory
from charter.integrations.flask import CharterFlask
from charter.ratelimit import RateLimiter
from charter.tokens import TokenSigner
from tests.attacks.test_ratelimit import CLASSES, START, Clock, store  # noqa: F401 - fixture
from tests.integrations.test_fastapi import SETTINGS, auth

HOME, ELSEWHERE = "203.0.113.7", "198.51.100.9"
Service = Callable[..., tuple[Callable[..., FlaskClient], Clock, Charter]]


@pytest.fixture
def service(database_url: str, store: str, disposing: Any) -> Service:  # noqa: F811 - fixture
    def start(**extension: Any) -> tuple[Callable[..., FlaskClient], Clock, Charter]:
        clock = Clock()
        charter = disposing(
            Charter(
                database_url=database_url, audit_keys=SETTINGS.audit_keys, clock=clock,
                rate_limits=RateLimiter(store, classes=CLASSES),
            )
        )  # fmt: skip
        if extension:
            app = Flask("limited")
            demo_routes(CharterFlask(**extension)).init_app(app, charter=build_charter(charter))
        else:
            app = create_app(SETTINGS, charter=charter)

        def client(address: str = HOME) -> FlaskClient:
            test_client = app.test_client()
            test_client.environ_base["REMOTE_ADDR"] = address  # the WSGI peer
            return test_client

        return client, clock, charter

    return start


def test_requests_without_a_credential_are_limited_per_address_before_authentication(service):
    client, clock, _ = service()
    home = client()
    assert [401, 401, 401, 429] == [home.get("/invoices").status_code for _ in range(4)]
    # The address has used its allowance: even a valid token is refused before it is checked.
    refused = home.get("/invoices", headers=auth("alice"))
    assert (429, "rate_limited", '"anonymous";q=3;w=60') == (
        refused.status_code, refused.get_json()["code"], refused.headers["RateLimit-Policy"],
    )  # fmt: skip
    assert "Retry-After" in refused.headers
    assert refused.headers["X-Request-ID"]
    assert 200 == client(ELSEWHERE).get("/invoices", headers=auth("alice")).status_code
    clock.now = START + timedelta(seconds=45)  # the next window
    assert 200 == home.get("/invoices", headers=auth("alice")).status_code


def test_forged_tokens_count_against_the_address_and_stop_being_verified(service):
    verified: list[str] = []
    signer = TokenSigner(SETTINGS.token_secrets)

    def authenticate(request: Request) -> Actor:
        verified.append(request.headers.get("Authorization", ""))
        return signer.authenticate(request.headers.get("Authorization"), directory)

    client, _, _ = service(authenticate=authenticate)
    home = client()
    forged = {"Authorization": "Bearer not-a-token"}
    answers = [home.get("/invoices", headers=forged).status_code for _ in range(5)]
    assert [401, 401, 401, 429, 429] == answers
    assert 3 == len(verified)  # the last two were never verified
    assert 200 == client(ELSEWHERE).get("/invoices", headers=auth("alice")).status_code


def test_authenticated_users_behind_the_address_are_not_counted_against_it(service):
    client, _, _ = service()
    home = client()
    assert [200] * 5 == [home.get("/invoices", headers=auth("bob")).status_code for _ in range(5)]
    assert [401, 401, 401, 429] == [home.get("/invoices").status_code for _ in range(4)]


def test_the_first_refusal_of_an_address_is_audited_without_a_credential(service):
    client, _, charter = service()
    home = client()
    for _ in range(6):
        home.get("/invoices")
    with charter.engine.connect() as conn:
        rows = list(
            conn.execute(select(audit_table).where(audit_table.c.outcome == "rate_limited"))
        )
    assert [("http.unauthenticated", f"address:{HOME}", "anonymous")] == [
        (r.action, r.subject, r.detail["rate_class"]) for r in rows
    ]  # one entry for the window's first denial; the rest are summed when it closes


def test_behind_a_proxy_the_address_is_the_one_the_proxy_names(service):
    def forwarded(request: Request) -> str:
        return request.headers.get("X-Forwarded-For", "unknown").split(",")[0].strip()

    signer = TokenSigner(SETTINGS.token_secrets)
    client, _, _ = service(
        authenticate=lambda r: signer.authenticate(r.headers.get("Authorization"), directory),
        client_address=forwarded,
    )
    proxy = client("10.0.0.1")  # every request comes from the proxy's own address
    one = {"X-Forwarded-For": "192.0.2.1"}
    assert [401, 401, 401, 429] == [proxy.get("/invoices", headers=one).status_code for _ in "abcd"]
    assert 401 == proxy.get("/invoices", headers={"X-Forwarded-For": "192.0.2.2"}).status_code


def test_without_rate_limits_there_is_no_address_limit(database_url, disposing):
    charter = disposing(
        Charter(database_url=database_url, audit_keys=SETTINGS.audit_keys, rate_limits=None)
    )
    home = create_app(SETTINGS, charter=charter).test_client()
    assert {401} == {
        home.get("/invoices").status_code for _ in range(130)
    }  # past the default 120/minute


def test_a_credential_no_route_accepted_counts_like_none(service):
    """Only 401s were counted: a junk ``Authorization`` on a path no route reads was free."""
    client, _, _ = service()
    home, junk = client(), {"Authorization": "x"}
    answers = [home.get("/no-such-path", headers=junk).status_code for _ in range(4)]
    assert [404, 404, 404, 429] == answers
