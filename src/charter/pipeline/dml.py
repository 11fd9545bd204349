"""What an ORM ``INSERT``, ``UPDATE`` or ``DELETE`` run in a gate session writes.

The tenant guard (:mod:`charter.pipeline.tenancy`) and the workflow guard
(:mod:`charter.workflow.guard`) both read it in SQLAlchemy's ``do_orm_execute``
hook, before the statement runs. A statement's values come from three places,
and each guard must see all of them, or a form it missed is a way around it:

* the parameters passed to ``session.execute(stmt, rows)`` (ORM bulk
  ``INSERT`` of rows, ORM bulk ``UPDATE`` by primary key);
* the statement's own ``.values(...)`` (one row, or several in a multi-values
  ``INSERT``; positional rows name the table's columns in order);
* ``INSERT … FROM SELECT``, whose values the database computes: each column
  it writes is :data:`UNKNOWN`, a value equal to nothing, so a guard refuses it.

SQLAlchemy keeps a statement's values in ``_values``, ``_multi_values`` and
``_select_names``, with no public accessor (its own compiler reads them the same
way, ``sqlalchemy.sql.crud``); this module is the one place that does.

:func:`run_bulk_change` runs an ORM bulk ``UPDATE``/``DELETE`` of a declared
resource so that the call knows which records it changed, as it knows those
the unit of work flushed: each gets its version bump and is named, with its
state before and after, in the call's audit entry (issue 8).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final

from sqlalchemy import BindParameter, Result, any_, bindparam, false, select, tuple_, update
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import dml as pg_dml
from sqlalchemy.dialects.sqlite import dml as sqlite_dml
from sqlalchemy.orm import ORMExecuteState
from sqlalchemy.orm.exc import UnmappedColumnError

from ..resources import ResourceSpec
from .call import Touched

__all__ = [
    "UNKNOWN",
    "BulkChange",
    "bulk_touched",
    "run_bulk_change",
    "upsert_sets",
    "written_rows",
]

#: Execution option of the gate's own statements inside a bulk change (not looked at again).
INTERNAL = "charter_bulk_internal"


class _Unknown:
    """A value the database computes (``INSERT … FROM SELECT``): equal to no value."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return False

    def __ne__(self, other: object) -> bool:
        return True

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return "<computed by the database>"


UNKNOWN: Final = _Unknown()


def written_rows(state: ORMExecuteState) -> list[dict[str, Any]]:
    """Each row the ``INSERT``/``UPDATE`` of ``state`` writes: attribute name → value.

    A value given as a SQL expression stands for itself (it never equals a
    plain value, so a guard comparing it refuses it). A bound parameter is the
    value it sends: the execution's parameter of that name if there is one
    (``values(tenant_id=bindparam("t", value="acme"))`` run with ``{"t":
    "globex"}`` writes globex), else its own value; one whose value a function
    computes at execution (``callable_``) is :data:`UNKNOWN`, since what it
    returns when the guard asks need not be what it returns when the row is
    written.
    """
    statement, mapper = state.statement, state.bind_mapper

    def name(key: Any) -> str:
        if isinstance(key, str):
            return key
        if mapper is not None:
            try:
                return str(mapper.get_property_by_column(key).key)
            except UnmappedColumnError:
                pass
        return str(getattr(key, "key", key))

    def row(values: Mapping[Any, Any], params: Mapping[str, Any]) -> dict[str, Any]:
        return {name(k): _sent(v, params) for k, v in values.items()}

    own = getattr(statement, "_values", None) or {}
    columns = list(getattr(getattr(statement, "table", None), "c", ()))
    computed = {name(s): UNKNOWN for s in getattr(statement, "_select_names", None) or ()}
    params: Any = state.parameters
    given = params if isinstance(params, list) else [params] if params else []
    rows: list[dict[str, Any]] = []
    for group in getattr(statement, "_multi_values", ()) or ():
        for values in group:
            if isinstance(values, Sequence) and not isinstance(values, str | bytes):
                values = dict(zip(columns, values, strict=False))
            rows.append({**row(own, {}), **row(values, {})})
    rows.extend({**row(own, values), **computed, **row(values, values)} for values in given)
    return rows or [{**row(own, {}), **computed}]


def _sent(value: Any, params: Mapping[str, Any]) -> Any:
    """The value a statement's ``value`` writes (see :func:`written_rows`)."""
    if isinstance(value, BindParameter):
        if value.key in params:
            value = params[value.key]
        elif value.callable is not None:
            return UNKNOWN
        else:
            value = value.value
    return value.value if isinstance(value, Enum) else value


def upsert_sets(statement: Any) -> list[str] | None:
    """The columns an ``INSERT … ON CONFLICT DO UPDATE`` sets on the row it conflicts with, or
    None for any other statement (``DO NOTHING`` updates no row).

    The row it updates is whichever it conflicts with, which nothing in the
    statement confines: another tenant's, or a record in any workflow state.
    (SQLAlchemy keeps the clause in ``_post_values_clause``.)
    """
    clause = getattr(statement, "_post_values_clause", None)
    if not isinstance(clause, pg_dml.OnConflictDoUpdate | sqlite_dml.OnConflictDoUpdate):
        return None
    return [str(getattr(k, "key", k)) for k in clause.update_values_to_set]


@dataclass(frozen=True, slots=True)
class BulkChange:
    """The records one ORM bulk ``UPDATE``/``DELETE`` changed: id → state before, and after."""

    resource: ResourceSpec
    before: dict[str, str | None]
    after: dict[str, str | None]
    deleted: bool


def run_bulk_change(
    state: ORMExecuteState,
    resource: ResourceSpec,
    *,
    postgres: bool,
    missing: Callable[[], Exception],
) -> tuple[Result[Any], BulkChange]:
    """Run ``state``'s bulk UPDATE/DELETE on exactly the records it matches now, and say which.

    The matching records are selected first, in id order, through the session
    (so the tenant's criteria apply); on PostgreSQL ``FOR UPDATE``, and the
    statement is then narrowed to their ids (``= ANY(:ids)``, one parameter), so
    that a record committed meanwhile by another transaction is neither changed
    nor left out of the list. SQLite needs no narrowing: the call's ``BEGIN
    IMMEDIATE`` holds the only write lock. An UPDATE bumps their versions. An
    UPDATE by primary key (a list of rows) must find every key it names (else
    ``missing()`` is raised, before anything is written).
    """
    session, model = state.session, resource.model
    ident = resource.column(resource.id)
    status = resource.column(resource.state) if resource.state else None
    query = select(*([ident] if status is None else [ident, status])).order_by(ident)
    found = _matched(state, model, query.with_for_update(of=model) if postgres else query, missing)
    ids = [row[0] for row in found]
    before = {str(row[0]): (None if status is None else _text(row[1])) for row in found}
    if not isinstance(state.parameters, list) and (postgres or not ids):
        statement: Any = state.statement  # an ORM update() or delete()
        state.statement = statement.where(_among(ident, ids, postgres)[0] if ids else false())
    if state.is_update and resource.version and ids:
        version = resource.column(resource.version)
        for among in _among(ident, ids, postgres):
            bump = update(model).where(among).values({version: version + 1})
            session.execute(bump.execution_options(**{INTERNAL: True}))
    result = state.invoke_statement()
    after: dict[str, str | None] = {}
    if state.is_update and status is not None and ids:
        for among in _among(ident, ids, postgres):
            after.update(
                (str(i), _text(s)) for i, s in session.execute(select(ident, status).where(among))
            )
    return result, BulkChange(resource, before, after, deleted=state.is_delete)


def _matched(
    state: ORMExecuteState, model: type[Any], query: Any, missing: Callable[[], Exception]
) -> list[Any]:
    """The rows ``query`` selects among those ``state``'s statement is about to change."""
    session = state.session
    if not (state.is_update and isinstance(state.parameters, list)):
        where = getattr(state.statement, "whereclause", None)
        return list(session.execute(query if where is None else query.where(where)).all())
    # An UPDATE by primary key: the keys its rows name, every one of which must be found.
    mapper: Any = sa_inspect(model)
    keys = [getattr(model, mapper.get_property_by_column(c).key) for c in mapper.primary_key]
    wanted = {tuple(row.get(k.key) for k in keys) for row in written_rows(state)}
    if any(None in key for key in wanted):
        raise missing()
    found = [
        row
        for part in _chunks(sorted(wanted))  # sorted: rows are locked in one order
        for row in session.execute(query.where(tuple_(*keys).in_(part))).all()
    ]
    if len(found) != len(wanted):
        raise missing()
    return found


def bulk_touched(changes: Sequence[BulkChange], seen: set[tuple[str, str]]) -> list[Touched]:
    """The records ``changes`` changed, for the call's audit entry, each once (none in ``seen``):
    the state it had before the first change, and after the last."""
    found: dict[tuple[str, str], Touched] = {}
    for change in changes:
        name = change.resource.name
        for ident, before in change.before.items():
            if (name, ident) in seen:
                continue
            earlier = found.get((name, ident))
            found[(name, ident)] = Touched(
                name,
                ident,
                earlier.before if earlier is not None else before,
                None if change.deleted else change.after.get(ident, before),
                deleted=change.deleted,
            )
    return list(found.values())


#: Ids per ``IN`` list of the gate's own statements (SQLite binds at most 32,766 parameters).
CHUNK = 1000


def _chunks(items: Sequence[Any]) -> list[Sequence[Any]]:
    return [items[i : i + CHUNK] for i in range(0, len(items), CHUNK)]


def _among(ident: Any, ids: list[Any], postgres: bool) -> list[Any]:
    """``ident`` among ``ids``: one ``= ANY(:array)`` on PostgreSQL, ``IN`` lists elsewhere."""
    if postgres:
        array = bindparam("charter_ids", ids, type_=ARRAY(ident.type), unique=True)
        return [ident == any_(array)]
    return [ident.in_(part) for part in _chunks(ids)]


def _text(value: Any) -> str | None:
    return None if value is None else str(getattr(value, "value", value))
