"""Issue 9, section 6: HTTP conformance of the reference service.

401 challenges (RFC 9110 section 11.6.1, RFC 6750 section 3), 405 ``Allow``
(RFC 9110 section 15.5.6), problem ``type`` URIs the project may use (RFC 9457
section 4.2.1), and field values with NUL, CR or LF (RFC 9110 section 5.5).
"""

from __future__ import annotations

from http import HTTPStatus

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from charter import Charter
from charter.errors import CharterError, NotFound
from charter.integrations.fastapi import CharterRoutes
from tests.integrations.test_fastapi import auth, client, create_invoice

__all__ = ["client"]  # the reference service's TestClient fixture, per database

# -- 401: WWW-Authenticate ---------------------------------------------------------------


def test_a_401_without_credentials_challenges_bearer_without_an_error_code(client):
    response = client.post("/invoices", json={})
    assert (401, "Bearer") == (response.status_code, response.headers.get("www-authenticate"))


def test_a_401_for_a_refused_token_says_invalid_token(client):
    response = client.get("/invoices", headers={"Authorization": "Bearer not-a-token"})
    assert (401, 'Bearer error="invalid_token"') == (
        response.status_code,
        response.headers.get("www-authenticate"),
    )


def test_a_401_for_another_scheme_challenges_bearer_without_an_error_code(client):
    response = client.get("/invoices", headers={"Authorization": "Basic YTpi"})
    assert (401, "Bearer") == (response.status_code, response.headers.get("www-authenticate"))


def test_a_forbidden_answer_carries_no_challenge(client):
    invoice = create_invoice(client)
    response = client.post(f"/invoices/{invoice}/submit", headers=auth("bob"))
    assert 403 == response.status_code
    assert "www-authenticate" not in response.headers


# -- 405: Allow --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("DELETE", "/invoices", "GET, POST"),  # two routes share the path
        ("PUT", "/invoices/1", "GET"),
        ("GET", "/invoices/1/approve", "POST"),
    ],
)
def test_a_405_lists_every_method_the_path_serves(client, method, path, allow):
    response = client.request(method, path, headers=auth("alice"))
    assert (405, allow) == (response.status_code, response.headers.get("allow"))
    assert "method_not_allowed" == response.json()["code"]


# -- problem types -----------------------------------------------------------------------


def test_a_problem_claims_no_domain_it_does_not_control(client):
    body = client.get("/invoices/999999", headers=auth("alice")).json()
    assert ("about:blank", HTTPStatus.NOT_FOUND.phrase, "not_found") == (
        body["type"],
        body["title"],
        body["code"],
    )


def test_every_problem_of_the_service_is_about_blank_with_a_code(client):
    answers = [
        client.post("/invoices", json={}),  # 401
        client.post("/invoices", json={"customer": "x"}, headers=auth("alice")),  # 422
        client.delete("/invoices", headers=auth("alice")),  # 405
        client.get("/nowhere"),  # 404 route
        client.post("/invoices", content=b"{", headers=auth("alice")),  # 400
    ]
    assert [("about:blank", True)] * len(answers) == [
        (a.json()["type"], bool(a.json()["code"])) for a in answers
    ]
    assert "charter.dev" not in "".join(a.text for a in answers)


def test_a_deployment_names_its_own_problem_types(database_url):
    app = FastAPI()
    charter = Charter(database_url=database_url, audit_keys={"k1": "test-audit-key-0123456789"})

    def nobody(_request: object) -> None:
        raise CharterError("unused")

    CharterRoutes(app, charter, authenticate=nobody, problem_type_base="https://errors.example/")

    @app.get("/missing")
    async def missing() -> None:
        raise NotFound("nothing here")

    try:
        body = TestClient(app).get("/missing").json()
    finally:
        charter.engine.dispose()
    assert ("https://errors.example/not-found", "Not found", "not_found") == (
        body["type"],
        body["title"],
        body["code"],
    )


# -- field values ------------------------------------------------------------------------


@pytest.mark.parametrize("value", [b"why\x00", b"why\rnot", b"why\nnot"])
def test_a_header_with_nul_cr_or_lf_is_a_400_before_the_gate(client, value):
    async def asgi_call() -> list[dict[str, object]]:
        sent: list[dict[str, object]] = []
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/invoices",
            "raw_path": b"/invoices",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"testserver"), (b"x-charter-reason", value)],
            "client": ("127.0.0.1", 1),
            "server": ("testserver", 80),
        }

        async def receive() -> dict[str, object]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        await client.app(scope, receive, send)
        return sent

    sent = client.portal.call(asgi_call)
    assert 400 == sent[0]["status"]
    assert b'"code":"bad_request"' in sent[1]["body"]
