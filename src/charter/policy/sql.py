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

**Values.** Actor and context parts are evaluated in Python and become bound
parameters typed by the column they are compared with (``Decimal`` stays
``Decimal``, enums stay enum members). Actor-only conditions
(``A.has_role("approver")``) fold to constants. Where SQL's comparison differs
from Python's for the column's type — numbers compared exactly, NaN stored on
PostgreSQL, a column with a case-insensitive collation, aware datetimes on
SQLite — :mod:`charter.policy.sqlvalues` places the value among the column's
values and picks the SQL that agrees.

**Compiled once per shape.** Building a clause costs far more than running
the rule (SQLAlchemy's operator and coercion machinery: ~150 µs for the
four-condition approver rule). What the actor and context change in the
*structure* of the clause is small and discrete: which actor-only conditions
are true, false or raise, which values are ``None`` or of a type that never
matches, how each value binds. :class:`FilterPlan` finds those parts once per
rule tree; its :meth:`~FilterPlan.resolve` reads them per call into a hashable
*shape* and a list of values. A clause built for a shape with named parameters
serves every actor of that shape: :class:`~charter.policy.ActionPolicy` keeps
them in a bounded, thread-safe :class:`ShapeCache` (``bound_where``,
``page_statement``). ``where`` builds a fresh clause with anonymous literals
from the same shape and values, so both paths share one compiler.

What SQL cannot express exactly is refused with
:class:`~charter.errors.ConfigurationError` rather than approximated: plain
Python predicates, ``R.x`` used as a collection, truthiness of a non-boolean
column, and comparisons whose Python meaning depends on mixing bools with
numbers or enums with strings.
"""

from __future__ import annotations

import enum
import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any, Final, Generic, NoReturn, TypeVar

import sqlalchemy as sa
from sqlalchemy.orm import Mapper
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.type_api import TypeEngine

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
from .sqlvalues import (
    NUMBER,
    CodePoint,
    NanTest,
    as_utc,
    collated,
    nan_capable,
    number_kind,
    number_type,
)

__all__ = [
    "FilterPlan",
    "ShapeCache",
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
            if _float_column(left) != _float_column(right):
                # SQL compares a float column with an exact (integer or numeric) one as
                # doubles; Python compares them exactly (0.1 != Decimal("0.10")).
                return f"{sub.text()}: a float column and an exact one compare differently in SQL"
    return None


def _float_column(column: Any) -> bool:
    try:
        return bool(column.type.python_type is float)
    except NotImplementedError:
        return False


# ---------------------------------------------------------------------------------------
# Plan: what of the SQL depends on the actor and the context
# ---------------------------------------------------------------------------------------

#: Slot outcomes (see :class:`FilterPlan`): what the SQL built for a slot depends on.
RAISES: Final = "raises"  # evaluating the part raises in Python: the node is an error
IS_NONE: Final = "none"  # the value is None: IS NULL / IS NOT NULL, or an error if ordered
APART: Final = "apart"  # never equal to the column's values (another type): a constant
AS_COLUMN: Final = "as-column"  # bound with the column's type
EXPANDING: Final = "expanding"  # an in_() list bound as one expanding parameter

try:  # the type SQLAlchemy gives a literal of this value (sa.literal(value).type), fast
    from sqlalchemy.sql.sqltypes import _resolve_value_to_type as _literal_type
except ImportError:  # pragma: no cover - a private helper; the public path is slower

    def _literal_type(value: Any) -> TypeEngine[Any]:
        return sa.literal(value).type


def _is_column(node: Value) -> bool:
    return isinstance(node, Ref) and node.root == "R"


class _Operand:
    """A column compared with values: how each value binds, or why it cannot."""

    __slots__ = ("category", "column", "node", "python_type")

    def __init__(self, node: Condition, column: Any) -> None:
        self.node = node
        self.column = column
        self.category = category_of_column(column)
        try:
            self.python_type: type | None = column.type.python_type
        except NotImplementedError:
            self.python_type = None

    def refuse(self, value: Any) -> NoReturn:
        raise ConfigurationError(
            f"{self.node.text()}: cannot compare column {self.column.key} with "
            f"{type(value).__name__} {value!r} in SQL with Python's semantics"
        )

    def bind_kind(self, value: Any) -> Any:
        """``AS_COLUMN`` when :func:`_bind` types the value as the column, else the literal's type.

        Two values with the same kind bind alike: the literal's kind is the cache key
        SQLAlchemy itself gives the type (``Integer`` and ``BigInteger`` differ by size).
        """
        python_type = self.python_type
        if python_type is not None and isinstance(value, python_type):
            return AS_COLUMN
        return ("literal", _literal_type(value)._static_cache_key)

    def classify(self, value: Any, op: str = "==") -> tuple[Any, Any]:
        """``(kind, value to bind)`` of ``column <op> value``: ``IS_NONE``, ``APART``,
        ``RAISES`` or how the value binds (numbers and aware datetimes are placed
        among the column's values first: :mod:`charter.policy.sqlvalues`)."""
        if value is None:
            return IS_NONE, None
        rel = relation(self.category, value)
        if rel == "same":
            if self.category == "number":
                return number_kind(self.column, self.python_type, op, value)
            if self.category == "datetime-aware":
                value = as_utc(value)
            return self.bind_kind(value), value
        if rel == "disjoint":
            return APART, None
        self.refuse(value)

    def classify_options(self, options: Iterable[Any]) -> tuple[Any, Any]:
        """``(("in", has_none, binds), kept)`` for ``column IN options`` (or ``RAISES``).

        ``kept`` are the options that can equal a value of the column (None and
        values of other types never match); ``binds`` is ``EXPANDING`` when they all
        bind as the column (one list parameter, whatever its length), else the
        tuple of their kinds.
        """
        has_none = False
        kinds: list[Any] = []
        kept: list[Any] = []
        for option in options:
            if option is None:
                has_none = True
                continue
            kind, value = self.classify(option)
            if kind == RAISES or (isinstance(kind, tuple) and kind[:2] == (NUMBER, "snan")):
                return RAISES, None  # Decimal("sNaN") raises on ==: fail closed
            if kind != APART:  # other types, and numbers the column cannot hold, never match
                kinds.append(kind)
                kept.append(value)
        binds = EXPANDING if kinds and all(k == AS_COLUMN for k in kinds) else tuple(kinds)
        return ("in", has_none, binds), kept


class _Slot:
    """One actor- or context-dependent part of the tree; ``read`` gives (outcome, value)."""

    __slots__ = ("name",)

    def __init__(self) -> None:
        self.name = ""

    def read(self, actor: Any, ctx: Any) -> tuple[Any, Any]:
        raise NotImplementedError

    def bind(self, outcome: Any, value: Any, params: dict[str, Any]) -> None:
        """Put the parameter values this slot's SQL needs into ``params``."""


class _FoldSlot(_Slot):
    """A condition on the actor and context only: evaluated in Python, a constant in SQL."""

    __slots__ = ("node",)

    def __init__(self, node: Condition) -> None:
        super().__init__()
        self.node = node

    def read(self, actor: Any, ctx: Any) -> tuple[Any, Any]:
        try:
            return evaluate(self.node, actor, None, ctx), None  # a bool
        except Exception:
            return RAISES, None


class _ValueSlot(_Slot):
    """An actor or context value compared with a column."""

    __slots__ = ("op", "operand", "value")

    def __init__(self, operand: _Operand, value: Value, op: str) -> None:
        super().__init__()
        self.operand = operand
        self.value = value
        self.op = op  # with the column on the left

    def read(self, actor: Any, ctx: Any) -> tuple[Any, Any]:
        try:
            value = value_of(self.value, actor, None, ctx)
        except Exception:
            return RAISES, None
        return self.operand.classify(value, self.op)

    def bind(self, outcome: Any, value: Any, params: dict[str, Any]) -> None:
        if outcome == AS_COLUMN or (isinstance(outcome, tuple) and value is not None):
            params[self.name] = value


class _OptionsSlot(_Slot):
    """A column ``in_()`` a collection read from the actor or context."""

    __slots__ = ("operand", "options")

    def __init__(self, operand: _Operand, options: Value) -> None:
        super().__init__()
        self.operand = operand
        self.options = options

    def read(self, actor: Any, ctx: Any) -> tuple[Any, Any]:
        try:
            options = value_of(self.options, actor, None, ctx)
        except Exception:
            return RAISES, None
        if isinstance(options, str | bytes | dict) or not hasattr(options, "__iter__"):
            return RAISES, None  # in_collection() raises on these
        return self.operand.classify_options(options)

    def bind(self, outcome: Any, value: Any, params: dict[str, Any]) -> None:
        if outcome == RAISES:
            return
        if outcome[2] == EXPANDING:
            params[self.name] = value
        else:
            for j, option in enumerate(value):
                params[f"{self.name}_{j}"] = option


#: A shape: one outcome per slot, in the order of :attr:`FilterPlan.slots`.
Shape = tuple[Any, ...]


class FilterPlan:
    """One condition's SQL, split into what the rule fixes and what the actor decides.

    The tree is walked once, in the compiler's order, and every part whose SQL
    depends on the actor or the context becomes a *slot*:

    - a condition on the actor and context only (``A.has_role("approver")``,
      ``A.limit > 100``): its outcome is its Python value, ``True``, ``False``
      or ``RAISES``, and it folds to a constant;
    - an actor or context value compared with a column (``R.amount <=
      A.approval_limit``): ``RAISES``, ``IS_NONE`` (becomes ``IS NULL``),
      ``APART`` (a value of another type: a constant) or the bind kind
      (``AS_COLUMN``, or the literal's SQL type), then bound as a parameter;
    - a column ``in_()`` an actor or context collection: ``RAISES`` (also for a
      string or mapping), or whether ``None`` is among the options and the bind
      kinds of the options that can match (``EXPANDING`` when they all bind as
      the column: one list parameter, so the count does not matter).

    :meth:`resolve` reads the slots for one actor and context and returns the
    *shape* (the tuple of outcomes) and the values. The compiler
    (:meth:`build`) looks only at the shape to decide the structure of the
    clause; values only ever reach it as bound parameters. So every actor and
    context with the same shape gets the same clause up to parameter values,
    and a clause built with named parameters (``named=True``) can be reused for
    all of them with :meth:`params`.
    """

    def __init__(self, node: Condition, spec: ResourceSpec, prefix: str = "charter_f_") -> None:
        self.node = node
        self.spec = spec
        self.prefix = prefix
        self.slots: list[_Slot] = []
        self._index: dict[int, int] = {}  # id(node) -> slot; nodes are kept alive by the tree
        self._walk(node)
        self._readers = tuple(slot.read for slot in self.slots)

    def column(self, ref: Value) -> Any:
        return table_column(self.spec, ref.path[0])  # type: ignore[attr-defined]

    def _add(self, node: Condition, slot: _Slot) -> None:
        if id(node) not in self._index:  # a node used twice reads the same
            slot.name = f"{self.prefix}{len(self.slots)}"
            self._index[id(node)] = len(self.slots)
            self.slots.append(slot)

    def _walk(self, node: Condition) -> None:
        if isinstance(node, And | Or):
            for item in node.items:
                self._walk(item)
        elif isinstance(node, Not):
            self._walk(node.item)
        elif isinstance(node, Literal):
            return
        elif isinstance(node, HasRole | HasScope) or not uses_record(node):
            self._add(node, _FoldSlot(node))
        elif isinstance(node, Compare):
            left, right = node.left, node.right
            if _is_column(left) != _is_column(right):
                column, other = (left, right) if _is_column(left) else (right, left)
                if isinstance(other, Ref):
                    op = node.op if column is left else _FLIP[node.op]
                    self._add(node, _ValueSlot(_Operand(node, self.column(column)), other, op))
        elif isinstance(node, In):
            member, options = node.item, node.options
            if _is_column(member) and isinstance(options, Ref) and not _is_column(options):
                self._add(node, _OptionsSlot(_Operand(node, self.column(member)), options))

    def resolve(self, actor: Any, ctx: Any) -> tuple[Shape, list[Any]]:
        """``(shape, values)`` for this actor and context (raises what the compiler refuses)."""
        outcomes: list[Any] = []
        values: list[Any] = []
        for read in self._readers:
            outcome, value = read(actor, ctx)
            outcomes.append(outcome)
            values.append(value)
        return tuple(outcomes), values

    def params(self, shape: Shape, values: list[Any]) -> dict[str, Any]:
        """The values of the named parameters of the clause built for ``shape``."""
        params: dict[str, Any] = {}
        for slot, outcome, value in zip(self.slots, shape, values, strict=True):
            slot.bind(outcome, value, params)
        return params

    def build(self, shape: Shape, values: list[Any], *, named: bool = False) -> ColumnElement[bool]:
        """The WHERE clause for ``shape``.

        ``named=False``: values are anonymous literals, as in any other SQLAlchemy
        expression (safe to combine with anything). ``named=True``: slot values are
        named parameters (``<prefix><slot>``, ``..._<j>`` for the j-th option of a
        list), to be passed at execution (:meth:`params`); the clause is the same
        for every actor of the shape.
        """
        result = _Builder(self, shape, values, named).node(self.node).t
        if result is True:
            return sa.true()
        if result is False:
            return sa.false()
        return result.build()


# ---------------------------------------------------------------------------------------
# Compiler
# ---------------------------------------------------------------------------------------


class _Builder:
    """Builds the clause of one shape; values only ever become bound parameters."""

    def __init__(self, plan: FilterPlan, shape: Shape, values: list[Any], named: bool) -> None:
        self.plan = plan
        self.shape = shape
        self.values = values
        self.named = named

    def column(self, ref: Value) -> Any:
        return self.plan.column(ref)

    def nullable(self, column: Any) -> bool:
        return bool(getattr(column, "nullable", True))

    def slot(self, node: Condition) -> tuple[_Slot, Any, Any]:
        index = self.plan._index[id(node)]
        return self.plan.slots[index], self.shape[index], self.values[index]

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
        if isinstance(node, Literal):
            return _const(node.value)
        index = self.plan._index.get(id(node))
        if index is not None and isinstance(self.plan.slots[index], _FoldSlot):
            # Actor- and context-only: evaluated in Python, with Python's semantics.
            outcome = self.shape[index]
            return _ERROR if outcome == RAISES else _const(outcome)
        if isinstance(node, Compare):
            return self.compare(node)
        if isinstance(node, In):
            return self.in_(node)
        if isinstance(node, IsNone):
            column = self.column(node.operand)
            return _Tri(_leaf(lambda: column.is_(None)), _leaf(lambda: column.is_not(None)))
        if isinstance(node, Truthy):
            column = self.column(node.operand)
            return _Tri(_leaf(lambda: column.is_(True)), _leaf(lambda: column.is_not(True)))
        raise ConfigurationError(f"{node.text()} cannot be compiled to SQL")

    def binder(self, slot: _Slot, column: Any, kind: Any, value: Any) -> Callable[[], Any]:
        if not self.named:
            return lambda: _bind(column, kind, value)
        type_ = _named_type(column, kind, value)
        return lambda: sa.bindparam(slot.name, type_=type_, required=True)

    def compare(self, node: Compare) -> _Tri:
        op, left, right = node.op, node.left, node.right
        if _is_column(left) and _is_column(right):
            return self.column_pair(op, self.column(left), self.column(right))
        if not _is_column(left):
            left, right, op = right, left, _FLIP[op]
        column = self.column(left)
        if isinstance(right, Const):  # fixed by the rule (and checked at declaration)
            kind, value = _Operand(node, column).classify(right.value, op)
            bind: Callable[[], Any] = lambda: _bind(column, kind, value)  # noqa: E731
        else:
            slot, kind, value = self.slot(node)
            bind = self.binder(slot, column, kind, value)
        if kind == RAISES:
            return _ERROR
        if isinstance(kind, tuple) and kind[0] == NUMBER:
            if kind[1] == "snan":  # Decimal("sNaN") == x raises, unless x is None
                null = _is_null(column)
                return _Tri(False, null) if op == "==" else _Tri(null, False)
            if op not in ("==", "!="):
                return _number_order(column, kind, bind)
        return self.column_value(op, column, kind, bind)

    def column_pair(self, op: str, left: Any, right: Any) -> _Tri:
        nullable = self.nullable(left) or self.nullable(right)
        a, b = _text(left), _text(right)
        if op in ("==", "!="):
            eq: SqlBool
            ne: SqlBool
            if nullable:
                eq = _leaf(lambda: a.is_not_distinct_from(b))
                ne = _leaf(lambda: a.is_distinct_from(b))
            else:
                eq, ne = _leaf(lambda: a == b), _leaf(lambda: a != b)
            # NaN (PostgreSQL) equals nothing in Python, itself included; never raises.
            for column in (c for c in (left, right) if nan_capable(c)):
                not_nan: SqlBool = _nan(column, False)
                if self.nullable(column):  # None == None holds
                    not_nan = _or(not_nan, _is_null(column))
                eq = _and(eq, not_nan)
                ne = _or(ne, _nan(column, True))
            return _Tri(eq, ne) if op == "==" else _Tri(ne, eq)
        t: SqlBool = _leaf(lambda: _binary(op, left, right))
        f: SqlBool = _leaf(lambda: _binary(OPS[op], left, right))
        # An ordering with NaN: an error if a Decimal takes part, else False.
        raises = any(_python_type(c) is Decimal for c in (left, right))
        for column in (c for c in (left, right) if nan_capable(c)):
            t = _and(t, _nan(column, False))
            f = _and(f, _nan(column, False)) if raises else _or(f, _nan(column, True))
        return _Tri(t, f)

    def column_value(self, op: str, column: Any, kind: Any, bind: Callable[[], Any]) -> _Tri:
        nullable = self.nullable(column)
        if kind == IS_NONE:
            is_null = _leaf(lambda: column.is_(None))
            not_null = _leaf(lambda: column.is_not(None))
            if op == "==":
                return _Tri(is_null, not_null)
            if op == "!=":
                return _Tri(not_null, is_null)
            return _ERROR  # None < anything raises in Python
        if kind == APART:
            # Python: == is False, != is True, ordering raises.
            if op == "==":
                return _const(False)
            if op == "!=":
                return _const(True)
            return _ERROR
        if op in ("==", "!="):
            text = _text(column)
            eq = _leaf(lambda: text == bind())
            ne: SqlBool = _leaf(lambda: text != bind())
            if nullable:
                ne = _or(ne, _leaf(lambda: column.is_(None)))
            return _Tri(eq, ne) if op == "==" else _Tri(ne, eq)
        # Ordering: NULL makes both t and f unknown, i.e. the Python TypeError.
        return _Tri(
            _leaf(lambda: _binary(op, column, bind())),
            _leaf(lambda: _binary(OPS[op], column, bind())),
        )

    def in_(self, node: In) -> _Tri:
        if not _is_column(node.item) or _is_column(node.options):
            raise ConfigurationError(f"{node.text()} cannot be compiled to SQL")
        column = self.column(node.item)
        if isinstance(node.options, Const):  # fixed by the rule: anonymous literals
            kind, kept = _Operand(node, column).classify_options(node.options.value)
            if kind == RAISES:
                return _ERROR
            kinds = _kinds(kind, kept)
            bound: Any = [_bind(column, k, v) for v, k in zip(kept, kinds, strict=True)]
        else:
            slot, kind, kept = self.slot(node)
            if kind == RAISES:
                return _ERROR
            if not self.named:
                bound = [_bind(column, k, v) for v, k in zip(kept, _kinds(kind, kept), strict=True)]
            elif kind[2] == EXPANDING:
                bound = sa.bindparam(slot.name, expanding=True, type_=column.type, required=True)
            else:
                bound = [
                    sa.bindparam(f"{slot.name}_{j}", type_=_named_type(column, k, v), required=True)
                    for j, (v, k) in enumerate(zip(kept, kind[2], strict=True))
                ]
        has_none = kind[1]
        text = _text(column)
        t: SqlBool = _leaf(lambda: text.in_(bound)) if kept else False
        f: SqlBool = _leaf(lambda: text.not_in(bound)) if kept else True
        if has_none:
            t = _or(t, _leaf(lambda: column.is_(None)))
            f = _and(f, _leaf(lambda: column.is_not(None)))
        elif self.nullable(column):
            f = _or(f, _leaf(lambda: column.is_(None)))
        return _Tri(t, f)


def _named_type(column: Any, kind: Any, value: Any) -> Any:
    """The type :func:`_bind` gives ``value``, for a named parameter that holds no value.

    A bound clause is shared by every actor of its shape, so its parameters carry
    no value of the actor it was first built for: executed without its
    parameters it fails instead of filtering for somebody else.
    """
    if kind == AS_COLUMN:
        return column.type
    if kind[0] == NUMBER:
        return number_type(column, kind[4])
    return _literal_type(value)


def _bind(column: Any, kind: Any, value: Any) -> Any:
    """A bound parameter keeping the value's type: the column's when it is the same kind.

    ``Decimal("2.5")`` compared with an Integer column must stay numeric (typed
    as the column it would be cast, and rounded, to an integer); numbers are
    placed among the column's values first (:mod:`charter.policy.sqlvalues`).
    """
    return sa.literal(value, type_=_named_type(column, kind, value))


def _kinds(kind: Any, kept: list[Any]) -> Any:
    """The bind kind of each kept option of an ``in_()`` shape."""
    return [AS_COLUMN] * len(kept) if kind[2] == EXPANDING else kind[2]


def _python_type(column: Any) -> Any:
    try:
        return column.type.python_type
    except NotImplementedError:
        return None


def _text(column: Any) -> Any:
    """A text column with a declared collation, compared by code point (sqlvalues doc)."""
    return CodePoint(column, explicit=True) if collated(column) else column


def _number_order(column: Any, kind: Any, bind: Callable[[], Any]) -> _Tri:
    """``column <op> number`` placed among the column's values (:func:`number_kind`)."""
    _, how, op, nan, _type = kind
    present = _leaf(lambda: column.is_not(None))
    t: SqlBool
    f: SqlBool
    if how == "nan":  # a NaN value: Python's ordering is False, NULL still raises
        return _Tri(False, present)
    if how == "exact":
        t = _leaf(lambda: _binary(op, column, bind()))
        f = _leaf(lambda: _binary(OPS[op], column, bind()))
    elif (how == "above") == (op in ("<", "<=")):  # every value is on the true side
        t, f = present, False
    else:
        t, f = False, present
    if nan is not None:  # a NaN in the column (PostgreSQL): False or an error, never True
        t = _and(t, _nan(column, False))
        f = _and(f, _nan(column, False)) if nan == "raise" else _or(f, _nan(column, True))
    return _Tri(t, f)


def _is_null(column: Any) -> _Lazy:
    return _leaf(lambda: column.is_(None))


def _nan(column: Any, is_nan: bool) -> _Lazy:
    """``column = 'NaN'`` / ``column <> 'NaN'`` on PostgreSQL (a constant elsewhere)."""
    return _leaf(lambda: NanTest(column, is_nan))


_FLIP = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}


def _binary(op: str, left: Any, right: Any) -> ColumnElement[bool]:
    if category_of_column(left) == "str" and op not in ("==", "!="):
        # Python orders strings by code point; so do SQLite (BINARY) and the "C"
        # collation on PostgreSQL, whatever the database's default collation is.
        left = CodePoint(left, explicit=collated(left))
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


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ShapeCache(Generic[K, V]):
    """A bounded, thread-safe least-recently-used map (shape -> built SQL).

    Building outside the lock is fine: two threads that miss the same key build
    equal values and :meth:`put` keeps the first one.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.hits = 0
        self.misses = 0
        self._data: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self.misses += 1
            else:
                self.hits += 1
                self._data.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> V:
        """Store ``value`` unless another thread stored one first; return the stored one."""
        with self._lock:
            existing = self._data.get(key)
            if existing is not None:
                return existing
            self._data[key] = value
            if len(self._data) > self.maxsize:
                self._data.popitem(last=False)
            return value

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.hits = self.misses = 0


def compile_where(node: Condition, spec: ResourceSpec, actor: Any, ctx: Any) -> ColumnElement[bool]:
    """The SQL predicate selecting exactly the rows for which ``node`` is True in Python."""
    plan = FilterPlan(node, spec)
    shape, values = plan.resolve(actor, ctx)
    return plan.build(shape, values)
