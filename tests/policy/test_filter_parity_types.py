"""The SQL filter selects exactly what the Python decision allows, whatever the column's type.

Numbers compare exactly in Python (``Decimal("1000.30") <= 1000.3`` is false); NaN
is never equal and orders as false or raises; an aware datetime read back
naive from SQLite is UTC; a text column with a case-insensitive collation
still compares by code point. Each case runs on SQLite and PostgreSQL, through
both compilers (``where``'s literals and ``bound_where``'s named parameters),
and with the condition negated, so both sides of every comparison are checked.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from charter.actor import Actor
from charter.policy import A, PolicySet, R, filter_disagreements
from charter.policy.expr import Condition
from charter.resources import ResourceSpec

from .conftest import _pg_engine


class Base(DeclarativeBase):
    pass


class Measure(Base):
    __tablename__ = "policy_parity_measures"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.String(20))
    amount: Mapped[Decimal | None] = mapped_column(sa.Numeric(12, 2))
    score: Mapped[float | None] = mapped_column(sa.Float)
    qty: Mapped[int | None] = mapped_column(sa.BigInteger)
    at: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True))


NOCASE = sa.String(20, collation="NOCASE").with_variant(
    sa.String(20, collation="policy_parity_ci"), "postgresql"
)


class Doc(Base):
    """Text columns with a case-insensitive collation: SQLite NOCASE, a nondeterministic ICU one."""

    __tablename__ = "policy_parity_docs"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(NOCASE)
    owner: Mapped[str] = mapped_column(NOCASE)


MEASURES = ResourceSpec.declare(Measure, name="measure", tenant="tenant_id")
DOCS = ResourceSpec.declare(Doc, name="doc", tenant="tenant_id")

BIG = 2**53 + 1
NUMBERS: list[Any] = [
    0.1,
    1000.3,
    1e-7,
    -1e-7,
    float(2**53),
    BIG,
    0,
    -1,
    Decimal("0.10"),
    Decimal("0.105"),
    Decimal("1000.3"),
    Decimal("1E+30"),
    10**30,
    2**70,
    math.inf,
    -math.inf,
    math.nan,
    Decimal("NaN"),
    Decimal("Infinity"),
    Decimal("sNaN"),
]
OPS = ("==", "!=", "<", "<=", ">", ">=")
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def pg_parity() -> Iterator[Engine]:
    engine = _pg_engine()
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "CREATE COLLATION IF NOT EXISTS policy_parity_ci "
                    "(provider = icu, locale = 'und-u-ks-level2', deterministic = false)"
                )
            )
        Base.metadata.drop_all(engine)
        Base.metadata.create_all(engine)
        yield engine
        Base.metadata.drop_all(engine)
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def parity(request: pytest.FixtureRequest) -> Iterator[Session]:
    """A session on SQLite or PostgreSQL holding the rows every case is checked against."""
    if request.param == "sqlite":
        engine = sa.create_engine("sqlite://")
        Base.metadata.create_all(engine)
    else:
        engine = request.getfixturevalue("pg_parity")
    postgres = request.param == "postgresql"
    with Session(engine) as session:
        for table in reversed(Base.metadata.sorted_tables):
            session.execute(table.delete())
        session.add_all(_measures(postgres))
        session.add_all(
            Doc(id=i, tenant_id=tenant, owner=owner)
            for i, (tenant, owner) in enumerate(
                [("t1", "bob"), ("t1", "BOB"), ("t1", "Bob"), ("T1", "bob"), ("t1", "alice")], 1
            )
        )
        session.commit()
        yield session
        session.rollback()
    if request.param == "sqlite":
        engine.dispose()


def _measures(postgres: bool) -> list[Measure]:
    amounts: list[Any] = [
        "0.10", "1000.30", "1000.29", "0.00", "-0.01", "9999999999.99", None,
    ]  # fmt: skip
    scores: list[Any] = [0.1, 1000.3, float(2**53), 1e-7, -1e-7, math.inf, None]
    qtys: list[Any] = [0, 1, BIG, -1, 2**53, 2**62, None]
    ats: list[Any] = [T0, T0 + timedelta(hours=1), T0 - timedelta(hours=1), None, T0, T0, T0]
    if postgres:  # SQLite stores NaN as NULL
        amounts.append("NaN")
        scores.append(math.nan)
        qtys.append(0)
        ats.append(None)
    return [
        Measure(
            id=i,
            tenant_id="t1",
            amount=None if a is None else Decimal(a),
            score=s,
            qty=q,
            at=t,
        )
        for i, (a, s, q, t) in enumerate(zip(amounts, scores, qtys, ats, strict=True), 1)
    ]


def _compare(column: str, op: str) -> Condition:
    left: Any = getattr(R, column)
    right: Any = A.value
    return {
        "==": left == right,
        "!=": left != right,
        "<": left < right,
        "<=": left <= right,
        ">": left > right,
        ">=": left >= right,
    }[op]


def _check(session: Session, spec: ResourceSpec, condition: Condition, actor: Actor) -> list[int]:
    """The ids the filter selects, after checking it against the decision, both ways."""
    selected: list[int] = []
    for negate in (False, True):
        policy = PolicySet()
        policy.allow("x.list", ~condition if negate else condition, name="r")
        ap = policy.compile(resource=spec, action="x.list", listable=True)
        disagreements = [str(d) for d in filter_disagreements(session, ap, actor)]
        assert disagreements == [], f"{'~' if negate else ''}{condition.text()}"
        where, params = ap.bound_where(actor)
        model: Any = spec.model
        bound = sorted(session.scalars(sa.select(model.id).where(where), params))
        plain = sorted(session.scalars(ap.apply(sa.select(model.id), actor)))
        assert bound == plain
        if not negate:
            selected = plain
    return selected


@pytest.mark.parametrize("column", ["amount", "score", "qty"])
@pytest.mark.parametrize("op", OPS)
def test_a_number_compares_with_a_numeric_column_exactly_as_python_does(
    parity: Session, column: str, op: str
) -> None:
    for value in NUMBERS:
        actor = Actor.make("u", "t1", attributes={"value": value})
        _check(parity, MEASURES, _compare(column, op), actor)


def test_a_float_limit_lists_only_what_it_allows(parity: Session) -> None:
    """The reference rule with a limit from JSON claims: 1000.3 < Decimal("1000.30")."""
    actor = Actor.make("u", "t1", attributes={"value": 1000.3})
    listed = _check(parity, MEASURES, R.amount <= A.value, actor)
    amounts = {parity.get(Measure, i).amount for i in listed}  # type: ignore[union-attr]
    assert Decimal("1000.30") not in amounts
    assert Decimal("1000.29") in amounts


def test_a_number_fixed_by_the_rule_compares_exactly_too(parity: Session) -> None:
    actor = Actor.make("u", "t1")
    for condition in (R.amount <= 1000.3, R.score == 0.1, R.qty > 2**53, R.amount.in_([0.1, 1])):
        _check(parity, MEASURES, condition, actor)


def test_nan_stored_in_a_column_is_never_listed_by_an_ordering(parity: Session) -> None:
    actor = Actor.make("u", "t1", attributes={"value": Decimal("1000"), "f": 1000.0})
    big = _check(parity, MEASURES, R.amount >= A.value, actor)
    scores = _check(parity, MEASURES, R.score >= A.f, actor)
    assert big == scores == [2, 3, 6]  # not row 8, NaN on PostgreSQL
    _check(parity, MEASURES, R.amount == R.amount, actor)
    _check(parity, MEASURES, R.score < R.score, actor)


@pytest.mark.parametrize("op", OPS)
def test_an_aware_datetime_column_compares_instants_on_every_database(
    parity: Session, op: str
) -> None:
    plus_two = timezone(timedelta(hours=2))
    values = [T0, T0.astimezone(plus_two), T0 + timedelta(minutes=30), T0.replace(tzinfo=None)]
    for value in values:
        _check(
            parity, MEASURES, _compare("at", op), Actor.make("u", "t1", attributes={"value": value})
        )


def test_a_time_window_rule_allows_and_lists_the_same_records_on_sqlite_too(
    parity: Session,
) -> None:
    """13:00+02:00 is 11:00 UTC: the rows at 11:00, 12:00 and 13:00 UTC are at or after it."""
    since = datetime(2026, 1, 1, 13, 0, tzinfo=timezone(timedelta(hours=2)))
    listed = _check(
        parity, MEASURES, R.at >= A.value, Actor.make("u", "t1", attributes={"value": since})
    )
    assert listed == [1, 2, 3, 5, 6, 7]


def test_a_case_insensitive_collation_does_not_widen_equality(parity: Session) -> None:
    bob = Actor.make("bob", "t1", attributes={"names": ["bob", "carol"], "value": "bob"})
    assert _check(parity, DOCS, R.owner == A.id, bob) == [1]
    assert _check(parity, DOCS, R.owner != A.id, bob) == [2, 3, 5]
    assert _check(parity, DOCS, R.owner.in_(A.names), bob) == [1]
    assert _check(parity, DOCS, R.owner < A.value, bob) == [2, 3, 5]
    assert _check(parity, DOCS, R.owner == "bob", bob) == [1]


def test_a_case_insensitive_tenant_column_never_lists_another_tenant(parity: Session) -> None:
    """Row 4 belongs to tenant "T1", not "t1"."""
    bob = Actor.make("bob", "t1")
    assert 4 not in _check(parity, DOCS, R.owner == "bob", bob)
    assert _check(parity, DOCS, R.owner == "bob", Actor.make("bob", "T1")) == [4]


def test_a_float_column_compared_with_an_exact_one_is_refused_at_declaration(tmp_path):
    """SQL compared R.f (Float) with R.d (Numeric) as doubles, Python exactly: 0.1 and
    Decimal("0.10") were equal in the list and unequal in the decision."""
    from charter import Charter, ConfigurationError, R

    class Pair(DeclarativeBase):
        pass

    class Row(Pair):
        __tablename__ = "parity_pairs"
        id: Mapped[int] = mapped_column(primary_key=True)
        f: Mapped[float] = mapped_column(sa.Float)
        d: Mapped[Decimal] = mapped_column(sa.Numeric(12, 2))
        n: Mapped[int] = mapped_column(sa.Integer)

    charter = Charter(database_url=f"sqlite:///{tmp_path / 'p.db'}", development=True)
    try:
        charter.resource(Row, tenant=None)
        for rule in (R.f == R.d, R.f < R.d, R.f >= R.n):
            with pytest.raises(ConfigurationError, match="float column and an exact one"):
                charter.action(f"row.list{id(rule)}", on=Row, allow=rule, listable=True)(
                    lambda ctx, row, data: None
                )
        charter.action("row.exact", on=Row, allow=R.d <= R.n, listable=True)(
            lambda ctx, row, data: None
        )  # two exact columns compare alike
    finally:
        charter.close()
