"""The reference service's lists and exports: page caps, cursors, hidden fields, streams, audit."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import insert, select

from charter import Charter
from charter.audit.entry import audit_table
from charter.demo.app import create_app
from charter.demo.models import Invoice
from charter.demo.service import DEMO_USERS
from charter.errors import Forbidden, InvalidCursor, InvalidPage
from charter.settings import DEVELOPMENT_TOKEN_SECRET, Settings
from tests.integrations.test_fastapi import auth

SETTINGS = Settings(
    environment="development",
    token_secrets=(DEVELOPMENT_TOKEN_SECRET,),
    audit_keys={"k1": "test-audit-key-0123456789abcdef"},
)
IBAN = "DE89370400440532013000"


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def service(database_url: str, clock: Clock) -> Iterator[TestClient]:
    charter = Charter(
        database_url=database_url, audit_keys=SETTINGS.audit_keys, clock=clock, rate_limits=None
    )
    app = create_app(SETTINGS, charter=charter)
    with TestClient(app, raise_server_exceptions=False) as client:
        client.app_state = app.state  # type: ignore[attr-defined]
        yield client


def seed(charter: Charter, n: int, tenant: str = "acme", start: int = 1) -> None:
    rows = [
        {"id": i, "tenant_id": tenant, "customer": f"c{i % 7}", "amount": 100 + i % 5,
         "currency": "EUR", "state": "draft", "version": 1, "created_by": "alice",
         "created_at": datetime(2026, 1, 1, tzinfo=UTC), "bank_account": IBAN}
        for i in range(start, start + n)
    ]  # fmt: skip
    with charter.engine.begin() as conn:
        conn.execute(insert(Invoice), rows)


def _scoped(user: str) -> Any:
    base = next(a for (_, uid), a in DEMO_USERS.items() if uid == user)
    return type(base).make(base.id, base.tenant, roles=base.roles, scopes={"invoices:read"})


def charter_of(client: TestClient) -> Charter:
    return client.app_state.charter  # type: ignore[attr-defined, no-any-return]


def all_pages(client: TestClient, user: str, query: str) -> list[int]:
    ids, after = [], None
    for _ in range(100):
        url = f"/invoices?{query}" + (f"&after={after}" if after else "")
        body = client.get(url, headers=auth(user)).json()
        ids += [item["id"] for item in body["items"]]
        after = body["next"]
        if after is None:
            return ids
    raise AssertionError("no last page")


# -- the page cap ------------------------------------------------------------------------


def test_a_page_size_above_the_cap_is_clamped_and_the_response_says_so(service):
    seed(charter_of(service), 250)
    body = service.get("/invoices?limit=100000", headers=auth("alice")).json()
    assert (200, 200) == (body["limit"], len(body["items"]))


@pytest.mark.parametrize("limit", ["0", "-1", "x", "1.5", "1e3", "\u0661"])
def test_a_page_size_that_is_not_a_positive_integer_is_a_400(service, limit):
    response = service.get(f"/invoices?limit={limit}", headers=auth("alice"))
    assert (400, "invalid_page", "limit") == (
        response.status_code, response.json()["code"], response.json()["parameter"]
    )  # fmt: skip


def test_the_cap_is_configurable_per_charter_and_never_raised_by_a_call(database_url):
    charter = Charter(database_url=database_url, audit_keys=SETTINGS.audit_keys, rate_limits=None,
                      max_page=5)  # fmt: skip
    try:
        from charter.demo.service import build_charter

        build_charter(charter)
        seed(charter, 12)
        page = charter.list_records(_scoped("alice"), "invoice.get", limit=50, max_page=500)
        assert (5, 5) == (page.limit, len(page))
        with pytest.raises(InvalidPage):
            charter.list_records(_scoped("alice"), "invoice.get", limit=True)
    finally:
        charter.close()


# -- cursors -------------------------------------------------------------------------------


def test_pages_by_a_sort_with_ties_are_complete_and_stable(service):
    seed(charter_of(service), 23)
    ids = all_pages(service, "alice", "limit=4&sort=-amount")
    rows = sorted(range(1, 24), key=lambda i: (-(100 + i % 5), -i))
    assert rows == ids
    assert sorted(range(1, 24)) == all_pages(service, "alice", "limit=5")
    assert [i for i in range(1, 24) if i % 7 == 3] == all_pages(
        service, "alice", "limit=2&filter.customer=c3"
    )


def first_next(client: TestClient, user: str = "alice", query: str = "limit=2") -> str:
    cursor = client.get(f"/invoices?{query}", headers=auth(user)).json()["next"]
    assert cursor is not None
    return str(cursor)


def test_a_cursor_borrowed_by_another_actor_or_tenant_is_refused(service):
    seed(charter_of(service), 5)
    seed(charter_of(service), 5, tenant="globex", start=100)
    cursor = first_next(service)
    for user in ("bob", "gina"):
        response = service.get(f"/invoices?limit=2&after={cursor}", headers=auth(user))
        assert (400, "invalid_cursor") == (response.status_code, response.json()["code"])


def test_a_cursor_for_another_list_filter_or_sort_is_refused(service):
    seed(charter_of(service), 5)
    cursor = first_next(service)
    for other in ("/approvals?limit=2", "/invoices?limit=2&sort=-amount",
                  "/invoices?limit=2&filter.state=draft"):  # fmt: skip
        response = service.get(f"{other}&after={cursor}", headers=auth("carol"))
        assert 400 == response.status_code
    own = service.get(f"/invoices?limit=2&after={cursor}", headers=auth("alice"))
    assert 200 == own.status_code


def test_a_tampered_cursor_is_refused(service):
    seed(charter_of(service), 5)
    cursor = first_next(service)
    flipped = cursor[:10] + ("A" if cursor[10] != "A" else "B") + cursor[11:]
    response = service.get(f"/invoices?limit=2&after={flipped}", headers=auth("alice"))
    assert (400, "invalid_cursor") == (response.status_code, response.json()["code"])


def test_a_cursor_expires_after_three_days(service, clock):
    seed(charter_of(service), 5)
    cursor = first_next(service)
    clock.now += timedelta(days=3, seconds=1)
    response = service.get(f"/invoices?limit=2&after={cursor}", headers=auth("alice"))
    assert (400, "invalid_cursor", "expired") == (
        response.status_code, response.json()["code"], response.json()["reason"]
    )  # fmt: skip


def test_a_cursor_grants_nothing_the_policy_does_not(service):
    """The page after a cursor is selected for its presenter, now: a voided draft is gone."""
    charter = charter_of(service)
    seed(charter, 4)
    cursor = first_next(service, "bob", "limit=2")
    with charter.engine.begin() as conn:
        conn.execute(Invoice.__table__.update().values(tenant_id="globex"))
    body = service.get(f"/invoices?limit=2&after={cursor}", headers=auth("bob")).json()
    assert [] == body["items"]


# -- hidden fields -------------------------------------------------------------------------


def test_only_finance_sees_the_bank_account_in_get_create_and_list(service):
    created = service.post("/invoices", json={"customer": "x", "amount": "5", "bank_account": IBAN},
                           headers=auth("alice")).json()  # fmt: skip
    assert "bank_account" not in created
    got = service.get(f"/invoices/{created['id']}", headers=auth("alice")).json()
    assert "bank_account" not in got
    assert (
        IBAN
        == service.get(f"/invoices/{created['id']}", headers=auth("fiona")).json()["bank_account"]
    )
    listed = service.get("/invoices", headers=auth("bob")).json()["items"]
    assert listed
    assert all("bank_account" not in item for item in listed)
    finance = service.get("/invoices", headers=auth("fiona")).json()["items"]
    assert IBAN == finance[0]["bank_account"]


@pytest.mark.parametrize("query", ["sort=bank_account", "sort=-bank_account",
                                   f"filter.bank_account={IBAN}"])  # fmt: skip
def test_a_hidden_field_cannot_sort_or_filter_and_looks_unknown(service, query):
    seed(charter_of(service), 3)
    hidden = service.get(f"/invoices?{query}", headers=auth("alice"))
    unknown = service.get(f"/invoices?{query.replace('bank_account', 'no_such')}",
                          headers=auth("alice"))  # fmt: skip
    assert (400, "invalid_page") == (hidden.status_code, hidden.json()["code"])
    assert hidden.json()["detail"].replace("bank_account", "no_such") == unknown.json()["detail"]
    assert "bank_account" not in unknown.json()["detail"]
    finance = service.get(f"/invoices?{query}", headers=auth("fiona"))
    if query.startswith("filter"):
        assert 200 == finance.status_code
    else:  # the field exists for finance, but may be empty: not a sort key (lists module)
        assert "may be empty" in finance.json()["detail"]


# -- exports -------------------------------------------------------------------------------


def export_entries(charter: Charter) -> list[Any]:
    with charter.engine.connect() as conn:
        return list(conn.execute(select(audit_table).where(
            audit_table.c.action == "invoice.export").order_by(audit_table.c.id)))  # fmt: skip


def test_a_csv_export_streams_what_the_caller_may_see_and_is_audited_twice(service):
    charter = charter_of(service)
    seed(charter, 30)
    seed(charter, 5, tenant="globex", start=100)
    response = service.get("/invoices/export?format=csv&sort=-amount", headers=auth("alice"))
    assert (200, "text/csv; charset=utf-8") == (
        response.status_code, response.headers["content-type"]
    )  # fmt: skip
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert 30 == len(rows)
    assert {"acme"} == {r["tenant_id"] for r in rows}
    assert "bank_account" not in rows[0]
    started, ended = export_entries(charter)
    assert ("export_started", "-amount") == (started.outcome, started.detail["sort"])
    ids = "".join(f"{r['id']}\n" for r in rows).encode()
    assert ("export_completed", 30, "sha256:" + hashlib.sha256(ids).hexdigest()) == (
        ended.outcome, ended.detail["rows"], ended.detail["digest"]
    )  # fmt: skip


def test_a_jsonl_export_shows_finance_the_bank_account_and_no_one_else(service):
    seed(charter_of(service), 3)
    for user, visible in (("fiona", True), ("alice", False)):
        response = service.get("/invoices/export?format=jsonl", headers=auth(user))
        lines = [json.loads(line) for line in response.text.splitlines()]
        assert 3 == len(lines)
        assert [visible] * 3 == ["bank_account" in line for line in lines]
    hidden = service.get("/invoices/export?sort=bank_account", headers=auth("alice"))
    assert 400 == hidden.status_code


def test_a_csv_cell_that_a_spreadsheet_would_run_is_neutralized(service):
    service.post("/invoices", json={"customer": "=HYPERLINK(\"x\")", "amount": "5"},
                 headers=auth("alice"))  # fmt: skip
    rows = list(csv.DictReader(io.StringIO(service.get("/invoices/export",
                                                       headers=auth("alice")).text)))  # fmt: skip
    assert '\'=HYPERLINK("x")' == rows[0]["customer"]


def test_an_export_without_the_scope_is_refused_and_audited(service):
    response = service.get("/invoices/export", headers=auth("alice", scopes=["invoices:write"]))
    assert (403, "forbidden") == (response.status_code, response.json()["code"])
    assert ["forbidden"] == [e.outcome for e in export_entries(charter_of(service))]


def test_an_export_closed_midway_is_audited_as_aborted_with_what_it_sent(service):
    charter = charter_of(service)
    seed(charter, 2500)
    stream = charter.export(_scoped("alice"), "invoice.export", format="csv")
    header, first = next(stream), next(stream)
    assert header.startswith(b"id,")
    stream.close()
    assert ("aborted", 1000) == (stream.status, stream.rows)
    ended = export_entries(charter)[-1]
    ids = "".join(f"{i}\n" for i in range(1, 1001)).encode()
    assert ("export_aborted", 1000, "sha256:" + hashlib.sha256(ids).hexdigest()) == (
        ended.outcome, ended.detail["rows"], ended.detail["digest"]
    )  # fmt: skip
    assert first.count(b"\r\n") == 1000


def test_a_client_that_disconnects_mid_stream_ends_the_export_as_aborted(service):
    charter = charter_of(service)
    seed(charter, 5000)
    app = service.app
    token = auth("alice")["Authorization"].encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": "/invoices/export", "raw_path": b"/invoices/export",
        "query_string": b"format=csv", "root_path": "", "client": ("127.0.0.1", 1),
        "server": ("testserver", 80), "headers": [(b"authorization", token), (b"host", b"t")],
    }  # fmt: skip
    sent: list[dict[str, Any]] = []

    async def main() -> None:
        first_body = anyio.Event()

        async def receive() -> dict[str, Any]:
            await first_body.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and message.get("body"):
                first_body.set()
                await anyio.sleep(0.05)  # the client is gone before the next chunk is taken

        with anyio.fail_after(30):
            await app(scope, receive, send)

    anyio.run(main)
    assert 200 == sent[0]["status"]
    ended = export_entries(charter)[-1]
    assert "export_aborted" == ended.outcome
    assert ended.detail["rows"] < 5000


def test_export_refuses_an_unknown_format_and_field(service):
    assert 400 == service.get("/invoices/export?format=xml", headers=auth("alice")).status_code
    with pytest.raises(InvalidPage):
        charter_of(service).export(_scoped("alice"), "invoice.export", fields=["bank_account"])
    with pytest.raises(Forbidden):
        charter_of(service).export(
            type(_scoped("alice")).make("alice", "acme", roles={"member"}, scopes={"x"}),
            "invoice.export",
        )
    assert issubclass(InvalidCursor, InvalidPage)
