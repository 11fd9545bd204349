"""Benchmark one policy decision: Charter vs a hand-written function, pycasbin and cedarpy.

The rule: an approver of the invoice's tenant may approve a submitted invoice
whose amount is within their approval limit, unless they created it. Every
engine is first checked against the same truth table (exit 1 on mismatch),
then timed with ``timeit`` (best of several repeats, per call in µs). Each
engine gets the application's own objects and does what an application must
do per request (casbin: role links held by the enforcer, request objects
built per call; cedarpy: policies parsed once, entities built per request).

Usage: ``python benchmarks/policy_decision.py [--quick]``. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import timeit
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import _common
import casbin
import cedarpy
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from charter.actor import Actor
from charter.policy import PolicySet
from charter.resources import ResourceSpec


class Base(DeclarativeBase):
    pass


class Invoice(Base):
    __tablename__ = "bench_invoices"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str]
    state: Mapped[str]
    amount: Mapped[Decimal] = mapped_column(sa.Numeric(12, 2))
    created_by: Mapped[str]


# ---------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------


def charter_engine() -> Any:
    spec = ResourceSpec.declare(Invoice, name="invoice", tenant="tenant_id", state="state")
    policy = PolicySet()
    policy.allow(
        "invoice.approve",
        _common.APPROVER_RULE,
        name="approvers-approve",
    )
    return policy.compile(resource=spec, action="invoice.approve", listable=True)


def floor(actor: Actor, invoice: Invoice, ctx: object = None) -> bool:
    subject = actor.subject
    return (
        invoice.tenant_id == subject.tenant
        and "approver" in subject.roles
        and invoice.state == "submitted"
        and invoice.amount <= subject.attributes.get("approval_limit")
        and invoice.created_by != subject.id
    )


CASBIN_MODEL = """
[request_definition]
r = sub, obj, act

[policy_definition]
p = role, act

[role_definition]
g = _, _, _

[policy_effect]
e = some(where (p.eft == allow))

[matchers]
m = r.act == p.act && g(r.sub.id, p.role, r.obj.tenant_id) && r.sub.tenant == r.obj.tenant_id \
&& r.obj.state == "submitted" && r.obj.amount <= r.sub.approval_limit \
&& r.obj.created_by != r.sub.id
"""


def casbin_engine(actors: list[Actor]) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.conf"
        path.write_text(CASBIN_MODEL)
        enforcer = casbin.Enforcer(str(path))
    enforcer.add_policy("approver", "approve")
    for actor in actors:  # per-tenant role links, as an application would sync them
        for role in actor.roles:
            enforcer.add_grouping_policy(actor.id, role, actor.tenant)

    def decide(actor: Actor, invoice: Invoice) -> bool:
        subject = actor.subject
        sub = SimpleNamespace(
            id=subject.id,
            tenant=subject.tenant,
            approval_limit=subject.attributes.get("approval_limit"),
        )
        return bool(enforcer.enforce(sub, invoice, "approve"))

    return decide


CEDAR_POLICY = """
permit(principal, action == Action::"approve", resource)
when {
  principal.tenant == resource.tenant &&
  principal.roles.contains("approver") &&
  resource.state == "submitted" &&
  resource.amount <= principal.approval_limit &&
  resource.created_by != principal.uid
};
"""


def cedar_engine() -> Any:
    policies = cedarpy.PolicySet.from_str(CEDAR_POLICY)  # parsed once
    allow = cedarpy.Decision.Allow

    def cents(value: Decimal) -> int:
        return int(value * 100)  # Cedar has no decimal ordering on Long; compare in cents

    def decide(actor: Actor, invoice: Invoice) -> bool:
        subject = actor.subject
        entities = [
            {
                "uid": {"type": "User", "id": subject.id},
                "attrs": {
                    "uid": subject.id,
                    "tenant": subject.tenant,
                    "roles": sorted(subject.roles),
                    "approval_limit": cents(subject.attributes.get("approval_limit", 0)),
                },
                "parents": [],
            },
            {
                "uid": {"type": "Invoice", "id": str(invoice.id)},
                "attrs": {
                    "tenant": invoice.tenant_id,
                    "state": invoice.state,
                    "amount": cents(invoice.amount),
                    "created_by": invoice.created_by,
                },
                "parents": [],
            },
        ]
        request = {
            "principal": f'User::"{subject.id}"',
            "action": 'Action::"approve"',
            "resource": f'Invoice::"{invoice.id}"',
            "context": {},
        }
        return cedarpy.is_authorized(request, policies, entities).decision == allow

    return decide


# ---------------------------------------------------------------------------------------
# Truth table and timing
# ---------------------------------------------------------------------------------------


@dataclass
class Case:
    actor: Actor
    invoice: Invoice
    expected: bool


def cases() -> list[Case]:
    def inv(**kw: Any) -> Invoice:
        base = {
            "id": 1,
            "tenant_id": "t1",
            "state": "submitted",
            "amount": Decimal("1200.00"),
            "created_by": "u-clerk",
        }
        return Invoice(**{**base, **kw})

    approver = Actor.make(
        "u1", "t1", roles=["approver"], attributes={"approval_limit": Decimal("5000")}
    )
    clerk = Actor.make(
        "u-clerk", "t1", roles=["clerk"], attributes={"approval_limit": Decimal("5000")}
    )
    other = Actor.make(
        "u9", "t2", roles=["approver"], attributes={"approval_limit": Decimal("5000")}
    )
    return [
        Case(approver, inv(), True),
        Case(approver, inv(amount=Decimal("5000.00")), True),
        Case(approver, inv(amount=Decimal("5000.01")), False),
        Case(approver, inv(state="draft"), False),
        Case(approver, inv(created_by="u1"), False),
        Case(clerk, inv(), False),
        Case(other, inv(), False),
    ]


def best_us(fn: Any, number: int, repeat: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller loops (< 60 s)")
    args = parser.parse_args()
    number, repeat = (2_000, 5) if args.quick else (20_000, 7)

    table = cases()
    ap = charter_engine()
    engines: dict[str, Any] = {
        "floor": lambda a, i: floor(a, i),
        "charter": lambda a, i: ap.is_allowed(a, i, None),
        "charter_decide": lambda a, i: ap.decide(a, i, None).allowed,
        "pycasbin": casbin_engine([c.actor for c in table]),
        "cedarpy": cedar_engine(),
    }
    for name, engine in engines.items():
        got = [bool(engine(c.actor, c.invoice)) for c in table]
        expected = [c.expected for c in table]
        if got != expected:
            print(f"{name} fails the truth table: {got} != {expected}", file=sys.stderr)
            return 1

    hot = table[0]  # the allowed case: every condition is evaluated
    deny = table[2]  # a denial (decide explains it on the slow path)
    actor, invoice = hot.actor, hot.invoice
    timings = {
        "floor": best_us(lambda: floor(actor, invoice), number, repeat),
        "charter": best_us(lambda: ap.is_allowed(actor, invoice, None), number, repeat),
        "charter_decide": best_us(lambda: ap.decide(actor, invoice, None), number, repeat),
        "charter_decide_denied": best_us(
            lambda: ap.decide(deny.actor, deny.invoice, None), max(number // 10, 100), repeat
        ),
    }
    casbin_decide, cedar_decide = engines["pycasbin"], engines["cedarpy"]
    slow = max(number // 20, 100)
    timings["pycasbin"] = best_us(lambda: casbin_decide(actor, invoice), slow, repeat)
    timings["cedarpy"] = best_us(lambda: cedar_decide(actor, invoice), slow, repeat)

    print(f"{'engine':<24}{'µs/decision':>12}{'x floor':>10}")
    for name, us in timings.items():
        print(f"{name:<24}{us:>12.3f}{us / timings['floor']:>10.2f}")
    result = {
        "charter_us": round(timings["charter"], 4),
        "charter_decide_us": round(timings["charter_decide"], 4),
        "charter_decide_denied_us": round(timings["charter_decide_denied"], 4),
        "floor_us": round(timings["floor"], 4),
        "pycasbin_us": round(timings["pycasbin"], 4),
        "cedarpy_us": round(timings["cedarpy"], 4),
        "ratio_to_floor": round(timings["charter"] / timings["floor"], 3),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
