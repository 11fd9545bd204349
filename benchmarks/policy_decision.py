"""Benchmark one policy decision: Charter vs a hand-written function, pycasbin and cedarpy.

The rule: an approver of the invoice's tenant may approve a submitted invoice
whose amount is within their approval limit, unless they created it. Every
engine is first checked against the same truth table (exit 1 on mismatch),
then timed with ``timeit`` (best of several repeats, per call in µs; the
engines take turns repeat by repeat, so a drifting machine slows them alike).
Each engine gets the application's own objects and does what an application
must do per request (casbin: role links held by the enforcer, request objects
built per call; cedarpy: policies parsed once, entities built per request).

Charter is timed twice: ``is_allowed`` (the boolean) and ``decide`` (the
explained :class:`~charter.decision.Decision`, the path ``Charter.execute``
takes), allowed and denied. Two floors:

- ``plain_floor``: the same logic as a plain function over plain objects (slotted
  dataclasses, a ``Decimal`` limit attribute), the least any Python check costs;
- ``floor``: the same function over Charter's ``Actor`` (subject resolution,
  attributes mapping) and the ORM ``Invoice`` (instrumented attributes), i.e.
  what the objects an application already holds cost to read.

``charter_plain_objects`` runs Charter's ``is_allowed`` over plain objects too,
which separates the engine's own cost from the cost of reading the objects.

No target: the figures are printed as measured.

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


@dataclass(frozen=True, slots=True)
class PlainActor:
    id: str
    tenant: str
    roles: frozenset[str]
    approval_limit: Decimal


@dataclass(slots=True)
class PlainInvoice:
    id: int
    tenant_id: str
    state: str
    amount: Decimal
    created_by: str


def plain_floor(actor: PlainActor, invoice: PlainInvoice) -> bool:
    """The rule as a developer would write it over their own plain objects."""
    return (
        invoice.tenant_id == actor.tenant
        and "approver" in actor.roles
        and invoice.state == "submitted"
        and invoice.amount <= actor.approval_limit
        and invoice.created_by != actor.id
    )


@dataclass(frozen=True, slots=True)
class PlainCharterActor:
    """The fields Charter's generated check reads, on a plain object (no Actor)."""

    id: str
    tenant: str
    roles: frozenset[str]
    attributes: dict[str, Any]
    on_behalf_of: None = None


def plain(actor: Actor, invoice: Invoice) -> tuple[PlainActor, PlainInvoice]:
    subject = actor.subject
    return (
        PlainActor(subject.id, subject.tenant, subject.roles, subject.attributes["approval_limit"]),
        PlainInvoice(
            invoice.id, invoice.tenant_id, invoice.state, invoice.amount, invoice.created_by
        ),
    )


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


def best_us_interleaved(fns: dict[str, tuple[Any, int]], repeat: int) -> dict[str, float]:
    """Best per-call µs of each ``(fn, number)``; every repeat runs all of them, order rotating."""
    names = list(fns)
    best = {name: float("inf") for name in names}
    for r in range(repeat):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn, number = fns[name]
            best[name] = min(best[name], timeit.timeit(fn, number=number) / number * 1e6)
    return best


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
    engines["plain_floor"] = lambda a, i: plain_floor(*plain(a, i))
    for name, engine in engines.items():
        got = [bool(engine(c.actor, c.invoice)) for c in table]
        expected = [c.expected for c in table]
        if got != expected:
            print(f"{name} fails the truth table: {got} != {expected}", file=sys.stderr)
            return 1

    hot = table[0]  # the allowed case: every condition is evaluated
    deny = table[2]  # a denial (decide explains it on the slow path)
    actor, invoice = hot.actor, hot.invoice
    plain_actor, plain_invoice = plain(actor, invoice)
    charter_plain_actor = PlainCharterActor(
        actor.id, actor.tenant, actor.roles, dict(actor.attributes)
    )
    if not ap.is_allowed(charter_plain_actor, plain_invoice, None):
        print("charter over plain objects disagrees", file=sys.stderr)
        return 1
    casbin_decide, cedar_decide = engines["pycasbin"], engines["cedarpy"]
    slow = max(number // 20, 100)
    timings = best_us_interleaved(
        {
            "plain_floor": (lambda: plain_floor(plain_actor, plain_invoice), number),
            "floor": (lambda: floor(actor, invoice), number),
            "charter": (lambda: ap.is_allowed(actor, invoice, None), number),
            "charter_plain_objects": (
                lambda: ap.is_allowed(charter_plain_actor, plain_invoice, None),
                number,
            ),
            "charter_decide": (lambda: ap.decide(actor, invoice, None), number),
            "charter_decide_denied": (
                lambda: ap.decide(deny.actor, deny.invoice, None),
                max(number // 10, 100),
            ),
            "pycasbin": (lambda: casbin_decide(actor, invoice), slow),
            "cedarpy": (lambda: cedar_decide(actor, invoice), slow),
        },
        repeat,
    )

    base = timings["plain_floor"]
    print(f"{'engine':<24}{'µs/decision':>12}{'x plain floor':>15}{'x floor':>10}")
    for name, us in timings.items():
        print(f"{name:<24}{us:>12.3f}{us / base:>15.2f}{us / timings['floor']:>10.2f}")
    print(
        "plain_floor: plain function, plain dataclasses; floor: the same function over "
        "Charter's Actor and the ORM Invoice; charter: is_allowed; charter_plain_objects: "
        "is_allowed over plain objects; charter_decide: decide (what execute calls), "
        "allowed / denied with its explanation"
    )
    result = {
        "charter_us": round(timings["charter"], 4),
        "charter_decide_us": round(timings["charter_decide"], 4),
        "charter_decide_denied_us": round(timings["charter_decide_denied"], 4),
        "floor_us": round(timings["floor"], 4),
        "pycasbin_us": round(timings["pycasbin"], 4),
        "cedarpy_us": round(timings["cedarpy"], 4),
        "ratio_to_floor": round(timings["charter"] / timings["floor"], 3),
        "plain_floor_us": round(base, 4),
        "is_allowed_ratio_to_plain_floor": round(timings["charter"] / base, 3),
        "decide_ratio_to_plain_floor": round(timings["charter_decide"] / base, 3),
        "decide_ratio_to_floor": round(timings["charter_decide"] / timings["floor"], 3),
        "charter_plain_objects_us": round(timings["charter_plain_objects"], 4),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
