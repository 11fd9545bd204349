"""Lists filtered by the same rules that decide: one page of the records an actor may act on.

Every page is selected by the action's policy compiled to SQL, tenant
included; no row is loaded and then dropped in Python. What the caller may
choose is bounded and checked before any query:

* the **page size**, capped by the server (AIP-158): a larger ``limit`` is
  clamped to the cap and the :class:`Page` says the size it used; zero, a
  negative or a non-integer size is 400 ``invalid_page``;
* a **sort** on one visible, non-nullable column, ascending or descending
  (``"-amount"``), always followed by the id, so the order is total and pages
  are stable (keyset, not offset: a row inserted meanwhile shifts nothing);
* a **filter**: equality on visible columns (at most :data:`MAX_FILTERS`),
  each value coerced to its column's domain;
* the **cursor** (``after``): the opaque ``next`` of the previous page of the
  same list, as the same actor (:mod:`charter.data.cursors`).

A cursor holds the sort value as the database compares it, not as Python
reads it back: SQLite stores what it is given (``100.001`` in a
``Numeric(12, 2)`` column, a datetime text in any format, a wall time for
``DateTime(timezone=True)``) and SQLAlchemy rounds or parses it on the way out,
so on SQLite a column whose type converts what it reads is paged by its stored
value (selected alongside the page's rows); on PostgreSQL, where the column
already holds its own type's values, only a read that converts them
(``Numeric(asdecimal=False)``, ``Float(asdecimal=True)``, a ``TypeDecorator``)
is. A page whose rows start at the very position it was asked to start after
is refused (400 ``invalid_page`` on ``sort``) rather than answered with a
``next`` that would return it again.

A hidden field (:mod:`charter.policy.visibility`) cannot be sorted or
filtered by: it is refused as an unknown field is, so that neither its values
nor its existence leak.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy import Connection, Select, String
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import Session

from ..actions import ActionSpec
from ..actor import Actor
from ..context import ActionContext
from ..decision import Decision
from ..errors import ConfigurationError, Forbidden, InvalidPage
from ..pipeline.call import entry_for
from ..pipeline.loading import Adopter
from ..pipeline.stages import check_reason
from ..pipeline.writes import Committer
from ..policy import ActionPolicy
from ..policy.visibility import hidden_fields, redact
from ..resources import ColumnDomain, ResourceSpec
from .cursors import MAX_SORT_TEXT, CursorBinding, CursorSealer

__all__ = [
    "DEFAULT_PAGE",
    "HARD_MAX_PAGE",
    "MAX_FILTERS",
    "MAX_PAGE",
    "ListQuery",
    "Page",
    "check_max_page",
    "list_records",
    "parse_limit",
]

DEFAULT_PAGE: Final = 50
MAX_PAGE: Final = 200  # server-enforced page cap (Charter(max_page=)): a caller cannot raise it
#: The largest cap a Charter or a route may configure.
HARD_MAX_PAGE: Final = 1000
MAX_FILTERS: Final = 8
#: The most digits ``?limit=`` may have: any larger number is clamped all the same.
MAX_LIMIT_DIGITS: Final = 18
#: The Python types a sort key may have: what a cursor carries (:mod:`.cursors`).
_SORTABLE_TYPES: Final = (bool, int, float, Decimal, str, datetime, date)
#: The label of the stored sort value selected alongside a page's rows (:meth:`ListQuery.keyed`).
_STORED_KEY: Final = "charter_cursor_sort_value"
#: SQLite: the stored value as the driver returns it, no conversion (:func:`_cursor_type`).
_STORED: Final = sa.types.NullType()
#: SQLite: a stored value bound back as it is (an integer, a double, a text).
_STORED_BINDS: Final[tuple[tuple[type, Any], ...]] = (
    (int, sa.Integer()),
    (float, sa.Double()),
    (str, sa.String()),
)


def check_max_page(value: int, where: str) -> int:
    """A configured page cap: an integer from 1 to :data:`HARD_MAX_PAGE`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= HARD_MAX_PAGE:
        raise ConfigurationError(f"{where}: max_page must be an integer from 1 to {HARD_MAX_PAGE}")
    return value


@dataclass(frozen=True, slots=True)
class ListQuery:
    """A list's sort and filter, checked against the resource and the actor's visible fields.

    ``sort`` is the column (``None``: the id), ``descending`` its direction,
    ``where`` the equality filters as (column, coerced value), sorted by name.
    ``stored``: the type a cursor reads and binds the sort value with, when the
    column's own would not give back the value the database compares
    (:meth:`on`; ``None``: the column's own).
    """

    resource: ResourceSpec
    sort: str | None
    descending: bool
    where: tuple[tuple[str, Any], ...]
    stored: Any = None

    @classmethod
    def parse(
        cls,
        resource: ResourceSpec,
        hidden: frozenset[str],
        *,
        sort: str | None = None,
        where: Mapping[str, Any] | None = None,
    ) -> ListQuery:
        """Check ``sort`` (``"amount"``, ``"-amount"``) and ``where`` ({column: value})."""
        column, descending = None, False
        if sort is not None:
            if not isinstance(sort, str):
                raise InvalidPage("sort must be a field name", parameter="sort")
            descending = sort.startswith("-")
            name = sort[1:] if descending else sort
            _visible_column(resource, hidden, name, "sort")
            column = None if name == resource.id else name
            if column is not None:
                _check_sortable(resource, column)
        filters: list[tuple[str, Any]] = []
        if where:
            if len(where) > MAX_FILTERS:
                raise InvalidPage(f"at most {MAX_FILTERS} filters", parameter="filter")
            for name, raw in where.items():
                mapped = _visible_column(resource, hidden, name, f"filter.{name}")
                value = _coerce(mapped, raw)
                if value is None:
                    raise InvalidPage(
                        f"filter.{name}: no {name} can have this value",
                        parameter=f"filter.{name}",
                    )
                filters.append((name, value))
        return cls(resource, column, descending, tuple(sorted(filters, key=lambda f: f[0])))

    @property
    def plain(self) -> bool:
        """Id order, ascending, unfiltered: the policy's own cached page statement serves it."""
        return self.sort is None and not self.descending and not self.where

    @property
    def sort_key(self) -> str:
        return ("-" if self.descending else "+") + (self.sort or self.resource.id)

    def binding(self, action: str, actor: Actor) -> CursorBinding:
        """What this list's cursors are sealed to: who, which action, which filter and sort."""
        return CursorBinding(
            tenant=actor.tenant_id, subject=actor.subject.id, real_actor=actor.id,
            action=action, filter=self.where, sort=self.sort_key,
        )  # fmt: skip

    def on(self, dialect: Any) -> ListQuery:
        """This query as paged on ``dialect``: with the type its cursors hold the sort value in."""
        if self.sort is None:
            return self
        stored = _cursor_type(self.resource.column(self.sort), dialect)
        return self if stored is None else dataclasses.replace(self, stored=stored)

    def keyed(self, stmt: Select[Any]) -> Select[Any]:
        """``stmt`` selecting the stored sort value too, last, when the cursor holds that."""
        if self.stored is None or self.sort is None:
            return stmt
        column = self.resource.column(self.sort)
        return stmt.add_columns(sa.type_coerce(column, self.stored).label(_STORED_KEY))

    def position(self, record: Any, stored: Any = None) -> list[Any]:
        """The keyset position of ``record``: its sort value (if not the id) and its id.

        ``stored``: the sort value as the database holds it (:meth:`keyed`),
        used instead of the record's when the query pages by it.
        """
        key = [getattr(record, self.resource.id)]
        if self.sort is None:
            return key
        return [stored if self.stored is not None else getattr(record, self.sort), *key]

    def apply(self, stmt: Select[Any], position: list[Any] | None) -> Select[Any]:
        """``stmt`` filtered, positioned after ``position`` and ordered (values bound)."""
        spec = self.resource
        id_column = spec.column(spec.id)
        for name, value in self.where:
            stmt = stmt.where(spec.column(name) == _bound(spec.column(name), value))
        after = operator.lt if self.descending else operator.gt
        if position is not None:
            if self.sort is None:
                stmt = stmt.where(after(id_column, _bound(id_column, position[-1])))
            else:
                column = spec.column(self.sort)
                value = _bound(column, position[0], self.stored)
                stmt = stmt.where(
                    sa.or_(
                        after(column, value),
                        sa.and_(column == value, after(id_column, position[-1])),
                    )
                )
        order = [spec.column(self.sort)] if self.sort is not None else []
        order.append(id_column)
        return stmt.order_by(*(c.desc() if self.descending else c for c in order))

    def describe(self) -> dict[str, Any]:
        """For the audit entry: the sort and the filter (values shortened)."""
        return {
            "sort": self.sort_key,
            "filter": {name: str(value)[:64] for name, value in self.where},
        }


@dataclass(frozen=True, slots=True)
class Page:
    """One page: the records, the cursor of the next page (``None``: the last), the size used.

    ``records`` are the mapped objects, for code on the server; anything sent
    to the actor goes through :meth:`items`, which leaves out the fields the
    actor may not see. ``rate_limit``: the states of the page's ``RateLimit``
    fields (:func:`charter.ratelimit.rate_headers`; empty without rate limits).
    """

    records: list[Any]
    next: str | None
    limit: int
    hidden: frozenset[str]
    resource: ResourceSpec
    rate_limit: tuple[Any, ...] = ()

    def items(self, render: Callable[[Any], Any] | None = None) -> list[Any]:
        """The records rendered (``render``, or the resource's view), hidden fields left out."""
        view = render or self.resource.render
        return [redact(view(record), self.hidden) for record in self.records]

    def __len__(self) -> int:
        return len(self.records)


def list_records(
    committer: Committer,
    spec: ActionSpec,
    policy: ActionPolicy,
    ctx: ActionContext,
    *,
    limit: int,
    after: Any,
    cursors: CursorSealer,
    sort: str | None = None,
    where: Mapping[str, Any] | None = None,
    max_page: int = MAX_PAGE,
    rate_limit: tuple[Any, ...] = (),
) -> Page:
    """One page of the records ``ctx.actor`` may ``spec`` (keyset paging, see the module).

    Audited: one entry per page, with the sort, the filter and the count. A
    credential without the action's scope, or an impersonation no grant
    allows, is a 403 saying so (audited), not an empty page.
    """
    resource = spec.resource
    if resource is None or not spec.listable:
        raise ConfigurationError(f"{spec.name} is not declared listable=True")
    size = page_size(limit, max_page)
    actor = ctx.actor
    hidden = hidden_fields(resource, actor, ctx)
    query = ListQuery.parse(resource, hidden, sort=sort, where=where)
    query = query.on(committer.runtime.engine.dialect)
    binding = query.binding(spec.name, actor)
    position = None if after is None else cursors.open(after, binding)
    if position is not None and len(position) != (1 if query.sort is None else 2):
        raise InvalidPage("the page cursor is not valid for this list", parameter="after")
    denial = policy.credential_denial(actor)
    if denial is not None:
        committer.alone(entry_for(spec, ctx, None, None, denial, "forbidden", None,
                                  detail={"explanation": denial.reason}))  # fmt: skip
        raise Forbidden(denial.public_reason, decision=denial)
    # On someone's behalf (or for an action that says so) a list needs a reason, as a read.
    ctx.reason = check_reason(spec, actor, ctx.reason)
    stmt, params = _statement(policy, query, ctx, size + 1, position)
    adopter = committer.runtime.adopter(resource.model)
    with committer.audited_read() as (connection, entries):  # no entry written, no page
        rows, stored = _records(adopter, connection, stmt, params, query.stored is not None)
        page, more = rows[:size], len(rows) > size
        if position is not None and page:
            _check_progress(query, position, page, stored)
        # Sealed before the entry: a page that cannot be returned is not audited as listed.
        cursor = None
        if more and page:
            last = len(page) - 1  # ``stored`` runs one row further: the row that told "more"
            cursor = cursors.seal(
                binding, query.position(page[last], stored[last] if stored else None)
            )
        detail = {"listed": len(page), "after": after is not None, **query.describe()}
        entries.append(entry_for(spec, ctx, None, None, Decision.allow("filter"), "ok", None,
                                 detail=detail))  # fmt: skip
    return Page(page, cursor, size, hidden, resource, rate_limit)


def parse_limit(text: str) -> int:
    """``?limit=`` as a number: ASCII digits only, at most :data:`MAX_LIMIT_DIGITS` of them.

    ``int()`` also reads ``"1_0"``, ``" 7"``, ``"+7"`` and Arabic-Indic digits; a
    number too large for any page is still a number, and :func:`page_size`
    clamps it to the cap (AIP-158) — only a string too long to be worth parsing
    is refused. Zero is refused by :func:`page_size`.
    """
    if not (text.isascii() and text.isdigit() and len(text) <= MAX_LIMIT_DIGITS):
        raise InvalidPage(
            "limit must be a whole number from 1 (larger values are capped)", parameter="limit"
        )
    return int(text)


def page_size(limit: Any, max_page: int) -> int:
    """``limit`` clamped to the cap (AIP-158); not a positive integer: 400 ``invalid_page``."""
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise InvalidPage(
            f"the page limit must be a whole number from 1 (larger than {max_page}: capped)",
            parameter="limit",
        )
    return min(limit, max_page)


def _records(
    adopter: Adopter, connection: Connection, stmt: Select[Any], params: Any, keyed: bool
) -> tuple[list[Any], list[Any]]:
    """The page's records, detached: what the ORM loads, for less on a plain mapper.

    A plain mapper's rows are read in Core and made instances directly
    (:meth:`~charter.pipeline.loading.Adopter.detached`, a third of the ORM's
    cost per row); any other mapper is loaded by the ORM in a session on the
    same connection, so nothing the application declared on it is skipped.
    ``keyed``: the statement also selects each row's stored sort value, last
    (:meth:`ListQuery.keyed`); they are returned too (else an empty list).
    """
    if adopter.plain:
        result = connection.execute(stmt, params)
        if not keyed:
            return adopter.detached(result), []
        frozen = result.freeze()  # read once: the records from all but the last column
        width = len(frozen().keys()) - 1
        return adopter.detached(frozen().columns(*range(width))), [r[-1] for r in frozen.data]
    with Session(bind=connection, expire_on_commit=False) as session:
        if not keyed:
            return list(session.execute(stmt, params).scalars()), []
        rows = session.execute(stmt, params).all()
        return [row[0] for row in rows], [row[-1] for row in rows]


def _check_progress(query: ListQuery, after: list[Any], page: list[Any], stored: list[Any]) -> None:
    """Refuse a page that starts or ends at the position it was asked to start after.

    Keyset paging returns rows strictly after the cursor: a row at the cursor's
    own (sort value, id) means the database and the cursor disagree on that
    value, and its ``next`` would return the same page again, forever.
    """
    ends = {0, len(page) - 1}
    opened = [_comparable(v) for v in after]
    for i in ends:
        position = query.position(page[i], stored[i] if stored else None)
        if [_comparable(v) for v in position] == opened:
            raise InvalidPage(
                "sort: the records' values cannot be paged by this field; sort by another field",
                parameter="sort",
            )


def _comparable(value: Any) -> Any:
    """A position's value as a cursor gives it back (an enum member by its name)."""
    return value.name if isinstance(value, enum.Enum) else value


def _statement(
    policy: ActionPolicy, query: ListQuery, ctx: ActionContext, fetch: int, position: Any
) -> tuple[Select[Any], dict[str, Any]]:
    actor = ctx.actor
    if query.plain:
        # Built once per (actor shape, has cursor): values are parameters (ActionPolicy doc).
        after = None if position is None else position[-1]
        return policy.page_statement(actor, ctx, limit=fetch, after=after)
    where, params = policy.bound_where(actor, ctx)
    stmt = query.apply(sa.select(query.resource.model).where(where), position)
    return query.keyed(stmt).limit(fetch), params


def _visible_column(resource: ResourceSpec, hidden: frozenset[str], name: Any, param: str) -> Any:
    """The mapped column ``name`` if the actor may see it; else as unknown as a missing one."""
    columns: Any = sa_inspect(resource.model).columns
    if not isinstance(name, str) or name in hidden or name not in columns:
        shown = ", ".join(sorted(set(columns.keys()) - hidden))
        raise InvalidPage(f"{param}: no such field (fields: {shown})", parameter=param)
    return columns[name]


def _check_sortable(resource: ResourceSpec, name: str) -> None:
    column: Any = sa_inspect(resource.model).columns[name]
    if column.nullable:
        raise InvalidPage(
            f"sort: {name} may be empty; sort by a field every record has", parameter="sort"
        )
    enum_class = getattr(column.type, "enum_class", None)
    if enum_class is not None or isinstance(column.type, sa.Enum):
        return  # a cursor holds the member's name; the database orders (see the README)
    if isinstance(column.type, String) and (column.type.length or 10**9) > MAX_SORT_TEXT:
        raise InvalidPage(f"sort: {name} is too long a text to sort by", parameter="sort")
    try:
        python_type = column.type.python_type
    except NotImplementedError:
        python_type = None
    if python_type is None or not issubclass(python_type, _SORTABLE_TYPES):
        raise InvalidPage(f"sort: {name} is not a field to sort by", parameter="sort")


def _coerce(column: Any, raw: Any) -> Any:
    """A filter value as a value of ``column``, or None if no row can hold it."""
    if raw is None or isinstance(raw, bool | dict | list):
        return None
    if isinstance(column.type, sa.Enum):
        return _enum_member(column.type, raw)
    domain = ColumnDomain.of(column)
    kind = domain.python_type
    try:
        if kind in (datetime, date) and isinstance(raw, str):
            value: Any = kind.fromisoformat(raw)
            if not isinstance(value, kind):
                return None
            if isinstance(value, datetime) and getattr(column.type, "timezone", False):
                # SQLite keeps no zone: compare instants in UTC, as the policy does.
                value = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
            return value
        return domain.coerce(raw)
    except Exception:  # Decimal("x") is InvalidOperation, not a ValueError
        return None


def _enum_member(enum_type: Any, raw: Any) -> Any:
    """An enum column's value: a member, or its value as JSON shows it, or its name."""
    enum_class = enum_type.enum_class
    if enum_class is None:  # Enum("a", "b"): plain strings
        return raw if isinstance(raw, str) and raw in enum_type.enums else None
    if isinstance(raw, enum_class):
        return raw
    if isinstance(raw, enum.Enum):
        return None
    for member in enum_class:
        if member.value == raw and type(member.value) is type(raw):
            return member
    return enum_class.__members__.get(raw) if isinstance(raw, str) else None


def _bound(column: Any, value: Any, stored: Any = None) -> Any:
    """``value`` bound with ``column``'s type (a cursor holds an enum member by its name).

    ``stored``: the type the cursor holds the value in (:func:`_cursor_type`).
    SQLite's stored values are bound as they are, by their Python type (a
    cursor sealed before it held stored values falls back to the column's).
    """
    sql_type = column.type
    if stored is _STORED:
        sql_type = next((t for kind, t in _STORED_BINDS if type(value) is kind), sql_type)
    elif stored is not None:
        sql_type = stored
    enum_class = getattr(sql_type, "enum_class", None)
    if enum_class is not None and isinstance(value, str):
        member = enum_class.__members__.get(value)
        if member is None:  # pragma: no cover - we sealed it
            raise InvalidPage("the page cursor is not valid for this list", parameter="after")
        value = member
    return sa.bindparam(None, value, type_=sql_type)


@functools.lru_cache(maxsize=1024)
def _cursor_type(column: Any, dialect: Any) -> Any:
    """The type a cursor reads and binds ``column``'s values with; ``None``: the column's own.

    SQLite stores what it is given — an integer, a double or a text — whatever
    the declared type; SQLAlchemy then rounds a ``Numeric`` to its scale, parses
    a datetime text whatever its format, maps a boolean or an enum. Such a
    column's cursor holds the stored value, read and bound with no conversion,
    so the keyset compares what the database orders. PostgreSQL stores the
    column's own type; only a read that converts it is replaced by the exact
    one: a ``Numeric(asdecimal=False)`` as a Decimal, a ``Float(asdecimal=True)``
    as a double, a ``TypeDecorator`` as its ``impl``.
    """
    col_type = column.type
    if dialect.name == "sqlite":
        converts = col_type.dialect_impl(dialect).result_processor(dialect, None) is not None
        return _STORED if converts else None
    base = col_type.impl_instance if isinstance(col_type, sa.TypeDecorator) else col_type
    if isinstance(base, sa.Float):
        return sa.Double() if base.asdecimal else (None if base is col_type else base)
    if isinstance(base, sa.Numeric) and not base.asdecimal:
        return sa.Numeric()
    return None if base is col_type else base
