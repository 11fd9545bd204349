"""Issue 10 (workflows), attacked over HTTP against the reference service.

Each attack is a sequence of individually valid, authenticated requests whose
flaw is the order: a step repeated, skipped or taken after the flow ended, two
approvals racing, a flow continued by someone who only knows its id. Before
the declared workflow each state problem was a 403 "You are not allowed to
perform ..." (the state was a clause of the policy rule), void and the plan
upgrade did not exist, and nothing bounded a step in time.
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
from charter.demo.app import create_app
from tests.attacks.test_webhook_ack import client as paying_client  # noqa: F401 - a fixture
from tests.attacks.test_webhook_ack import deliver, pay
from tests.integrations.test_fastapi import SETTINGS, auth, create_invoice


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 3, 1, 12, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def client(database_url: str, clock: Clock) -> Iterator[TestClient]:
    charter = Charter(database_url=database_url, audit_keys=SETTINGS.audit_keys, clock=clock)
    app = create_app(SETTINGS, charter=charter)
    with TestClient(app, raise_server_exceptions=False) as c:
        c.app_state = app.state  # type: ignore[attr-defined]
        yield c


def submitted(client: TestClient, amount: str = "100.00") -> int:
    invoice = create_invoice(client, amount)
    assert 200 == client.post(f"/invoices/{invoice}/submit", headers=auth("alice")).status_code
    return invoice


def assert_invalid(response: Any, state: str, allowed: list[str]) -> None:
    assert 409 == response.status_code, response.text
    problem = response.json()
    assert ("invalid_transition", state, allowed) == (
        problem["code"], problem["state"], problem["allowed"],
    )  # fmt: skip
    assert f"is {state}" in problem["detail"]


# -- the invoice ------------------------------------------------------------------------------


def test_approving_an_already_paid_invoice_is_409_naming_its_state(paying_client):  # noqa: F811
    invoice, charge = pay(paying_client)
    assert 200 == deliver(paying_client, charge, invoice, "msg_paid").status_code
    again = paying_client.post(f"/invoices/{invoice}/approve", json={}, headers=auth("bob"))
    assert_invalid(again, "paid", [])  # was 403 "You are not allowed to perform invoice.approve."


def test_a_repeated_approval_is_409_not_a_permission_problem(client):
    invoice = submitted(client)
    assert (
        200 == client.post(f"/invoices/{invoice}/approve", json={}, headers=auth("bob")).status_code
    )
    again = client.post(f"/invoices/{invoice}/approve", json={}, headers=auth("carol"))
    assert_invalid(again, "approved", ["invoice.pay"])


def test_skipping_the_approval_is_409_whoever_asks(client):
    invoice = submitted(client)
    skipped = client.post(
        f"/invoices/{invoice}/pay", headers=auth("carol", **{"Idempotency-Key": "k1"})
    )
    assert_invalid(skipped, "submitted", ["invoice.approve", "invoice.void"])
    assert "submitted" == client.get(f"/invoices/{invoice}", headers=auth("bob")).json()["state"]


def test_void_only_from_draft_or_submitted_and_never_twice(client):
    draft = create_invoice(client)
    voided = client.post(
        f"/invoices/{draft}/void", headers=auth("alice", **{"X-Charter-Reason": "dup"})
    )
    assert (200, "void") == (voided.status_code, voided.json()["state"])
    again = client.post(
        f"/invoices/{draft}/void", headers=auth("alice", **{"X-Charter-Reason": "x"})
    )
    assert_invalid(again, "void", [])
    approved = submitted(client)
    client.post(f"/invoices/{approved}/approve", json={}, headers=auth("bob"))
    late = client.post(
        f"/invoices/{approved}/void", headers=auth("carol", **{"X-Charter-Reason": "x"})
    )
    assert_invalid(late, "approved", ["invoice.pay"])


def test_a_state_problem_of_an_invoice_in_another_tenant_is_404_not_409(client):
    invoice = submitted(client)
    client.post(f"/invoices/{invoice}/approve", json={}, headers=auth("bob"))
    foreign = client.post(f"/invoices/{invoice}/approve", json={}, headers=auth("gary"))
    assert 404 == foreign.status_code  # its state is as secret as its existence


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_50_concurrent_approvals_give_one_approval_and_49_clean_409s(client):
    invoice = submitted(client)
    workers = 50
    barrier = threading.Barrier(workers)

    def approve(user: str) -> tuple[int, str | None]:
        barrier.wait()
        response = client.post(f"/invoices/{invoice}/approve", json={}, headers=auth(user))
        return response.status_code, response.json().get("code")

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(approve, ["bob", "carol"] * (workers // 2)))
    assert 1 == results.count((200, None))
    assert [(409, "invalid_transition")] * (workers - 1) == [r for r in results if r[0] != 200]
    history = client.app_state.charter.history("invoices", invoice)
    assert 1 == sum(e["action"] == "invoice.approve" and e["outcome"] == "ok" for e in history)


def test_next_actions_tell_not_possible_now_from_not_allowed_for_you(client):
    invoice = create_invoice(client)  # alice's draft
    actions = client.get(f"/invoices/{invoice}/actions", headers=auth("bob")).json()
    assert {"allowed": False, "possible": False} == {
        k: actions["invoice.approve"][k] for k in ("allowed", "possible")
    }  # a draft cannot be approved, by anyone
    assert {"allowed": False, "possible": True} == {
        k: actions["invoice.submit"][k] for k in ("allowed", "possible")
    }  # it can be submitted, but not by bob


# -- the plan upgrade, a flow over several requests ----------------------------------------------


def start(client: TestClient, user: str = "alice") -> str:
    started = client.post("/plan-upgrades", json={"plan": "pro"}, headers=auth(user))
    assert 201 == started.status_code, started.text
    return str(started.json()["id"])


def step(client: TestClient, upgrade: str, name: str, user: str = "alice") -> Any:
    return client.post(f"/plan-upgrades/{upgrade}/{name}", headers=auth(user))


def test_the_terminal_step_right_after_the_start_is_refused(client):
    upgrade = start(client)
    assert_invalid(step(client, upgrade, "complete"), "initiated", ["plan_upgrade.verify"])
    assert_invalid(step(client, upgrade, "capture"), "initiated", ["plan_upgrade.verify"])


def test_a_completed_upgrade_cannot_be_replayed(client):
    upgrade = start(client)
    for name in ("verify", "capture", "complete"):
        assert 200 == step(client, upgrade, name).status_code
    view = client.get(f"/plan-upgrades/{upgrade}", headers=auth("alice")).json()
    assert ["plan_upgrade.verify", "plan_upgrade.capture", "plan_upgrade.complete"] == view["steps"]
    assert_invalid(step(client, upgrade, "complete"), "complete", [])


def test_a_step_after_its_deadline_is_refused_and_the_flow_stays_put(client, clock):
    upgrade = start(client)
    assert 200 == step(client, upgrade, "verify").status_code
    clock.now += timedelta(minutes=16)
    late = step(client, upgrade, "capture")
    assert (409, "step_expired") == (late.status_code, late.json()["code"])
    assert (
        "verified" == client.get(f"/plan-upgrades/{upgrade}", headers=auth("alice")).json()["state"]
    )


def test_knowing_an_upgrades_id_authorizes_nothing(client):
    upgrade = start(client)
    for user in ("carol", "gina"):  # an admin of the same tenant; another tenant
        assert 404 == step(client, upgrade, "verify", user).status_code
        assert 404 == client.get(f"/plan-upgrades/{upgrade}", headers=auth(user)).status_code
    assert 200 == step(client, upgrade, "verify").status_code  # still alice's to continue


def test_if_match_is_checked_after_the_404_and_the_409(client):
    """RFC 9110 section 13.2.1: failures found before processing win over preconditions. A
    stale If-Match was checked first: bob learned that alice's upgrade exists (and its
    version) from a 412 where its id alone gave 404, and an impossible step gave 412."""
    upgrade, missing = start(client), "0" * 32
    stale = {"If-Match": '"999"'}
    for target in (missing, upgrade):
        answer = client.post(f"/plan-upgrades/{target}/verify", headers=auth("bob", **stale))
        assert 404 == answer.status_code
    impossible = client.post(f"/plan-upgrades/{upgrade}/complete", headers=auth("alice", **stale))
    assert_invalid(impossible, "initiated", ["plan_upgrade.verify"])
    late = client.post(f"/plan-upgrades/{upgrade}/verify", headers=auth("alice", **stale))
    assert (412, "precondition_failed") == (late.status_code, late.json()["code"])
