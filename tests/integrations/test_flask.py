"""The Flask channel: the same declarations give the same answers as FastAPI's."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from charter import Actor, Charter
from charter.demo.app import create_app as create_fastapi
from charter.demo.flask_app import create_app as create_flask
from charter.demo.flask_app import routes
from charter.demo.models import Base
from charter.errors import ConfigurationError
from charter.integrations.flask import CharterFlask
from charter.ratelimit import RateClass, RateLimiter
from tests.integrations.test_fastapi import SETTINGS, auth

PROBLEM = "application/problem+json"


class Answer:
    """Status, body and the headers both channels set, from either test client."""

    def __init__(self, status: int, body: Any, headers: Any) -> None:
        self.status, self.body = status, body
        self.headers = {k.lower(): v for k, v in headers.items()}

    def shape(self) -> tuple[Any, ...]:
        """What must be equal across channels (ids and times aside)."""
        body = self.body if isinstance(self.body, dict) else {}
        return (
            self.status,
            self.headers.get("content-type", "").split(";")[0],
            body.get("code"),
            body.get("state"),
            self.headers.get("etag"),
            self.headers.get("idempotent-replayed"),
            "retry-after" in self.headers,
            "www-authenticate" in self.headers,
            "x-request-id" in self.headers,
        )


Call = Callable[..., Answer]


def limiter() -> RateLimiter:
    return RateLimiter("memory://", classes=[RateClass("read", "3/minute")])


@pytest.fixture(params=["fastapi", "flask"])
def call(request: pytest.FixtureRequest, database_url: str, disposing: Any) -> Iterator[Call]:
    charter = disposing(
        Charter(database_url=database_url, audit_keys=SETTINGS.audit_keys, rate_limits=limiter())
    )
    if request.param == "fastapi":
        with TestClient(create_fastapi(SETTINGS, charter=charter)) as client:

            def fastapi_call(method: str, path: str, **kw: Any) -> Answer:
                if "raw" in kw:
                    kw["content"] = kw.pop("raw")
                r = client.request(method, path, **kw)
                body = r.json() if r.content else None
                return Answer(r.status_code, body, r.headers)

            yield fastapi_call
    else:
        client = create_flask(SETTINGS, charter=charter).test_client()

        def flask_call(method: str, path: str, **kw: Any) -> Answer:
            if "raw" in kw:
                kw["data"] = kw.pop("raw")
            r = client.open(path, method=method, **kw)
            return Answer(r.status_code, r.get_json(silent=True), r.headers)

        yield flask_call


def created(call: Call, amount: str = "1200.00") -> int:
    answer = call(
        "POST", "/invoices", json={"customer": "ACME", "amount": amount}, headers=auth("alice")
    )
    assert 201 == answer.status, answer.body
    return int(answer.body["id"])


def test_the_workflow_answers_alike(call):
    invoice = created(call)
    assert (200, "application/json", None, "submitted", '"2"', None, False, False, True) == call(
        "POST", f"/invoices/{invoice}/submit", headers=auth("alice")
    ).shape()
    approved = call(
        "POST", f"/invoices/{invoice}/approve", json={"note": "ok"}, headers=auth("bob")
    )
    assert (200, "approved", '"3"') == (
        approved.status,
        approved.body["state"],
        approved.headers["etag"],
    )


def test_refusals_have_the_same_codes_and_headers(call):
    invoice = created(call, "9000.00")
    call("POST", f"/invoices/{invoice}/submit", headers=auth("alice"))
    forbidden = call("POST", f"/invoices/{invoice}/approve", headers=auth("bob"))
    assert (403, PROBLEM, "forbidden") == forbidden.shape()[:3]
    assert (404, PROBLEM, "not_found") == call(
        "GET", f"/invoices/{invoice}", headers=auth("gina")
    ).shape()[:3]
    again = call("POST", f"/invoices/{invoice}/submit", headers=auth("alice"))
    assert (409, PROBLEM, "invalid_transition") == again.shape()[:3]
    assert "submitted" == again.body["state"]
    stale = call(
        "POST",
        f"/invoices/{invoice}/void",
        headers=auth("alice", **{"If-Match": '"1"', "X-Charter-Reason": "typo"}),
    )
    assert (412, PROBLEM, "precondition_failed") == stale.shape()[:3]
    weak = call(
        "POST",
        f"/invoices/{invoice}/void",
        headers=auth("alice", **{"If-Match": 'W/"2"', "X-Charter-Reason": "typo"}),
    )
    assert (400, "if_match_invalid") == (weak.status, weak.body["code"])
    unauthenticated = call("GET", f"/invoices/{invoice}", headers={"Authorization": "Bearer x"})
    assert (401, PROBLEM, "unauthenticated") == unauthenticated.shape()[:3]
    assert 'Bearer error="invalid_token"' == unauthenticated.headers["www-authenticate"]
    text = call(
        "POST",
        "/invoices",
        raw=b"customer=x",
        headers={**auth("alice"), "Content-Type": "text/plain"},
    )
    assert (415, "unsupported_media_type") == (text.status, text.body["code"])


def test_a_replay_and_the_rate_limit_answer_alike(call):
    body = {"customer": "ACME", "amount": "10.00"}
    headers = auth("alice", **{"Idempotency-Key": "k-1"})
    first, again = (call("POST", "/invoices", json=body, headers=headers) for _ in range(2))
    assert (first.body, None, "true") == (
        again.body,
        first.headers.get("idempotent-replayed"),
        again.headers["idempotent-replayed"],
    )
    reads = [call("GET", f"/invoices/{first.body['id']}", headers=auth("bob")) for _ in range(4)]
    assert [200, 200, 200, 429] == [r.status for r in reads]
    assert "ratelimit" in reads[0].headers
    assert ("rate_limited", True) == (reads[-1].body["code"], "retry-after" in reads[-1].headers)


def test_a_flask_app_with_flask_sqlalchemy_runs_through_the_gate(tmp_path):
    """Charter(engine=db.engine) and the app's mapped classes; the gate's session writes."""
    app = Flask("t")
    app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{tmp_path / 'app.db'}"
    db = SQLAlchemy(app, model_class=Base)
    with app.app_context():
        db.create_all()
        charter = Charter(engine=db.engine, audit_keys=SETTINGS.audit_keys)
        from charter.migrate import upgrade

        upgrade(db.engine)
    alice = Actor.make("alice", "acme", roles={"member"}, scopes={"invoices:write"})
    ext = CharterFlask(authenticate=lambda request: alice)
    ext.action("invoice.create")
    from charter.demo.service import build_charter

    build_charter(charter)
    ext.init_app(app, charter=charter)
    client = app.test_client()
    answer = client.post("/invoices", json={"customer": "ACME", "amount": "5"})
    assert (201, "/invoices/1") == (answer.status_code, answer.headers["Location"])
    with app.app_context():
        from charter.demo.models import Invoice

        assert ["ACME"] == [i.customer for i in db.session.scalars(db.select(Invoice))]
    assert ["invoice.create"] == [h["action"] for h in charter.history("invoices", 1)]
    charter.close()


def test_one_extension_serves_two_apps_with_their_own_charters(tmp_path):
    ext = routes(
        CharterFlask(
            authenticate=lambda request: Actor.make(
                "alice", "acme", roles={"member"}, scopes={"invoices:write", "invoices:read"}
            )
        )
    )
    apps, charters = [], []
    for name in ("one", "two"):
        charter = Charter(
            database_url=f"sqlite:///{tmp_path / name}.db", audit_keys=SETTINGS.audit_keys
        )
        from charter.demo.app import DEMO_MIGRATIONS
        from charter.demo.service import build_charter
        from charter.migrate import upgrade

        upgrade(charter.engine, extra_locations=DEMO_MIGRATIONS)
        build_charter(charter)
        app = Flask(name)
        ext.init_app(app, charter=charter)
        apps.append(app)
        charters.append(charter)
    one, two = (a.test_client() for a in apps)
    assert 201 == one.post("/invoices", json={"customer": "A", "amount": "1"}).status_code
    assert 404 == two.get("/invoices/1").status_code  # its own database holds nothing
    assert 200 == one.get("/invoices/1").status_code
    assert apps[0].extensions["charter"].charter is charters[0]
    assert apps[1].extensions["charter"].charter is charters[1]
    with pytest.raises(ConfigurationError):
        ext.init_app(apps[0], charter=charters[0])  # once per app
    for charter in charters:
        charter.close()


def test_flask_charter_commands_reuse_the_cli(tmp_path):
    charter = Charter(database_url=f"sqlite:///{tmp_path / 'c.db'}", audit_keys=SETTINGS.audit_keys)
    app = create_flask(SETTINGS, charter=charter)
    runner = app.test_cli_runner()
    stages = runner.invoke(args=["charter", "pipeline", "invoice.approve"])
    assert 0 == stages.exit_code, stages.output
    assert "invoice.approve (sqlite):" in stages.output
    assert "decide" in stages.output
    matrix = runner.invoke(args=["charter", "policy", "matrix", "--format", "csv"])
    assert (0, True) == (matrix.exit_code, "invoice.approve" in matrix.output)
    unknown = runner.invoke(args=["charter", "pipeline", "invoice.nope"])
    assert 0 != unknown.exit_code
    charter.close()


def test_an_unknown_route_and_a_wrong_method_are_problems():
    charter = Charter(database_url="sqlite://", audit_keys=SETTINGS.audit_keys)
    client = create_flask(SETTINGS, charter=charter).test_client()
    missing = client.get("/nope")
    assert (404, PROBLEM, "route_not_found") == (
        missing.status_code,
        missing.mimetype,
        missing.get_json()["code"],
    )
    wrong = client.delete("/invoices")
    assert (405, "GET, POST") == (wrong.status_code, wrong.headers["Allow"])
    assert "X-Request-ID" in wrong.headers
    big = client.post(
        "/invoices",
        data=b"{" + b" " * (70 * 1024) + b"}",
        headers={**auth("alice"), "Content-Type": "application/json"},
    )
    assert (413, "payload_too_large") == (big.status_code, big.get_json()["code"])
    charter.close()


def test_two_idempotency_key_fields_are_refused_on_both_and_nothing_runs(call):
    """WSGI joins repeated fields ("a, b"): Flask counted one field, ran the request under the
    key "a, b", and a retry with only "b" created a second invoice. A bare key may not hold a
    comma now (a key with one is sent quoted), so both adapters answer 400 alike."""
    body = {"customer": "ACME", "amount": "10.00"}
    fields = [*auth("alice").items(), ("Idempotency-Key", "a"), ("Idempotency-Key", "b")]
    twice = call("POST", "/invoices", json=body, headers=fields)
    assert (400, "idempotency_key_invalid") == (twice.status, twice.body["code"])
    quoted = call(
        "POST", "/invoices", json=body, headers={**auth("alice"), "Idempotency-Key": '"a, b"'}
    )
    assert 201 == quoted.status  # one quoted key holding a comma is one key
    listed = call("GET", "/invoices", headers=auth("alice"))
    assert 1 == len(listed.body["items"])


@pytest.mark.parametrize("name", ["X-Charter-Reason", "Idempotency-Key", "X-On-Behalf-Of"])
def test_a_header_holding_nul_is_a_400_on_both_before_anything_reads_it(call, name):
    answer = call("POST", "/invoices", json={"customer": "ACME", "amount": "1.00"},
                  headers={**auth("alice"), name: "a\x00b"})  # fmt: skip
    assert (400, "bad_request") == (answer.status, answer.body["code"])


def test_a_plain_tokens_claim_to_act_for_someone_is_refused_on_both(call):
    """The Flask reference service still accepted sam's own token with X-On-Behalf-Of: alice
    (201, no session), which the FastAPI one refuses since sessions exist."""
    headers = {**auth("sam"), "X-On-Behalf-Of": "alice", "X-Charter-Reason": "t"}
    body = {"customer": "ACME", "amount": "1.00"}
    claimed = call("POST", "/invoices", json=body, headers=headers)
    assert (401, "unauthenticated") == (claimed.status, claimed.body["code"])
