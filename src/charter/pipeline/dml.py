"""What an ORM ``INSERT`` or ``UPDATE`` run in a gate session writes, row by row.

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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from sqlalchemy.orm import ORMExecuteState
from sqlalchemy.orm.exc import UnmappedColumnError

__all__ = ["UNKNOWN", "written_rows"]


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
    plain value, so a guard comparing it refuses it).
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

    def row(values: Mapping[Any, Any]) -> dict[str, Any]:
        return {name(k): getattr(v, "value", v) for k, v in values.items()}

    base = row(getattr(statement, "_values", None) or {})
    columns = list(getattr(getattr(statement, "table", None), "c", ()))
    rows: list[dict[str, Any]] = []
    for group in getattr(statement, "_multi_values", ()) or ():
        for values in group:
            if isinstance(values, Sequence) and not isinstance(values, str | bytes):
                values = dict(zip(columns, values, strict=False))
            rows.append({**base, **row(values)})
    for selected in getattr(statement, "_select_names", None) or ():
        base[name(selected)] = UNKNOWN
    params: Any = state.parameters
    given = params if isinstance(params, list) else [params] if params else []
    rows.extend({**base, **row(values)} for values in given)
    return rows or [base]
