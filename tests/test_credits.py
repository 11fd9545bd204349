"""Credits and quotas: one conditional write per charge, a double-entry ledger that verifies."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict
from sqlalchemy import func, select, text, update

from charter import Actor, Charter, ConfigurationError, DomainError
from charter.audit import audit_table
from charter.credits import Cost, Credits, Hold, Quota, check_amount, to_minor
from charter.credits import verify as verification
from charter.credits.tables import accounts_table, holds_table, ledger_table, quota_table
from charter.errors import (
    Conflict,
    HandlerFailed,
    HoldExpired,
    InsufficientCredits,
    InvalidAmount,
    QuotaExceeded,
)
from charter.storage import make_engine

from .conftest import AUDIT_KEYS

CONSUMERS = 200
COVERED = 50


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


class Spend(BaseModel):
    model_config = ConfigDict(extra="forbid")
    amount: int = 1
    fail: str | None = None


class Refused(DomainError):
    code = "refused_by_handler"


def declare(charter: Charter, credits: Credits) -> Charter:
    """The actions every test here uses (module level: processes build them too)."""

    @charter.action("credits.consume", input=Spend, allow=True, cost=1)
    def consume(ctx: Any, record: Any, data: Spend) -> dict[str, Any]:
        if data.fail == "domain":
            raise Refused("the handler refused after the charge")
        if data.fail == "crash":
            raise RuntimeError("boom")
        return {"ok": True}

    @charter.action("credits.spend", input=Spend, allow=True, cost=lambda data, _: data.amount)
    def spend(ctx: Any, record: Any, data: Spend) -> dict[str, Any]:
        return {"spent": data.amount}

    @charter.action("report.export", allow=True, cost=Quota("exports", limit=COVERED, per="day"))
    def export(ctx: Any, record: Any, data: Any) -> dict[str, Any]:
        return {"exported": True}

    @charter.action("message.send", input=Spend, allow=True, tags={"irreversible"})
    def send(ctx: Any, record: Any, data: Spend) -> dict[str, Any]:
        hold = credits.hold(ctx, data.amount, expires_in=timedelta(minutes=5))
        if data.fail == "sender":
            credits.release(ctx, hold)
            return {"sent": False, "hold": hold.id}
        credits.capture(ctx, hold)
        return {"sent": True, "hold": hold.id}

    return charter


def build(url: str, clock: Any = None, *, pool: int | None = None) -> tuple[Charter, Credits]:
    """The test gate; ``pool``: at most that many connections (many processes share a server)."""
    where: dict[str, Any] = {"database_url": url}
    if pool is not None:
        where = {"engine": make_engine(url, pool_size=pool, max_overflow=0)}
    # Hundreds of charges a minute by one actor: beyond the default financial rate
    # class (60 a minute), which tests/test_ratelimit.py tests; off here.
    charter = Charter(
        audit_keys=AUDIT_KEYS, clock=clock or Clock(), development=True, rate_limits=None, **where
    )
    credits = Credits.of(charter)
    return declare(charter, credits), credits


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def gate(database_url: str, clock: Clock) -> Any:
    charter, credits = build(database_url, clock)
    credits.open("acme")
    yield charter, credits
    charter.engine.dispose()


@pytest.fixture
def alice() -> Actor:
    return Actor.make("alice", "acme", roles={"member"})


def ledger_rows(charter: Charter) -> list[Any]:
    with charter.engine.connect() as c:
        return c.execute(select(ledger_table).order_by(ledger_table.c.id)).all()


# -- amounts ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, 1.5, Decimal("1.5"), True, False, 10**16, "3", None])
def test_an_amount_is_a_positive_bounded_integer_of_minor_units(bad):
    with pytest.raises(InvalidAmount) as caught:
        check_amount(bad)
    assert 422 == caught.value.status
    assert "invalid_amount" == caught.value.code


def test_a_decimal_amount_becomes_minor_units_without_rounding():
    assert 1234 == to_minor(Decimal("12.34"), 2)
    assert 7 == to_minor("7", 0)
    with pytest.raises(InvalidAmount):
        to_minor("12.345", 2)
    with pytest.raises(InvalidAmount):
        to_minor(12.34, 2)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "absurd",
    ["1e1000000", "9e999999", "1e999990", "-1e1000000", "1e-1000000000", Decimal("1e1000000")],
)
def test_an_absurd_decimal_exponent_is_refused_at_once_as_an_invalid_amount(absurd):
    started = time.perf_counter()
    with pytest.raises(InvalidAmount) as caught:
        to_minor(absurd, 2)
    assert "invalid_amount" == caught.value.code
    assert time.perf_counter() - started < 1.0  # was 25 s of CPU for 1e999990


def test_a_decimal_is_scaled_exactly_not_rounded_to_the_decimal_context():
    assert 1234 == to_minor("12.340000000000000000000000000000000", 2)
    with pytest.raises(InvalidAmount, match="more than 2 decimals"):
        to_minor("1.0000000000000000000000000001", 2)  # 28 digits of context would give 100


def test_a_cost_function_given_an_absurd_decimal_answers_422_not_500(gate, alice):
    charter, credits = gate
    credits.grant("acme", 10)

    @charter.action("credits.priced", input=Priced, allow=True, cost=_priced)
    def priced(ctx: Any, record: Any, data: Priced) -> dict[str, Any]:
        return {}

    with pytest.raises(InvalidAmount) as caught:
        charter.execute(alice, "credits.priced", {"price": "1e1000000"})
    assert 422 == caught.value.status
    assert 10 == credits.balance("acme")


class Priced(BaseModel):
    model_config = ConfigDict(extra="forbid")
    price: str


def _priced(data: Priced, record: Any) -> int:
    return to_minor(data.price, 0)


def test_an_account_names_its_currency_and_it_never_changes(gate):
    _, credits = gate
    account = credits.open("acme", "wallet", currency="EUR", exponent=2)
    assert ("EUR", 2, 0) == (account.currency, account.exponent, account.balance)
    assert account == credits.open("acme", "wallet", currency="EUR", exponent=2)
    with pytest.raises(Conflict):
        credits.open("acme", "wallet", currency="USD", exponent=2)
    with pytest.raises(ConfigurationError):
        credits.open("acme", "odd", currency="eur", exponent=2)


# -- the charge stage ------------------------------------------------------------------


def test_a_cost_is_charged_in_the_actions_transaction_and_the_outcome_says_the_balance(gate, alice):
    charter, credits = gate
    assert 10 == credits.grant("acme", 10)
    outcome = charter.execute(alice, "credits.spend", {"amount": 3})
    assert 7 == outcome.balance
    assert 7 == credits.balance("acme")
    rows = ledger_rows(charter)
    assert ["grant", "charge"] == [r.kind for r in rows]
    assert ("credits.spend", 3) == (rows[1].action, rows[1].amount)
    assert credits.verify().ok
    assert "charge" in charter.pipeline_of("credits.spend").names


def test_a_balance_that_does_not_cover_refuses_with_402_and_charges_nothing(gate, alice):
    charter, credits = gate
    credits.grant("acme", 2)
    with pytest.raises(InsufficientCredits) as caught:
        charter.execute(alice, "credits.spend", {"amount": 3})
    assert (402, "insufficient_credits") == (caught.value.status, caught.value.code)
    assert 2 == credits.balance("acme")
    with charter.engine.connect() as c:
        outcomes = c.execute(
            select(audit_table.c.outcome).where(audit_table.c.action == "credits.spend")
        ).scalars()
        assert ["insufficient_credits"] == list(outcomes)
    assert credits.verify().ok


@pytest.mark.parametrize("bad", [0, -5, 10**16])
def test_a_computed_cost_that_is_no_amount_is_422_and_writes_nothing(gate, alice, bad):
    charter, credits = gate
    credits.grant("acme", 5)
    with pytest.raises(InvalidAmount):
        charter.execute(alice, "credits.spend", {"amount": bad})
    assert 5 == credits.balance("acme")
    assert 1 == len(ledger_rows(charter))


@pytest.mark.parametrize("fail", ["domain", "crash"])
def test_a_failed_action_charges_nothing_keyed_or_not(gate, alice, fail):
    charter, credits = gate
    credits.grant("acme", 5)
    for key in (None, f"k-{fail}"):
        with pytest.raises(Refused if fail == "domain" else HandlerFailed):
            charter.execute(alice, "credits.consume", {"fail": fail}, key=key)
    assert 5 == credits.balance("acme")
    assert ["grant"] == [r.kind for r in ledger_rows(charter)]
    assert credits.verify().ok


def test_a_replayed_action_is_charged_once_and_answers_the_original_balance(gate, alice, clock):
    charter, credits = gate
    credits.grant("acme", 5)
    first = charter.execute(alice, "credits.consume", {}, key="once")
    again = charter.execute(alice, "credits.consume", {}, key="once")
    assert (4, False) == (first.balance, first.replayed)
    assert (4, True) == (again.balance, again.replayed)
    charter.execute(alice, "credits.consume", {}, key="twice")
    # Another process (no cached outcome) replays from the stored outcome: the same balance.
    cold, _ = build(charter.engine.url.render_as_string(hide_password=False), clock)
    try:
        replayed = cold.execute(alice, "credits.consume", {}, key="once")
        assert (4, True) == (replayed.balance, replayed.replayed)
    finally:
        cold.engine.dispose()
    assert 3 == credits.balance("acme")
    assert ["grant", "charge", "charge"] == [r.kind for r in ledger_rows(charter)]


def test_a_refund_is_a_ledger_movement_and_happens_once(gate, alice):
    charter, credits = gate
    credits.grant("acme", 5)
    charter.execute(alice, "credits.spend", {"amount": 2})
    charge = ledger_rows(charter)[-1]
    assert 5 == credits.refund("acme", charge.id)
    with pytest.raises(Conflict):
        credits.refund("acme", charge.id)
    with pytest.raises(Exception, match="no charge"):
        credits.refund("globex", charge.id)  # another tenant's movement is not found
    assert ["grant", "charge", "refund"] == [r.kind for r in ledger_rows(charter)]
    assert credits.verify().ok


def test_cost_and_tags_are_declared_with_the_action(gate):
    charter, _ = gate
    assert {"financial"} == charter.spec("credits.consume").tags
    assert {"irreversible"} == charter.spec("message.send").tags
    assert frozenset() == charter.spec("report.export").tags
    with pytest.raises(ConfigurationError, match="unknown tag"):
        charter.action("x.y", allow=True, tags={"financal"})(lambda *a: None)
    for bad in (0, -1, True, 1.5, "5"):
        with pytest.raises(ConfigurationError):
            charter.action(f"x.cost{abs(hash(str(bad))) % 1000}", allow=True, cost=bad)(
                lambda *a: None
            )
    with pytest.raises(ConfigurationError):
        Cost(1, account="Bad Name")


def test_an_action_without_a_cost_has_no_charge_stage(gate):
    charter, _ = gate
    assert "charge" not in charter.pipeline_of("message.send").names


# -- quotas ----------------------------------------------------------------------------


def test_a_period_quota_counts_per_tenant_and_starts_again_next_period(database_url, clock):
    charter, _ = build(database_url, clock)
    alice, eve = Actor.make("alice", "acme"), Actor.make("eve", "globex")
    try:
        lefts = [charter.execute(alice, "report.export").balance for _ in range(COVERED)]
        assert list(range(COVERED - 1, -1, -1)) == lefts
        with pytest.raises(QuotaExceeded) as caught:
            charter.execute(alice, "report.export")
        assert (429, "quota_exceeded") == (caught.value.status, caught.value.code)
        assert str(12 * 3600 + 1) == caught.value.headers["Retry-After"]
        assert COVERED - 1 == charter.execute(eve, "report.export").balance  # own counter
        clock.now += timedelta(days=1)
        assert COVERED - 1 == charter.execute(alice, "report.export").balance
    finally:
        charter.engine.dispose()


def test_a_quota_is_validated_at_declaration():
    for bad in ({"limit": 0}, {"limit": True}, {"per": "week"}, {"name": "Bad name"},
                {"uses": 6}):  # fmt: skip
        with pytest.raises(ConfigurationError):
            Quota(**{"name": "exports", "limit": 5, **bad})


# -- holds -----------------------------------------------------------------------------


def test_a_hold_is_captured_when_the_sender_confirms(gate, alice):
    charter, credits = gate
    credits.grant("acme", 10)
    body = charter.execute(alice, "message.send", {"amount": 4}).body
    assert body["sent"]
    assert 6 == credits.balance("acme")
    assert 0 == credits.balance("acme", "credits@held")
    assert 4 == credits.balance("acme", "credits@spent")
    assert ["grant", "hold", "capture"] == [r.kind for r in ledger_rows(charter)]
    assert credits.verify().ok


def test_a_hold_is_released_when_the_sender_fails(gate, alice):
    charter, credits = gate
    credits.grant("acme", 10)
    assert not charter.execute(alice, "message.send", {"amount": 4, "fail": "sender"}).body["sent"]
    assert 10 == credits.balance("acme")
    assert ["grant", "hold", "release"] == [r.kind for r in ledger_rows(charter)]


def test_a_hold_that_does_not_fit_refuses_and_reserves_nothing(gate, alice):
    charter, credits = gate
    credits.grant("acme", 3)
    with pytest.raises(InsufficientCredits):
        charter.execute(alice, "message.send", {"amount": 4})
    assert 3 == credits.balance("acme")
    with charter.engine.connect() as c:
        assert 0 == c.execute(select(func.count()).select_from(holds_table)).scalar_one()


def _reserve(charter: Charter, credits: Credits, alice: Actor, amount: int) -> Any:
    """A hold made in a transaction of its own, as a request that then crashed leaves it."""
    held: list[Any] = []

    @charter.action(f"message.reserve{amount}", allow=True)
    def reserve(ctx: Any, record: Any, data: Any) -> dict[str, Any]:
        held.append(credits.hold(ctx, amount, expires_in=timedelta(minutes=5)))
        return {}

    charter.execute(alice, f"message.reserve{amount}")
    return held[0]


def test_an_expired_hold_is_released_by_the_sweep_and_cannot_be_captured(gate, alice, clock):
    charter, credits = gate
    credits.grant("acme", 10)
    hold = _reserve(charter, credits, alice, 4)
    assert 6 == credits.balance("acme")
    assert 0 == credits.sweep()  # not expired yet
    clock.now += timedelta(minutes=5)
    assert 1 == credits.sweep()
    assert 0 == credits.sweep()  # once
    assert 10 == credits.balance("acme")
    captured: list[Any] = []

    @charter.action("message.late", allow=True)
    def late(ctx: Any, record: Any, data: Any) -> dict[str, Any]:
        captured.append(credits.capture(ctx, hold))
        return {}

    with pytest.raises(HoldExpired) as caught:
        charter.execute(alice, "message.late")
    assert 409 == caught.value.status
    assert [] == captured
    assert 10 == credits.balance("acme")
    with charter.engine.connect() as c:
        assert "expired" == c.execute(select(holds_table.c.state)).scalar_one()
    assert credits.verify().ok


def test_a_charge_that_only_an_expired_hold_blocks_releases_it_and_succeeds(gate, alice, clock):
    charter, credits = gate
    credits.grant("acme", 10)
    _reserve(charter, credits, alice, 8)
    with pytest.raises(InsufficientCredits):
        charter.execute(alice, "credits.spend", {"amount": 5})  # the hold is still live
    clock.now += timedelta(minutes=5)
    assert 5 == charter.execute(alice, "credits.spend", {"amount": 5}).balance
    with charter.engine.connect() as c:
        assert "expired" == c.execute(select(holds_table.c.state)).scalar_one()
    assert credits.verify().ok


def test_a_capture_after_expiry_fails_closed_even_before_the_sweep(gate, alice, clock):
    charter, credits = gate
    credits.grant("acme", 10)
    hold = _reserve(charter, credits, alice, 4)
    clock.now += timedelta(minutes=6)

    @charter.action("message.late", allow=True)
    def late(ctx: Any, record: Any, data: Any) -> dict[str, Any]:
        credits.capture(ctx, hold)
        return {}

    with pytest.raises(HoldExpired):
        charter.execute(alice, "message.late")
    assert 0 == credits.balance("acme", "credits@spent")
    # The next hold of the account releases the expired one first (lazily).
    _reserve(charter, credits, alice, 1)
    assert 9 == credits.balance("acme")
    assert 1 == credits.balance("acme", "credits@held")


def test_a_hold_must_outlive_the_recovery_lease(gate, alice):
    charter, credits = gate
    credits.grant("acme", 10)

    @charter.action("message.short", allow=True)
    def short(ctx: Any, record: Any, data: Any) -> dict[str, Any]:
        credits.hold(ctx, 1, expires_in=timedelta(seconds=30))
        return {}

    with pytest.raises(ConfigurationError, match="outlive the recovery lease"):
        charter.execute(alice, "message.short")
    assert 10 == credits.balance("acme")


def test_a_keyed_request_finds_its_own_hold_again(gate, alice):
    """What a resume relies on: the same key and hold name give the same hold, reserved once."""
    charter, credits = gate
    credits.grant("acme", 10)
    seen: list[Any] = []

    @charter.action("message.twice", allow=True)
    def twice(ctx: Any, record: Any, data: Any) -> dict[str, Any]:
        seen.append(credits.hold(ctx, 4, expires_in=timedelta(minutes=5)))
        seen.append(credits.hold(ctx, 4, expires_in=timedelta(minutes=5)))
        return {}

    charter.execute(alice, "message.twice", key="k1")
    assert seen[0] == seen[1]
    assert 6 == credits.balance("acme")


def test_a_hold_that_does_not_fit_leaves_nothing_even_when_the_handler_catches_the_402(
    gate, alice, clock
):
    charter, credits = gate
    credits.grant("acme", 10)
    real = _reserve(charter, credits, alice, 9)

    @charter.action("message.maybe", allow=True)
    def maybe(ctx: Any, record: Any, data: Any) -> dict[str, Any]:
        try:
            credits.hold(ctx, 5, expires_in=timedelta(minutes=1))
        except InsufficientCredits:
            return {"sent": False}
        return {"sent": True}

    assert {"sent": False} == charter.execute(alice, "message.maybe").body  # committed
    with charter.engine.connect() as c:
        assert [real.id] == c.execute(select(holds_table.c.id)).scalars().all()
    assert ["grant", "hold"] == [r.kind for r in ledger_rows(charter)]
    clock.now += timedelta(minutes=2)  # past the refused hold's expiry
    assert 0 == credits.sweep()
    assert 9 == credits.balance("acme", "credits@held")
    assert 9 == _capture(charter, credits, alice, real)
    assert credits.verify().ok


def _capture(charter: Charter, credits: Credits, actor: Actor, hold: Any) -> Any:
    """Capture ``hold`` in an action run by ``actor``: its amount, or the error."""
    name = f"message.capture{len(charter.actions)}"

    @charter.action(name, allow=True)
    def capture(ctx: Any, record: Any, data: Any) -> dict[str, Any]:
        try:
            return {"captured": credits.capture(ctx, hold)}
        except HoldExpired as exc:
            return {"refused": exc.code}

    body = charter.execute(actor, name).body
    return body.get("captured", body.get("refused"))


def _unbacked_hold(charter: Charter, tenant: str, amount: int, expires_at: datetime) -> None:
    """A pending hold with nothing on ``@held`` for it, as earlier versions could leave one."""
    with charter.engine.begin() as c:
        c.execute(
            holds_table.insert().values(
                tenant=tenant, account="credits", reference=f"phantom-{tenant}", amount=amount,
                state="pending", created_at=expires_at, expires_at=expires_at,
            )
        )  # fmt: skip


def test_the_sweep_sets_aside_a_hold_it_cannot_release_and_releases_the_others(gate, alice, clock):
    charter, credits = gate
    credits.open("other")
    credits.grant("other", 10)
    bob = Actor.make("bob", "other")
    _reserve(charter, credits, bob, 4)
    _unbacked_hold(charter, "acme", 50, clock.now + timedelta(minutes=1))
    assert {("held", "acme/credits@held")} == {
        (p.kind, p.subject) for p in credits.verify().problems
    }
    clock.now += timedelta(minutes=5)
    assert 1 == credits.sweep()
    assert 10 == credits.balance("other")
    with charter.engine.connect() as c:
        states = dict(c.execute(select(holds_table.c.tenant, holds_table.c.state)).all())
    assert {"other": "expired", "acme": "unreleasable"} == states
    assert 0 == credits.sweep()  # set aside, not tried again
    assert credits.verify().ok


def test_a_charge_is_not_blocked_by_an_expired_hold_that_cannot_be_released(gate, alice, clock):
    charter, credits = gate
    credits.grant("acme", 10)
    _reserve(charter, credits, alice, 8)
    _unbacked_hold(charter, "acme", 50, clock.now + timedelta(minutes=1))
    clock.now += timedelta(minutes=5)
    with charter.engine.connect() as c:
        audited = c.execute(select(func.count()).select_from(audit_table)).scalar_one()
    assert 5 == charter.execute(alice, "credits.spend", {"amount": 5}).balance
    with charter.engine.connect() as c:
        assert audited + 1 == c.execute(select(func.count()).select_from(audit_table)).scalar_one()
    assert 0 == credits.balance("acme", "credits@held")


@pytest.mark.parametrize("claimed", ["evil", "acme"])
def test_a_hold_is_settled_only_by_its_own_tenant(gate, alice, claimed):
    """Another tenant's hold is an unknown hold, whatever the Hold it rebuilds says."""
    charter, credits = gate
    credits.grant("acme", 10)
    credits.open("evil")
    hold = _reserve(charter, credits, alice, 7)
    forged = Hold(hold.id, claimed, "credits", 7, "pending", hold.expires_at)
    mallory = Actor.make("mallory", "evil")
    assert "hold_expired" == _capture(charter, credits, mallory, forged)
    released: list[bool] = []

    @charter.action("message.cancel", allow=True)
    def cancel(ctx: Any, record: Any, data: Any) -> dict[str, Any]:
        released.append(credits.release(ctx, forged))
        return {}

    charter.execute(mallory, "message.cancel")
    assert [False] == released
    assert 7 == credits.balance("acme", "credits@held")
    assert 0 == credits.balance("evil", "credits@held")
    # Any actor of acme's own (a later request, a system actor) may settle it.
    assert 7 == _capture(charter, credits, Actor.make("sender", "acme"), hold)
    assert credits.verify().ok


# -- verification ----------------------------------------------------------------------


def test_verify_names_the_account_whose_balance_disagrees_with_the_ledger(gate, alice):
    charter, credits = gate
    credits.grant("acme", 10)
    charter.execute(alice, "credits.consume")
    assert credits.verify().ok
    with charter.engine.begin() as c:
        c.execute(
            update(accounts_table)
            .where(accounts_table.c.name == "credits")
            .values(balance=accounts_table.c.balance + 100)
        )
    report = credits.verify()
    assert not report.ok
    subjects = {(p.kind, p.subject) for p in report.problems}
    assert ("balance", "acme/credits") in subjects
    assert ("sum", "CREDIT") in subjects


def test_verify_names_a_balance_that_is_not_a_whole_number(gate, alice):
    """SQLite stores ``7.9`` as a REAL in the integer column; PostgreSQL rounds it to 8."""
    charter, credits = gate
    credits.grant("acme", 10)
    charter.execute(alice, "credits.consume", {"amount": 3})
    with charter.engine.begin() as c:
        c.execute(text("UPDATE charter_credit_accounts SET balance = 9.9 WHERE name = 'credits'"))
    assert ("balance", "acme/credits") in {(p.kind, p.subject) for p in credits.verify().problems}


def _drop_account(charter: Charter, name: str) -> None:
    """Delete an account behind the foreign keys' back, as tampering would."""
    if charter.runtime.postgres:
        with charter.engine.begin() as c:
            c.execute(text("SET LOCAL session_replication_role = replica"))
            c.execute(accounts_table.delete().where(accounts_table.c.name == name))
        return
    raw = sqlite3.connect(str(charter.engine.url.database), isolation_level=None)
    try:
        raw.execute("PRAGMA foreign_keys = OFF")
        raw.execute("DELETE FROM charter_credit_accounts WHERE name = ?", (name,))
    finally:
        raw.close()


def test_verify_names_the_missing_account_that_movements_point_at(gate, alice):
    charter, credits = gate
    credits.grant("acme", 10)
    charter.execute(alice, "message.send", {"amount": 2, "fail": "sender"})  # hold, release
    with charter.engine.connect() as c:
        held = c.execute(
            select(accounts_table.c.id).where(accounts_table.c.name == "credits@held")
        ).scalar_one()
    _drop_account(charter, "credits@held")
    report = credits.verify()
    assert [("missing", f"account #{held}")] == [(p.kind, p.subject) for p in report.problems]
    assert "2 movements" in report.problems[0].detail


def test_verify_names_a_bounded_number_of_missing_accounts(gate, monkeypatch):
    charter, credits = gate
    for tenant in ("a1", "a2", "a3"):
        credits.open(tenant)
        credits.grant(tenant, 1)
    _drop_account(charter, "credits@issued")
    monkeypatch.setattr(verification, "SHOWN", 2)
    problems = [p.subject for p in credits.verify().problems if p.kind == "missing"]
    assert 3 == len(problems)
    assert "more accounts" == problems[-1]


@pytest.mark.parametrize("change", ["update", "delete"])
def test_the_database_refuses_to_change_or_delete_a_ledger_row(gate, alice, change):
    charter, credits = gate
    credits.grant("acme", 10)
    charter.execute(alice, "credits.consume")
    rows = ledger_rows(charter)
    statement = (
        update(ledger_table).values(amount=ledger_table.c.amount + 1)
        if change == "update"
        else ledger_table.delete()
    )
    with pytest.raises(Exception, match="append-only"), charter.engine.begin() as c:
        c.execute(statement)
    assert rows == ledger_rows(charter)
    assert credits.verify().ok


# -- races (PostgreSQL, exact) ---------------------------------------------------------


def _count_consumers(charter: Charter, action: str, actor: Actor, n: int, start: Any) -> int:
    refused = (InsufficientCredits, QuotaExceeded)

    def one() -> int:
        start.wait()
        try:
            charter.execute(actor, action)
        except refused:
            return 0
        return 1

    with ThreadPoolExecutor(n) as pool:
        return sum(f.result() for f in [pool.submit(one) for _ in range(n)])


def _process(url: str, action: str, n: int, start: Any, results: Any) -> None:
    charter, _ = build(url, datetime_clock(), pool=3)
    try:
        results.put(_count_consumers(charter, action, Actor.make("alice", "acme"), n, start))
    finally:
        charter.engine.dispose()


def _pg(pg_schema: str) -> tuple[Charter, Credits]:
    from .conftest import _truncate_pg

    _truncate_pg(pg_schema)
    return build(pg_schema, datetime_clock())


def datetime_clock() -> Any:
    return lambda: datetime.now(UTC)


def _assert_exact(charter: Charter, credits: Credits, action: str, successes: int) -> None:
    assert COVERED == successes
    if action == "credits.consume":
        assert 0 == credits.balance("acme")
        assert COVERED == credits.balance("acme", "credits@spent")
        with charter.engine.connect() as c:
            kinds = c.execute(select(ledger_table.c.kind, func.count()).group_by("kind")).all()
        assert {("grant", 1), ("charge", COVERED)} == set(kinds)
        report = credits.verify()
        assert report.ok, report.problems
    else:
        with charter.engine.connect() as c:
            assert COVERED == c.execute(select(quota_table.c.used)).scalar_one()


@pytest.mark.postgres
@pytest.mark.parametrize("action", ["credits.consume", "report.export"])
def test_200_threads_against_what_covers_50_give_exactly_50(pg_schema, action):
    charter, credits = _pg(pg_schema)
    try:
        credits.open("acme")
        credits.grant("acme", COVERED)
        successes = _count_consumers(
            charter, action, Actor.make("alice", "acme"), CONSUMERS, threading.Barrier(CONSUMERS)
        )
        _assert_exact(charter, credits, action, successes)
    finally:
        charter.engine.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("action", ["credits.consume", "report.export"])
def test_200_consumers_in_8_processes_against_what_covers_50_give_exactly_50(pg_schema, action):
    charter, credits = _pg(pg_schema)
    processes = 8
    try:
        credits.open("acme")
        credits.grant("acme", COVERED)
        ctx = multiprocessing.get_context("spawn")
        start, results = ctx.Barrier(CONSUMERS), ctx.Queue()
        procs = [
            ctx.Process(
                target=_process, args=(pg_schema, action, CONSUMERS // processes, start, results)
            )
            for _ in range(processes)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(180)
        assert [0] * processes == [p.exitcode for p in procs]
        successes = sum(results.get(timeout=5) for _ in procs)
        _assert_exact(charter, credits, action, successes)
    finally:
        charter.engine.dispose()


@pytest.mark.postgres
def test_concurrent_refunds_and_charges_of_one_account_never_deadlock(pg_schema):
    """A refund moves @spent -> account, a charge account -> @spent: one lock order for both."""
    charter, credits = _pg(pg_schema)
    alice, rounds = Actor.make("alice", "acme"), 60
    try:
        credits.open("acme")
        credits.grant("acme", 10 * rounds)
        for _ in range(rounds):
            charter.execute(alice, "credits.spend", {"amount": 1})
        charges = [r.id for r in ledger_rows(charter) if r.kind == "charge"]
        start = threading.Barrier(8)

        def refunds(share: list[int]) -> int:
            start.wait()
            for movement in share:
                credits.refund("acme", movement)
            return len(share)

        def spends(n: int) -> int:
            start.wait()
            for _ in range(n):
                charter.execute(alice, "credits.spend", {"amount": 1})
            return n

        with ThreadPoolExecutor(8) as pool:
            done = [pool.submit(refunds, charges[i::4]) for i in range(4)]
            done += [pool.submit(spends, rounds // 4) for _ in range(4)]
            assert 2 * rounds == sum(f.result(timeout=120) for f in done)
        with charter.engine.connect() as c:
            counted = select(ledger_table.c.kind, func.count()).group_by("kind")
            kinds = dict(c.execute(counted).all())
        assert {"grant": 1, "charge": 2 * rounds, "refund": rounds} == kinds
        assert 10 * rounds - rounds == credits.balance("acme")
        assert credits.verify().ok
    finally:
        charter.engine.dispose()


def test_the_tables_refuse_an_overdraft_even_without_the_condition(gate):
    charter, credits = gate
    with pytest.raises(Exception), charter.engine.begin() as c:  # noqa: PT011
        c.execute(text("UPDATE charter_credit_accounts SET balance = -1 WHERE name = 'credits'"))
    assert 0 == credits.balance("acme")


# -- the CLI ---------------------------------------------------------------------------


def test_charter_credits_verify_names_the_account_that_disagrees(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from charter.cli import app
    from charter.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("CHARTER_ENV", "development")
    monkeypatch.setenv("CHARTER_DATABASE_URL", url)
    engine = make_engine(url)
    try:
        upgrade(engine)
        credits = Credits(engine, clock=Clock())
        credits.open("acme")
        credits.grant("acme", 7)
        runner = CliRunner()
        result = runner.invoke(app, ["credits", "verify"])
        assert 0 == result.exit_code, result.output
        assert "balanced: 4 accounts, 1 movements, 0 problems" in result.output
        with engine.begin() as c:
            c.execute(update(accounts_table).values(balance=accounts_table.c.balance + 1))
        result = runner.invoke(app, ["credits", "verify", "--json"])
        assert 1 == result.exit_code
        assert "acme/credits" in result.output
        assert "acme/credits@issued" in result.output
        assert 0 == runner.invoke(app, ["credits", "sweep"]).exit_code
    finally:
        engine.dispose()


# -- statements, and a resumed request ---------------------------------------------------


def test_a_charge_costs_one_statement_on_postgresql(gate, alice):
    from sqlalchemy import event

    charter, credits = gate
    credits.grant("acme", 5)
    charter.execute(alice, "credits.consume")  # warm
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(charter.engine, "before_cursor_execute", seen)
    try:
        charter.execute(alice, "credits.consume")
    finally:
        event.remove(charter.engine, "before_cursor_execute", seen)
    if charter.runtime.postgres:
        # The debit, the credit and the ledger row as one statement; the audit INSERT.
        assert 2 == len(statements)
    else:
        # BEGIN IMMEDIATE; debit; credit; ledger row; audit INSERT.
        assert 5 == len(statements)


def test_a_request_resumed_after_its_outside_step_failed_is_charged_once(gate, alice):
    charter, credits = gate
    credits.grant("acme", 5)
    calls: list[str] = []

    @charter.action("credits.outside", allow=True, cost=2, idempotency="required")
    def outside(ctx: Any, record: Any, data: Any) -> dict[str, Any]:
        def step(key: str) -> str:
            calls.append(key)
            if len(calls) == 1:
                raise RuntimeError("the provider did not answer")
            return "done"

        return {"result": ctx.external("step", step)}

    with pytest.raises(HandlerFailed):
        charter.execute(alice, "credits.outside", key="r1")
    assert 3 == credits.balance("acme")  # charged with the first phase, which committed
    outcome = charter.execute(alice, "credits.outside", key="r1")  # resumes at once
    assert {"result": "done"} == outcome.body
    assert [calls[0], calls[0]] == calls  # the same derived key
    assert 3 == credits.balance("acme")
    assert ["grant", "charge"] == [r.kind for r in ledger_rows(charter)]
    assert credits.verify().ok
