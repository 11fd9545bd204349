"""Explanations name a secret operand but never show its value: they reach the audit trail and logs.

A denial's explanation (``Decision.reason``, ``Decision.failed``) is written to
the audit entry's ``detail`` and, when a rule fails closed, to the log. An
operand whose name looks secret (``R.pin``, ``C.input.password``: the names
:mod:`charter.redaction` calls secret) or whose value is a ``SecretStr`` is
shown as ``***``; the operator and the operand's name still say which
condition failed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, SecretStr
from sqlalchemy import select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from charter import Actor, Charter, Forbidden
from charter.audit import audit_table
from charter.decision import DecisionKind
from charter.migrate import upgrade
from charter.policy import A, C, PolicySet, R
from charter.resources import ResourceSpec
from charter.storage import make_engine

from ..conftest import AUDIT_KEYS
from .conftest import make_ctx

PIN, GUESS = "8413", "0000"


class Base(DeclarativeBase):
    pass


class Card(Base):
    __tablename__ = "policy_secret_cards"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.String(20))
    pin: Mapped[str] = mapped_column(sa.String(16))
    label: Mapped[str] = mapped_column(sa.String(20), default="gift")


class Redeem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pin: str
    code: SecretStr = SecretStr("s3cr3t-code")
    note: str = "hello"


CARDS = ResourceSpec.declare(Card, name="card", tenant="tenant_id")
MEMBER = Actor.make("alice", "acme", roles={"member"})


def decide(rule: Any, data: Redeem) -> Any:
    policy = PolicySet()
    policy.allow("card.redeem", rule, name="pin-matches")
    compiled = policy.compile(resource=CARDS, action="card.redeem")
    card = Card(id=1, tenant_id="acme", pin=PIN, label="gift")
    return compiled.decide(MEMBER, card, make_ctx(MEMBER, "card.redeem", input=data))


def test_a_secret_column_and_a_secret_input_are_named_with_their_values_masked() -> None:
    decision = decide(R.pin == C.input.pin, Redeem(pin=GUESS))
    assert ("R.pin *** == C.input.pin *** is false",) == decision.failed
    assert "R.pin *** == C.input.pin ***" in decision.reason
    assert PIN not in decision.reason
    assert GUESS not in decision.reason


def test_a_secretstr_value_is_masked_whatever_its_operand_is_called() -> None:
    decision = decide(R.label == C.input.code, Redeem(pin=GUESS))
    assert ("R.label 'gift' == C.input.code *** is false",) == decision.failed


def test_other_operands_still_show_their_values() -> None:
    decision = decide(R.label == C.input.note, Redeem(pin=GUESS))
    assert ("R.label 'gift' == C.input.note 'hello' is false",) == decision.failed


def test_a_rule_that_fails_closed_names_the_secret_operand_without_its_value() -> None:
    decision = decide(R.pin < A.limit, Redeem(pin=GUESS))  # str < None: TypeError
    assert DecisionKind.ERROR is decision.kind
    assert "at R.pin *** < A.limit None: TypeError" in decision.reason
    assert PIN not in decision.reason


# -- through the gate: the audit entry and the log ------------------------------------------------


@pytest.fixture
def charter(tmp_path: Path) -> Any:
    url = f"sqlite:///{tmp_path / 'cards.db'}"
    engine = make_engine(url)
    upgrade(engine)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(Card), [{"id": 1, "tenant_id": "acme", "pin": PIN}])
    engine.dispose()
    instance = Charter(database_url=url, audit_keys=AUDIT_KEYS, audit_anchor="none")
    instance.resource(Card, tenant="tenant_id", conceal=False)
    yield instance
    instance.close()


def details(charter: Charter) -> list[dict[str, Any]]:
    with charter.engine.connect() as conn:
        return [dict(d) for d in conn.execute(select(audit_table.c.detail)).scalars()]


def test_a_denied_guess_leaves_neither_the_pin_nor_the_guess_in_its_audit_entry(charter) -> None:
    @charter.action("card.redeem", on=Card, input=Redeem, scope="cards:write",
                    allow=A.has_role("member") & (R.pin == C.input.pin))  # fmt: skip
    def redeem(ctx: Any, card: Card, data: Redeem) -> dict[str, int]:
        return {"id": card.id}

    with pytest.raises(Forbidden):
        charter.execute(MEMBER, "card.redeem", {"pin": GUESS}, target=1)
    (detail,) = details(charter)
    assert ["R.pin *** == C.input.pin *** is false"] == detail["failed"]
    assert PIN not in str(detail)
    assert GUESS not in str(detail)


def test_a_rule_failing_closed_logs_and_audits_no_secret(charter, caplog) -> None:
    @charter.action("card.redeem", on=Card, input=Redeem, scope="cards:write",
                    allow=A.has_role("member") & (R.pin < A.limit))  # fmt: skip
    def redeem(ctx: Any, card: Card, data: Redeem) -> dict[str, int]:
        return {"id": card.id}

    with caplog.at_level(logging.ERROR, logger="charter"), pytest.raises(Forbidden):
        charter.execute(MEMBER, "card.redeem", {"pin": GUESS}, target=1)
    assert "R.pin *** < A.limit None" in caplog.text
    (detail,) = details(charter)
    assert PIN not in caplog.text
    assert PIN not in str(detail)


def test_a_composite_value_shows_only_its_type():
    """A rule over a nested input printed the whole object (Payment(number='4111…',
    pin='9999')) into the explanation, the audit entry and the log."""
    from charter.policy.expr import C, show_operand

    class Payment(BaseModel):
        number: str
        pin: str

    payment = Payment(number="4111111111111111", pin="9999")
    assert "C.input.card <Payment>" == show_operand(C.input.card, payment)
    assert "4111" not in show_operand(C.input.card, {"number": "4111111111111111"})
    assert "C.input.tags ['a', 'b']" == show_operand(C.input.tags, ["a", "b"])  # still shown
