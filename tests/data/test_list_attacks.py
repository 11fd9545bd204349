"""Attacks on keyset paging and the JSON-lines export (SQLite and PostgreSQL).

A cursor must hold the sort value as the database compares it: following
``next`` visits every row exactly once and ends, whatever the stored values
look like (more decimals than the column's scale on SQLite, datetime text in
another format, aware datetimes in several zones, case-folded text, floats
beyond the finite ones). An export line is always RFC 8259 JSON.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from pydantic import TypeAdapter
from sqlalchemy import JSON, DateTime, Float, Numeric, String, func, insert, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from charter import A, Actor, Charter
from charter.audit import audit_table
from charter.context import ActionContext
from charter.data import lists
from charter.errors import InvalidPage
from charter.integrations.strictjson import loads

from ..conftest import AUDIT_KEYS


class Base(DeclarativeBase):
    pass


class Reading(Base):
    __tablename__ = "test_list_attack_readings"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), default="acme")
    amount: Mapped[Decimal] = mapped_column(Numeric(12, 2), default=Decimal(0))
    fine: Mapped[float] = mapped_column(Numeric(30, 20, asdecimal=False), default=0.0)
    at: Mapped[datetime] = mapped_column(DateTime, default=datetime(2024, 1, 1))
    at_tz: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=datetime(2024, 1, 1, tzinfo=UTC)
    )
    name: Mapped[str] = mapped_column(
        String(32).with_variant(String(32, collation="NOCASE"), "sqlite"), default="x"
    )
    value: Mapped[float] = mapped_column(Float, default=0.0)
    meta: Mapped[Any] = mapped_column(JSON, nullable=True)


ALICE = Actor.make("alice", "acme", roles={"member"})
MAX_PAGES = 30


def noop(ctx: ActionContext, record: Any, data: Any) -> None:
    return None


@pytest.fixture
def readings(database_url: str, disposing: Any) -> Charter:
    charter = disposing(Charter(database_url=database_url, audit_keys=AUDIT_KEYS))
    Base.metadata.drop_all(charter.engine)
    Base.metadata.create_all(charter.engine)
    charter.resource(Reading, tenant="tenant_id")
    member = A.has_role("member")
    charter.action("reading.list", on=Reading, allow=member, listable=True)(noop)
    charter.action("reading.export", on=Reading, target=None, allow=member, listable=True)(noop)
    return charter


def add(charter: Charter, *rows: dict[str, Any]) -> None:
    """Rows through the ORM, as an application writes them (ids 1, 2, ... in order)."""
    with charter.session() as session:
        session.add_all([Reading(id=i, **row) for i, row in enumerate(rows, start=1)])
        session.commit()


def walk(charter: Charter, sort: str, limit: int = 1) -> list[int]:
    """Follow ``next`` to the end; fail on a ``next`` that does not move or never ends."""
    page = charter.list_records(ALICE, "reading.list", limit=limit, sort=sort)
    seen = [r.id for r in page.records]
    pages = 1
    while page.next is not None:
        assert pages < MAX_PAGES, f"paging by {sort} does not end: {seen}"
        page = charter.list_records(ALICE, "reading.list", limit=limit, sort=sort, after=page.next)
        seen += [r.id for r in page.records]
        pages += 1
    return seen


def database_order(charter: Charter, sort: str) -> list[int]:
    """The ids in the database's own order of (sort column, id)."""
    column = Reading.__table__.c[sort.lstrip("-")]
    id_column = Reading.__table__.c.id
    order = [column.desc(), id_column.desc()] if sort.startswith("-") else [column, id_column]
    with charter.engine.connect() as conn:
        return list(conn.scalars(select(id_column).order_by(*order)))


def assert_walks_every_row_once(charter: Charter, column: str) -> None:
    for sort in (column, "-" + column):
        for limit in (1, 2):
            seen = walk(charter, sort, limit)
            assert database_order(charter, sort) == seen, (sort, limit)


def listed_entries(charter: Charter) -> int:
    with charter.engine.connect() as conn:
        count = select(func.count()).where(audit_table.c.action == "reading.list")
        return conn.scalar(count) or 0


# -- keyset paging ----------------------------------------------------------------------


@pytest.mark.parametrize("sort", ["amount", "-amount"])
def test_numeric_paging_ends_and_skips_nothing_with_more_decimals_than_the_scale(
    readings: Charter, sort: str
) -> None:
    # SQLite keeps 100.001 in a Numeric(12, 2) column (read back as 100.00); PostgreSQL rounds.
    add(readings, *({"amount": Decimal(a)} for a in ("100.001", "100.003", "100.002")))
    expected = database_order(readings, sort)
    if readings.engine.dialect.name == "sqlite":  # the stored decimals order the rows
        assert expected == ([1, 3, 2] if sort == "amount" else [2, 3, 1])
    else:  # all 100.00: the id orders them
        assert expected == ([1, 2, 3] if sort == "amount" else [3, 2, 1])
    assert expected == walk(readings, sort)
    assert 3 == listed_entries(readings)  # three pages, each audited once


def test_numeric_read_as_float_pages_every_row_once(readings: Charter) -> None:
    # Numeric(30, 20, asdecimal=False): PostgreSQL keeps the digits a double cannot hold.
    fine = ("0.10000000000000000001", "0.10000000000000000003", "0.10000000000000000002")
    add(readings, *({"fine": Decimal(f)} for f in fine))
    assert_walks_every_row_once(readings, "fine")


#: Only SQLite stores a value as given (a datetime as text in any format, decimals beyond scale).
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@SQLITE_ONLY
def test_datetime_text_in_another_format_pages_every_row_once(readings: Charter) -> None:
    stored = ["2024-01-01T00:00:00", "2024-01-01 00:00:00", "2024-01-01 00:00:00.000000",
              "2024-01-01T00:00:00", "2024-01-02 00:00:00"]  # fmt: skip
    with readings.engine.begin() as conn:
        for i, at in enumerate(stored, start=1):
            conn.execute(
                text("INSERT INTO test_list_attack_readings (id, tenant_id, amount, fine, at, "
                     "at_tz, name, value) VALUES (:i, 'acme', 0, 0, :at, :at, 'x', 0)"),
                {"i": i, "at": at},
            )  # fmt: skip
    assert_walks_every_row_once(readings, "at")
    assert_walks_every_row_once(readings, "at_tz")


def test_aware_datetimes_in_several_zones_page_every_row_once(readings: Charter) -> None:
    base = datetime(2024, 1, 1, 12, tzinfo=UTC)
    zones = [timezone(timedelta(hours=h)) for h in (0, 5, -7, 5, 0)]
    add(readings, *({"at_tz": (base + timedelta(minutes=i)).astimezone(z)}
                    for i, z in enumerate(zones)))  # fmt: skip
    assert_walks_every_row_once(readings, "at_tz")


def test_case_folded_text_pages_every_row_once(readings: Charter) -> None:
    # NOCASE on SQLite: 'bob' = 'BOB', the order is the collation's, ties broken by the id.
    add(readings, *({"name": n} for n in ("bob", "BOB", "alice", "Bob", "ALICE", "carol")))
    assert_walks_every_row_once(readings, "name")


def test_floats_beyond_the_finite_page_every_row_once(readings: Charter) -> None:
    values = [1.5, math.inf, -math.inf, 0.0, -0.0, math.inf, 5e-324]
    if readings.engine.dialect.name == "postgresql":
        values += [math.nan, math.nan]  # SQLite stores NaN as NULL
    add(readings, *({"value": v} for v in values))
    assert_walks_every_row_once(readings, "value")


@SQLITE_ONLY  # PostgreSQL rounds on write: no stored value differs from its read
def test_a_page_at_its_own_cursor_is_refused_not_repeated(
    readings: Charter, monkeypatch: pytest.MonkeyPatch
) -> None:
    add(readings, *({"amount": Decimal(a)} for a in ("100.001", "100.002", "100.003")))
    # As if the cursor held the value as read (what it did before): the database disagrees.
    monkeypatch.setattr(lists, "_cursor_type", lambda column, dialect: None)
    first = readings.list_records(ALICE, "reading.list", limit=1, sort="amount")
    assert [1] == [r.id for r in first.records]
    assert first.next is not None
    with pytest.raises(InvalidPage) as info:
        readings.list_records(ALICE, "reading.list", limit=1, sort="amount", after=first.next)
    assert "sort" == info.value.attrs["parameter"]
    assert 1 == listed_entries(readings)  # the refused page is not audited as listed


# -- JSON-lines export ------------------------------------------------------------------


def test_jsonl_export_writes_non_finite_floats_as_strict_json(readings: Charter) -> None:
    values = [1.5, math.inf, -math.inf]
    postgres = readings.engine.dialect.name == "postgresql"
    if postgres:
        values.append(math.nan)  # SQLite stores NaN as NULL
    with readings.engine.begin() as conn:
        conn.execute(insert(Reading.__table__), [
            {"id": i, "tenant_id": "acme", "amount": 0, "fine": 0, "at": datetime(2024, 1, 1),
             "at_tz": datetime(2024, 1, 1, tzinfo=UTC), "name": "x", "value": v}
            for i, v in enumerate(values, start=1)
        ])  # fmt: skip
        if not postgres:  # a JSON column holding NaN (SQLite keeps the text as given)
            conn.execute(text("UPDATE test_list_attack_readings SET meta = "
                              "'{\"a\": [NaN, Infinity, 2.5]}' WHERE id = 1"))  # fmt: skip
    with readings.export(ALICE, "reading.export", format="jsonl", fields=["value", "meta"]) as st:
        body = b"".join(st).decode()
    docs = [loads(line) for line in body.splitlines()]  # Charter's strict reader: no NaN
    written = [doc["value"] for doc in docs]
    expected: list[Any] = [1.5, "Infinity", "-Infinity"] + (["NaN"] if postgres else [])
    assert expected == written
    as_float = TypeAdapter(float)  # what `charter import` gives a float field
    read_back = [as_float.validate_python(v) for v in written]
    assert [repr(v) for v in values] == [repr(v) for v in read_back]
    if not postgres:
        assert {"a": ["NaN", "Infinity", 2.5]} == docs[0]["meta"]
