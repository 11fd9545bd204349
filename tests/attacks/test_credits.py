"""Attacks on prepaid credits and the export quota, over HTTP against the reference service.

Each is a sequence of individually valid, authenticated requests whose flaw
was in the check-then-write: spending the last credits twice, a reminder that
charges though the sender failed, a replay charged again, a top-up of a
negative amount, a flood of exports, a hold that outlives a crash.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from charter import Charter
from charter.credits import Credits
from charter.demo.app import create_app
from charter.demo.sender import ReminderSenderStub, SenderClient
from charter.demo.service import EXPORTS_PER_DAY, REMINDER_COST
from charter.settings import DEVELOPMENT_TOKEN_SECRET, Settings

from ..integrations.test_fastapi import auth, create_invoice


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def sender() -> Iterator[ReminderSenderStub]:
    with ReminderSenderStub() as stub:
        yield stub


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def client(database_url: str, sender: ReminderSenderStub, clock: Clock) -> Iterator[TestClient]:
    settings = Settings(
        environment="development",
        token_secrets=(DEVELOPMENT_TOKEN_SECRET,),
        audit_keys={"k1": "test-audit-key-0123456789abcdef"},
        sender_url=sender.base_url,
    )
    # The quota alone: the export rate class (10 a minute) is tests/attacks/test_ratelimit.py's.
    charter = Charter(
        database_url=database_url, audit_keys=settings.audit_keys, clock=clock, rate_limits=None
    )
    app = create_app(settings, charter=charter)
    with TestClient(app, raise_server_exceptions=False) as c:
        c.app_state = app.state  # type: ignore[attr-defined]
        yield c


def credits_of(client: TestClient) -> Credits:
    return Credits.of(client.app_state.charter)


def top_up(client: TestClient, amount: Any, user: str = "carol") -> Any:
    return client.post(
        "/credits/top-up",
        json={"credits": amount},
        headers=auth(user, **{"X-Charter-Reason": "prepaid"}),
    )


def remind(client: TestClient, invoice: int, key: str) -> Any:
    return client.post(
        f"/invoices/{invoice}/remind", headers=auth("alice", **{"Idempotency-Key": key})
    )


def balance(client: TestClient) -> dict[str, int]:
    response = client.get("/credits", headers=auth("alice"))
    assert 200 == response.status_code, response.text
    return dict(response.json())


def test_the_last_credits_pay_for_one_reminder_not_two(client, sender):
    invoice = create_invoice(client)
    assert 200 == top_up(client, REMINDER_COST).status_code
    first, second = remind(client, invoice, "r1"), remind(client, invoice, "r2")
    assert (200, True) == (first.status_code, first.json()["sent"])
    assert 402 == second.status_code
    assert "insufficient_credits" == second.json()["code"]
    assert 1 == sender.stats()["sent"]
    assert {"available": 0, "held": 0} == balance(client)
    assert credits_of(client).verify().ok


def test_concurrent_reminders_on_the_last_credits_send_exactly_one(client, sender):
    invoices = [create_invoice(client) for _ in range(6)]
    top_up(client, REMINDER_COST)
    start = threading.Barrier(len(invoices))

    def one(i: int) -> int:
        start.wait()
        return int(remind(client, invoices[i], f"c{i}").status_code)

    with ThreadPoolExecutor(len(invoices)) as pool:
        codes = sorted(pool.map(one, range(len(invoices))))
    assert [200] + [402] * (len(invoices) - 1) == codes
    assert 1 == sender.stats()["sent"]
    assert {"available": 0, "held": 0} == balance(client)
    assert credits_of(client).verify().ok


def test_a_reminder_the_sender_refuses_charges_nothing(client, sender):
    invoice = create_invoice(client)
    top_up(client, 2 * REMINDER_COST)
    sender.inject_faults(fail_next=1)
    failed = remind(client, invoice, "f1")
    assert (200, False, 0) == (failed.status_code, failed.json()["sent"], failed.json()["charged"])
    assert {"available": 2 * REMINDER_COST, "held": 0} == balance(client)
    assert 0 == sender.stats()["sent"]
    assert credits_of(client).verify().ok


def test_a_replayed_reminder_is_sent_and_charged_once(client, sender):
    invoice = create_invoice(client)
    top_up(client, 3 * REMINDER_COST)
    first, again = remind(client, invoice, "same"), remind(client, invoice, "same")
    assert first.json() == again.json()
    assert "true" == again.headers["Idempotent-Replayed"]
    assert 1 == sender.stats()["sent"]
    assert 2 * REMINDER_COST == balance(client)["available"]


def test_a_crash_between_hold_and_capture_is_released_at_expiry_and_a_late_capture_fails(
    client, sender, clock, monkeypatch
):
    invoice = create_invoice(client)
    top_up(client, REMINDER_COST)
    real_send = SenderClient.send

    def crash(self: SenderClient, *args: Any, **kwargs: Any) -> str:
        raise RuntimeError("the worker died mid-send")

    monkeypatch.setattr(SenderClient, "send", crash)
    assert 500 == remind(client, invoice, "crash").status_code
    # The hold committed with the step's recovery point: held, not lost, not spent.
    assert {"available": 0, "held": REMINDER_COST} == balance(client)
    clock.now += timedelta(minutes=11)  # past the hold's expiry (and the recovery lease)
    assert 1 == credits_of(client).sweep()
    assert {"available": REMINDER_COST, "held": 0} == balance(client)
    monkeypatch.setattr(SenderClient, "send", real_send)
    late = remind(client, invoice, "crash")  # the client retries: the request resumes
    assert (409, "hold_expired") == (late.status_code, late.json()["code"])
    assert {"available": REMINDER_COST, "held": 0} == balance(client)
    assert credits_of(client).verify().ok


@pytest.mark.parametrize("amount", [0, -5, 1.5, True, "10", 10**16, None])
def test_a_top_up_of_no_real_amount_is_422_and_writes_nothing(client, amount):
    response = top_up(client, amount)
    assert 422 == response.status_code, response.text
    assert response.json()["code"] in ("invalid_input", "invalid_amount")
    assert {"available": 0, "held": 0} == balance(client)


def test_only_an_admin_tops_up_and_never_without_a_reason(client):
    assert 403 == top_up(client, 100, user="alice").status_code
    no_reason = client.post("/credits/top-up", json={"credits": 100}, headers=auth("carol"))
    assert 400 == no_reason.status_code
    assert {"available": 0, "held": 0} == balance(client)


def test_the_daily_export_quota_holds_per_tenant_and_resets_next_day(client, clock):
    for _ in range(EXPORTS_PER_DAY):
        assert 200 == client.get("/invoices/export", headers=auth("alice")).status_code
    over = client.get("/invoices/export", headers=auth("bob"))
    assert (429, "quota_exceeded") == (over.status_code, over.json()["code"])
    assert str(15 * 3600 + 1) == over.headers["Retry-After"]
    assert 200 == client.get("/invoices/export", headers=auth("gina")).status_code  # globex
    clock.now += timedelta(days=1)
    assert 200 == client.get("/invoices/export", headers=auth("alice")).status_code


def test_a_flood_of_concurrent_exports_gets_exactly_the_quota(client):
    n = EXPORTS_PER_DAY + 20
    start = threading.Barrier(n)

    def one(_: int) -> int:
        start.wait()
        return int(client.get("/invoices/export", headers=auth("alice")).status_code)

    with ThreadPoolExecutor(n) as pool:
        codes = list(pool.map(one, range(n)))
    assert (EXPORTS_PER_DAY, n - EXPORTS_PER_DAY) == (codes.count(200), codes.count(429))
