"""Successful list pages and exports carry the RateLimit fields, on FastAPI and on Flask (issue 10).

A call's answer already said how much of its window was left; a page of a list
and the start of an export said nothing until they were refused. Now each one
answers the ``RateLimit-Policy`` and ``RateLimit`` fields of the very check
that counted it (the ``read`` class for a page, the ``export`` class and its
in-flight slots for an export), the same on both adapters.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient

from charter import Charter
from charter.demo.app import create_app as create_fastapi
from charter.demo.flask_app import create_app as create_flask
from charter.ratelimit import RateClass, RateLimiter
from tests.data.test_service_lists import _scoped, export_entries, seed
from tests.integrations.test_fastapi import SETTINGS, auth

AT = datetime(2026, 12, 1, 12, 0, 15, tzinfo=UTC)  # 45 s before the minute's window closes


class Reply:
    def __init__(self, status: int, headers: Any, text: str) -> None:
        self.status, self.text = status, text
        self.headers = {k.lower(): v for k, v in headers.items()}


Get = Callable[..., Reply]


def limiter() -> RateLimiter:
    return RateLimiter(
        "memory://",
        classes=[
            RateClass("read", "3/minute"),
            RateClass("export", "2/minute", fail="closed", concurrency=2),
        ],
    )


def make_charter(database_url: str, disposing: Any, rate_limits: Any) -> Charter:
    charter: Charter = disposing(
        Charter(
            database_url=database_url, audit_keys=SETTINGS.audit_keys, clock=lambda: AT,
            rate_limits=rate_limits,
        )
    )  # fmt: skip
    return charter


def serve(kind: str, charter: Charter) -> Iterator[tuple[Get, Charter]]:
    """The reference service on ``kind``, with four of alice's invoices."""
    seed(charter, 4)
    if kind == "fastapi":
        with TestClient(create_fastapi(SETTINGS, charter=charter)) as client:

            def fastapi_get(path: str, **kw: Any) -> Reply:
                r = client.get(path, **kw)
                return Reply(r.status_code, r.headers, r.text)

            yield fastapi_get, charter
        return
    client = create_flask(SETTINGS, charter=charter).test_client()

    def flask_get(path: str, **kw: Any) -> Reply:
        r = client.get(path, **kw)
        try:
            return Reply(r.status_code, r.headers, r.get_data(as_text=True))
        finally:
            r.close()  # the WSGI close: an export's stream ends here

    yield flask_get, charter


@pytest.fixture(params=["fastapi", "flask"])
def get(request: pytest.FixtureRequest, database_url: str, disposing: Any) -> Iterator[Get]:
    charter = make_charter(database_url, disposing, limiter())
    for getter, _ in serve(request.param, charter):
        yield getter


@pytest.fixture(params=["fastapi", "flask"])
def unlimited(request: pytest.FixtureRequest, database_url: str, disposing: Any) -> Iterator[Get]:
    charter = make_charter(database_url, disposing, None)
    for getter, _ in serve(request.param, charter):
        yield getter


def fields(reply: Reply) -> tuple[str | None, str | None]:
    return reply.headers.get("ratelimit-policy"), reply.headers.get("ratelimit")


def test_each_page_served_says_what_is_left_of_the_read_window(get):
    pages = [get("/invoices?limit=2", headers=auth("alice")) for _ in range(3)]
    assert [200, 200, 200] == [p.status for p in pages]
    assert [
        ('"read";q=3;w=60', '"read";r=2;t=45'),
        ('"read";q=3;w=60', '"read";r=1;t=45'),
        ('"read";q=3;w=60', '"read";r=0;t=45'),
    ] == [fields(p) for p in pages]
    refused = get("/invoices?limit=2", headers=auth("alice"))
    assert (429, '"read";r=0;t=45', "45") == (
        refused.status, refused.headers["ratelimit"], refused.headers["retry-after"],
    )  # fmt: skip


def test_the_approval_queue_counts_as_a_read_with_its_own_actor_count(get):
    queue = get("/approvals", headers=auth("bob"))
    other = get("/invoices", headers=auth("alice"))
    assert (200, ('"read";q=3;w=60', '"read";r=2;t=45')) == (queue.status, fields(queue))
    assert ('"read";q=3;w=60', '"read";r=2;t=45') == fields(other)  # alice's own count


def test_an_export_says_its_class_and_its_in_flight_slots(get):
    first = get("/invoices/export?format=csv", headers=auth("alice"))
    assert 200 == first.status
    assert 4 == len(list(csv.DictReader(io.StringIO(first.text))))
    assert 'attachment; filename="invoices-export.csv"' == first.headers["content-disposition"]
    assert (
        '"export";q=2;w=60, "export-concurrency";q=2;qu="concurrent-requests"',
        # the slot is taken while this export runs: one of two left, then given back
        '"export";r=1;t=45, "export-concurrency";r=1',
    ) == fields(first)
    second = get("/invoices/export?format=jsonl", headers=auth("alice"))
    assert (200, '"export";r=0;t=45, "export-concurrency";r=1') == (
        second.status, fields(second)[1],
    )  # fmt: skip
    assert 429 == get("/invoices/export", headers=auth("alice")).status


def test_without_rate_limits_no_page_or_export_carries_the_fields(unlimited):
    page = unlimited("/invoices", headers=auth("alice"))
    export = unlimited("/invoices/export", headers=auth("alice"))
    assert (200, 200) == (page.status, export.status)
    assert (None, None) == fields(page)
    assert (None, None) == fields(export)


@pytest.mark.parametrize("kind", ["fastapi", "flask"])
def test_a_flask_export_is_audited_started_and_completed_like_fastapi(
    kind, database_url, disposing
):
    charter = make_charter(database_url, disposing, limiter())
    for getter, served in serve(kind, charter):
        assert 200 == getter("/invoices/export?format=jsonl", headers=auth("alice")).status
        outcomes = [(e.outcome, (e.detail or {}).get("rows")) for e in export_entries(served)]
        assert [("export_started", None), ("export_completed", 4)] == outcomes


def test_a_page_of_the_gate_holds_the_state_of_its_check(database_url, disposing):
    charter = make_charter(database_url, disposing, limiter())
    for _, served in serve("flask", charter):
        page = served.list_records(_scoped("alice"), "invoice.get", limit=2)
        assert (2, ('"read";r=2;t=45',)) == (len(page), tuple(s.member() for s in page.rate_limit))
