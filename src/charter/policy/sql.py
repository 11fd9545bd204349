"""Compile a rule tree to a SQLAlchemy WHERE clause that agrees with the Python decision.

One rule tree, two compilers: this module must select exactly the rows for
which :mod:`charter.policy.pyeval` allows. Three things make that hard, and
this is how each is handled.

**NULL.** SQL has three-valued logic; Python has ``None`` as an ordinary
value. Charter keeps *Python* semantics and generates SQL that matches them:

- ``R.x == v`` is true when ``x`` equals ``v`` (``None == None`` is true:
  ``x IS NULL``); ``R.x != v`` is true when ``x`` is NULL and ``v`` is not.
- ``R.x.in_([...])`` never matches NULL unless ``None`` is among the options.
- ``R.x < v`` with ``x`` or ``v`` NULL *raises* in Python (``None < 5``):
  the decision fails closed as ``ERROR``. SQL must then exclude the row even
  under ``~`` or ``|``.

**Errors under short-circuit.** Python evaluates ``a | b`` left to right: if
``a`` raises the decision is an error even when ``b`` holds; if ``a`` is
true, ``b`` is not evaluated at all. So every node compiles to *two* SQL
predicates, ``t`` ("evaluates to True without raising") and ``f`` ("evaluates
to False without raising"); a row where neither holds is one where Python
raises. ``a & b`` gives ``t = a.t AND b.t``, ``f = a.f OR (a.t AND b.f)``;
``a | b`` gives ``t = a.t OR (a.f AND b.t)``, ``f = a.f AND b.f``; ``~a`` swaps
them. ``t`` and ``f`` only ever combine with AND/OR, never NOT, so an SQL
NULL inside them acts exactly like false (Kleene logic is monotone). When a
node cannot raise, ``f`` is simply its negation and the formulas collapse to
the usual ones, so common rules compile to the SQL one would write by hand
(``tenant_id = :t AND state = :s AND amount <= :limit AND created_by != :id``),
which keeps index use intact.

**Values.** Actor and context parts are evaluated once, in Python, when the
clause is built, and become bound parameters typed by the column they are
compared with (``Decimal`` stays ``Decimal``, enums stay enum members).
Actor-only conditions (``A.has_role("approver")``) fold to constants.

What SQL cannot express exactly is refused with
:class:`~charter.errors.ConfigurationError` rather than approximated: plain
Python predicates, ``R.x`` used as a collection, truthiness of a non-boolean
column, and comparisons whose Python meaning depends on mixing bools with
numbers or enums with strings.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Mapper
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.visitors import InternalTraversal

from ..errors import ConfigurationError
from ..resources import ResourceSpec
from .expr import (
    OPS,
    And,
    Compare,
    Condition,
    Const,
    HasRole,
    HasScope,
    In,
    IsNone,
    Literal,
    Not,
    Or,
    Predicate,
    Ref,
    Truthy,
    Value,
)
from .pyeval import evaluate, uses_record, value_of

__all__ = [
    "category_of_column",
    "category_of_value",
    "compile_where",
    "relation",
    "table_column",
    "unfilterable_reason",
]


class _Lazy:
    """SQL built only if it ends up in the final clause (most ``f`` sides never do)."""

    __slots__ = ("args", "kind")

    def __init__(self, kind: str, *args: Any) -> None:
        self.kind = kind  # "leaf" (args: fn), "and", "or" (args: parts)
        self.args = args

    def build(self) -> ColumnElement[bool]:
        if self.kind == "leaf":
            result: ColumnElement[bool] = self.args[0]()
            return result
        parts = [p.build() for p in self.args]
        return sa.and_(*parts) if self.kind == "and" else sa.or_(*parts)


def _leaf(fn: Callable[[], ColumnElement[bool]]) -> _Lazy:
    return _Lazy("leaf", fn)


SqlBool = _Lazy | bool


@dataclass(frozen=True, slots=True)
class _Tri:
    """``t``: the node is True without raising; ``f``: False without raising."""

    t: SqlBool
    f: SqlBool


_ERROR = _Tri(False, False)


def _and(*parts: SqlBool) -> SqlBool:
    if any(p is False for p in parts):
        return False
    rest = [p for p in parts if p is not True]
    if not rest:
        return True
    return rest[0] if len(rest) == 1 else _Lazy("and", *rest)


def _or(*parts: SqlBool) -> SqlBool:
    if any(p is True for p in parts):
        return True
    rest = [p for p in parts if p is not False]
    if not rest:
        return False
    return rest[0] if len(rest) == 1 else _Lazy("or", *rest)


def _const(value: bool) -> _Tri:
    return _Tri(value, not value)


# ---------------------------------------------------------------------------------------
# Types: categories with Python comparison semantics
# ---------------------------------------------------------------------------------------


def category_of_value(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, enum.Enum):
        return f"enum:{type(value).__qualname__}"
    if isinstance(value, int | float | Decimal):
        return "number"
    if isinstance(value, str):
        return "str"
    if isinstance(value, datetime):
        return "datetime-aware" if value.tzinfo is not None else "datetime"
    if isinstance(value, date):
        return "date"
    if isinstance(value, time):
        return "time"
    if isinstance(value, bytes):
        return "bytes"
    return f"other:{type(value).__qualname__}"


@functools.lru_cache(maxsize=1024)
def category_of_column(column: Any) -> str:
    col_type = column.type
    enum_class = getattr(col_type, "enum_class", None)
    if enum_class is not None:
        return f"enum:{enum_class.__qualname__}"
    if isinstance(col_type, sa.DateTime):
        return "datetime-aware" if col_type.timezone else "datetime"
    try:
        python_type = col_type.python_type
    except NotImplementedError:
        return "other:?"
    return category_of_value(_SAMPLES.get(python_type, python_type()))


_SAMPLES: dict[type, Any] = {
    bool: True,
    int: 0,
    float: 0.0,
    Decimal: Decimal(0),
    str: "",
    bytes: b"",
    datetime: datetime(2000, 1, 1),
    date: date(2000, 1, 1),
    time: time(0),
}

# Pairs where Python's == is always False and ordering raises TypeError.
_DISJOINT = {"number", "str", "datetime", "datetime-aware", "date", "time", "bytes"}


def relation(column_category: str, value: Any) -> str:
    """``same``, ``disjoint`` (never equal, ordering raises) or ``ambiguous``."""
    value_category = category_of_value(value)
    if value_category == column_category:
        return "same"
    if value_category in _DISJOINT and column_category in _DISJOINT:
        return "disjoint"
    if (
        column_category.startswith("enum:")
        and not isinstance(value, str)
        and (value_category.startswith("enum:") or value_category in _DISJOINT)
    ):
        return "disjoint"
    return "ambiguous"


def table_column(spec: ResourceSpec, name: str) -> sa.Column[Any]:
    """The mapped ``Column`` behind attribute ``name`` of the resource's model."""
    model: Any = spec.model
    return _columns(model)[name]


@functools.lru_cache(maxsize=256)
def _columns(model: Any) -> dict[str, sa.Column[Any]]:
    mapper: Mapper[Any] = sa.inspect(model)
    return {key: column for key, column in mapper.columns.items()}


# ---------------------------------------------------------------------------------------
# Static check: can this tree be filtered in SQL at all?
# ---------------------------------------------------------------------------------------


def unfilterable_reason(node: Condition, spec: ResourceSpec) -> str | None:
    """Why ``node`` cannot be compiled to SQL exactly, or ``None`` when it can."""
    for sub in node.walk():
        if isinstance(sub, Predicate):
            return f"{sub.text()} is plain Python and cannot be compiled to SQL"
        if isinstance(sub, In) and uses_record(sub.options):
            return f"{sub.text()}: a record attribute used as a collection has no portable SQL"
        if isinstance(sub, Truthy) and isinstance(sub.operand, Ref) and sub.operand.root == "R":
            column = table_column(spec, sub.operand.path[0])
            if not isinstance(column.type, sa.Boolean):
                return (
                    f"{sub.text()}: truthiness of a non-boolean column differs between Python "
                    "and SQL; compare explicitly (R.x != 0, R.x.is_not_none())"
                )
        if isinstance(sub, Compare) and uses_record(sub.left) and uses_record(sub.right):
            left = table_column(spec, sub.left.path[0])  # type: ignore[attr-defined]
            right = table_column(spec, sub.right.path[0])  # type: ignore[attr-defined]
            if category_of_column(left) != category_of_column(right):
                return f"{sub.text()}: columns of different types compare differently in SQL"
    return None


# ---------------------------------------------------------------------------------------
# Compiler
# ---------------------------------------------------------------------------------------


class _Compiler:
    def __init__(self, spec: ResourceSpec, actor: Any, ctx: Any) -> None:
        self.spec = spec
        self.actor = actor
        self.ctx = ctx

    def column(self, ref: Ref) -> Any:
        return table_column(self.spec, ref.path[0])

    def nullable(self, column: Any) -> bool:
        return bool(getattr(column, "nullable", True))

    def node(self, node: Condition) -> _Tri:
        if isinstance(node, And):
            t: SqlBool = True
            f: SqlBool = False
            for item in node.items:
                sub = self.node(item)
                f = _or(f, _and(t, sub.f))
                t = _and(t, sub.t)
            return _Tri(t, f)
        if isinstance(node, Or):
            t, f = False, True
            for item in node.items:
                sub = self.node(item)
                t = _or(t, _and(f, sub.t))
                f = _and(f, sub.f)
            return _Tri(t, f)
        if isinstance(node, Not):
            sub = self.node(node.item)
            return _Tri(sub.f, sub.t)
        if isinstance(node, Literal | HasRole | HasScope) or not uses_record(node):
            # Actor- and context-only: evaluate now, in Python, with Python's semantics.
            try:
                return _const(evaluate(node, self.actor, None, self.ctx))
            except Exception:
                return _ERROR
        if isinstance(node, Compare):
            return self.compare(node)
        if isinstance(node, In):
            return self.in_(node)
        if isinstance(node, IsNone):
            column = self.column(node.operand)  # type: ignore[arg-type]
            return _Tri(_leaf(lambda: column.is_(None)), _leaf(lambda: column.is_not(None)))
        if isinstance(node, Truthy):
            column = self.column(node.operand)  # type: ignore[arg-type]
            return _Tri(_leaf(lambda: column.is_(True)), _leaf(lambda: column.is_not(True)))
        raise ConfigurationError(f"{node.text()} cannot be compiled to SQL")

    def operand(self, node: Value) -> tuple[bool, Any]:
        """``(True, column)`` for a record reference, ``(False, value)`` otherwise."""
        if isinstance(node, Ref) and node.root == "R":
            return True, self.column(node)
        return False, value_of(node, self.actor, None, self.ctx)

    def compare(self, node: Compare) -> _Tri:
        op = node.op
        try:
            left_is_col, left = self.operand(node.left)
            right_is_col, right = self.operand(node.right)
        except Exception:
            return _ERROR
        if not left_is_col:
            left, right, op = right, left, _FLIP[op]
        if left_is_col and right_is_col:
            return self.column_pair(op, left, right)
        return self.column_value(op, left, right, node)

    def column_pair(self, op: str, left: Any, right: Any) -> _Tri:
        nullable = self.nullable(left) or self.nullable(right)
        if op in ("==", "!="):
            if nullable:
                eq = _leaf(lambda: left.is_not_distinct_from(right))
                ne = _leaf(lambda: left.is_distinct_from(right))
            else:
                eq, ne = _leaf(lambda: left == right), _leaf(lambda: left != right)
            return _Tri(eq, ne) if op == "==" else _Tri(ne, eq)
        return _Tri(
            _leaf(lambda: _binary(op, left, right)), _leaf(lambda: _binary(OPS[op], left, right))
        )

    def column_value(self, op: str, column: Any, value: Any, node: Compare) -> _Tri:
        nullable = self.nullable(column)
        if value is None:
            is_null = _leaf(lambda: column.is_(None))
            not_null = _leaf(lambda: column.is_not(None))
            if op == "==":
                return _Tri(is_null, not_null)
            if op == "!=":
                return _Tri(not_null, is_null)
            return _ERROR  # None < anything raises in Python
        rel = relation(category_of_column(column), value)
        if rel == "ambiguous":
            raise ConfigurationError(
                f"{node.text()}: cannot compare column {column.key} with "
                f"{type(value).__name__} {value!r} in SQL with Python's semantics"
            )
        if rel == "disjoint":
            # Python: == is False, != is True, ordering raises.
            if op == "==":
                return _const(False)
            if op == "!=":
                return _const(True)
            return _ERROR
        if op in ("==", "!="):
            eq = _leaf(lambda: column == _bind(column, value))
            ne: SqlBool = _leaf(lambda: column != _bind(column, value))
            if nullable:
                ne = _or(ne, _leaf(lambda: column.is_(None)))
            return _Tri(eq, ne) if op == "==" else _Tri(ne, eq)
        # Ordering: NULL makes both t and f unknown, i.e. the Python TypeError.
        return _Tri(
            _leaf(lambda: _binary(op, column, _bind(column, value))),
            _leaf(lambda: _binary(OPS[op], column, _bind(column, value))),
        )

    def in_(self, node: In) -> _Tri:
        try:
            is_col, column = self.operand(node.item)
            _, options = self.operand(node.options)
        except Exception:
            return _ERROR
        if not is_col:
            raise ConfigurationError(f"{node.text()} cannot be compiled to SQL")
        if not isinstance(node.options, Const) and (
            isinstance(options, str | bytes | dict) or not hasattr(options, "__iter__")
        ):
            return _ERROR  # in_collection() raises on these
        category = category_of_column(column)
        values = []
        has_none = False
        for option in options:
            if option is None:
                has_none = True
                continue
            rel = relation(category, option)
            if rel == "ambiguous":
                raise ConfigurationError(
                    f"{node.text()}: cannot compare column {column.key} with "
                    f"{type(option).__name__} {option!r} in SQL with Python's semantics"
                )
            if rel == "same":
                values.append(option)
        bound = [_bind(column, v) for v in values]
        t: SqlBool = _leaf(lambda: column.in_(bound)) if values else False
        f: SqlBool = _leaf(lambda: column.not_in(bound)) if values else True
        if has_none:
            t = _or(t, _leaf(lambda: column.is_(None)))
            f = _and(f, _leaf(lambda: column.is_not(None)))
        elif self.nullable(column):
            f = _or(f, _leaf(lambda: column.is_(None)))
        return _Tri(t, f)


def _bind(column: Any, value: Any) -> Any:
    """A bound parameter keeping the value's type: the column's when it is the same kind.

    ``Decimal("2.5")`` compared with an Integer column must stay numeric (typed
    as the column it would be cast, and rounded, to an integer).
    """
    try:
        same = isinstance(value, column.type.python_type)
    except NotImplementedError:
        same = False
    return sa.literal(value, type_=column.type) if same else sa.literal(value)


_FLIP = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}


def _binary(op: str, left: Any, right: Any) -> ColumnElement[bool]:
    if category_of_column(left) == "str" and op not in ("==", "!="):
        # Python orders strings by code point; so do SQLite (BINARY) and the "C"
        # collation on PostgreSQL, whatever the database's default collation is.
        left = _CodePointOrder(left)
    result: ColumnElement[bool]
    if op == "<":
        result = left < right
    elif op == "<=":
        result = left <= right
    elif op == ">":
        result = left > right
    else:
        result = left >= right
    return result


class _CodePointOrder(ColumnElement[str]):
    """A string column compared by code point (``COLLATE "C"`` on PostgreSQL)."""

    inherit_cache = True
    _traverse_internals = [("column", InternalTraversal.dp_clauseelement)]

    def __init__(self, column: Any) -> None:
        self.column = column
        self.type = column.type


@compiles(_CodePointOrder)
def _compile_default(element: _CodePointOrder, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(element.column, **kw))


@compiles(_CodePointOrder, "postgresql")
def _compile_pg(element: _CodePointOrder, compiler: Any, **kw: Any) -> str:
    return f'{compiler.process(element.column, **kw)} COLLATE "C"'


def compile_where(node: Condition, spec: ResourceSpec, actor: Any, ctx: Any) -> ColumnElement[bool]:
    """The SQL predicate selecting exactly the rows for which ``node`` is True in Python."""
    result = _Compiler(spec, actor, ctx).node(node).t
    if result is True:
        return sa.true()
    if result is False:
        return sa.false()
    return result.build()
