"""How a value compares with a column in SQL exactly as Python compares it with the column's value.

The rule compiler (:mod:`charter.policy.sql`) binds actor and context values as
parameters. Three kinds of column need more than "bind the value with the
column's type" for SQL to agree with the Python decision:

**Numbers.** Python compares ``int``, ``float`` and ``Decimal`` *exactly*:
``Decimal("1000.30") <= 1000.3`` is ``False``, because the float ``1000.3`` is
``1000.29999999999995452…``; ``9007199254740992.0 == 2**53 + 1`` is ``False``.
SQL would convert one side (PostgreSQL casts ``numeric`` to ``double
precision`` against a float parameter; SQLite stores ``Numeric`` as a double)
and answer ``True``. So the value is first placed in the set of values the
column can hold, as Python sees them — integers for an integer column, doubles
for a float column, multiples of ``10**-scale`` for a ``Numeric`` with a scale,
any decimal for one without — and the comparison is rewritten exactly:

- the value is one of them (``0.5`` against a float column): bound as it is;
- it falls between two of them, ``down < v < up``: ``== v`` is never true,
  ``!= v`` always is; ``>= v`` and ``> v`` become ``>= up``, ``<= v`` and
  ``< v`` become ``<= down`` (``R.amount <= 1000.3`` on ``Numeric(12, 2)``
  is ``amount <= 1000.29``);
- it is beyond all of them (``inf``, ``2**70`` against an integer column):
  the ordering is a constant for every non-NULL row;
- it is NaN: ``==`` is false, ``!=`` true, an ordering false (floats) or an
  error (anything involving a ``Decimal``: ``InvalidOperation``), as in Python.

The bounds are bound with a type that keeps them exact (the column's type, a
``BIGINT`` for an integer beyond the column's declared range, a ``DOUBLE
PRECISION`` for a double), so an index on the column still serves the query.

A ``Numeric`` column without a scale is compared with the exact decimal value
(PostgreSQL keeps every digit); on SQLite such a column is a double read back
rounded to ten places, so declare its scale there.

**NaN stored in the column** (PostgreSQL only: SQLite stores NaN as NULL).
PostgreSQL sorts ``'NaN'`` above every number and says ``'NaN' = 'NaN'``;
Python's ``nan >= 5`` is false and ``Decimal("NaN") >= 5`` raises. An ordering
on a float or numeric column therefore carries ``col <> 'NaN'`` (and, where
Python answers ``False`` rather than raising, its negation includes the NaN
rows); on SQLite the guard compiles to a constant.

**Text with a collation.** ``String(collation="NOCASE")`` (SQLite) or a
nondeterministic ICU collation (PostgreSQL) makes ``'BOB' = 'bob'`` true in
SQL, never in Python. A column declared with any collation is compared under
the binary one — ``COLLATE BINARY`` on SQLite, ``COLLATE "C"`` on PostgreSQL
— for equality too (an index with the column's own collation is then not
used for that comparison). Text orderings always compare by code point.

**Aware datetimes.** ``DateTime(timezone=True)`` values are bound in UTC:
SQLite keeps no zone (SQLAlchemy writes the wall time, dropping the offset), so
a value in another zone would compare by its wall time. The Python decision
reads such a column's naive value as UTC (:func:`charter.policy.pyeval.as_utc`),
as Charter does for its own tables, so both sides compare the same instants.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_CEILING, ROUND_FLOOR, Context, Decimal
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.visitors import InternalTraversal

__all__ = [
    "NUMBER",
    "CodePoint",
    "NanTest",
    "as_utc",
    "aware_columns",
    "collated",
    "nan_capable",
    "number_kind",
    "number_type",
]

#: First item of the bind kind of a number compared by ordering (see :func:`number_kind`).
NUMBER: Final = "num"
_INT64: Final = (-(1 << 63), (1 << 63) - 1)
_INT_BITS: Final = ((sa.SmallInteger, 16), (sa.BigInteger, 64), (sa.Integer, 32))


def _sql_type(column: Any) -> Any:
    col_type = column.type
    return col_type.impl_instance if isinstance(col_type, sa.TypeDecorator) else col_type


def nan_capable(column: Any) -> bool:
    """A float or numeric column: PostgreSQL can store NaN in it."""
    col_type = _sql_type(column)
    return isinstance(col_type, sa.Numeric | sa.Float) and not isinstance(col_type, sa.Integer)


def collated(column: Any) -> bool:
    """A text column declared with an explicit collation (compared under the binary one)."""
    return getattr(_sql_type(column), "collation", None) is not None


def aware_columns(columns: Any) -> frozenset[str]:
    """The names of the ``DateTime(timezone=True)`` columns among ``columns`` (key → Column)."""
    return frozenset(
        key
        for key, column in columns.items()
        if isinstance(_sql_type(column), sa.DateTime) and _sql_type(column).timezone
    )


def as_utc(value: datetime) -> datetime:
    """An aware datetime in UTC (how an aware value is bound against an aware column)."""
    return value.astimezone(UTC)


# ---------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Numbers:
    """What a numeric column holds, as Python reads it back (worked out once per column)."""

    python_type: Any  # int, float or Decimal
    nan: str | None  # how a stored NaN orders against a float or int: "false", or None
    bits: int  # integers: the declared width (wider values bind as BIGINT)
    scale: int | None  # decimals: the grid, None for any decimal
    limit: Decimal | None  # decimals: values lie strictly within ±limit


@functools.lru_cache(maxsize=1024)
def _numbers(column: Any, python_type: Any) -> _Numbers:
    col_type = _sql_type(column)
    scale = getattr(col_type, "scale", None)
    precision = getattr(col_type, "precision", None)
    limit = None
    if python_type is Decimal and scale is not None and precision is not None:
        limit = Decimal(10) ** (precision - scale)
    return _Numbers(
        python_type=python_type,
        nan="false" if nan_capable(column) else None,
        bits=next((b for t, b in _INT_BITS if isinstance(col_type, t)), 64),
        scale=scale if python_type is Decimal else None,
        limit=limit,
    )


def number_kind(column: Any, python_type: Any, op: str, value: Any) -> tuple[Any, Any]:
    """``(kind, bound value)`` of number ``value`` compared by ``column <op> value``.

    ``kind`` is ``"as-column"`` or ``"apart"`` (never equal) or ``"raises"`` for
    ``==``/``!=`` (see :mod:`charter.policy.sql`), or for an ordering
    ``(NUMBER, how, op, nan, bind)``: ``how`` is ``exact`` (compare with the
    bound value by ``op``), ``above``/``below`` (beyond every value of the
    column) or ``nan`` (the value is NaN: false without raising); for ``==`` and
    ``!=`` with a signalling NaN, ``snan`` (it raises unless the column is
    NULL); ``nan`` says
    how a NaN stored in the column compares here (``raise``, ``false`` or
    ``None``: it cannot hold one); ``bind`` names the parameter's type
    (:func:`number_type`).
    """
    numbers = _numbers(column, python_type)
    ordering = op not in ("==", "!=")
    decimal = isinstance(value, Decimal)
    if value.is_nan() if decimal else value != value:
        if ordering and (decimal or python_type is Decimal):
            return "raises", None
        if decimal and value.is_snan():  # == raises too, except against None
            return (NUMBER, "snan", op, None, "column"), None
        return ((NUMBER, "nan", op, None, "column"), None) if ordering else ("apart", None)
    how, bound, bind, op = _place(numbers, op, value)
    if not ordering:
        if how != "exact":
            return "apart", None
        return ("as-column" if bind == "column" else (NUMBER, how, op, None, bind)), bound
    nan = numbers.nan
    if nan is not None and (decimal or python_type is Decimal):
        nan = "raise"  # a comparison with a Decimal NaN raises InvalidOperation
    return (NUMBER, how, op, nan, bind), bound


def number_type(column: Any, bind: str) -> Any:
    """The SQL type of a bound number: the column's, ``BIGINT`` or ``DOUBLE PRECISION``."""
    if bind == "bigint":
        return sa.BigInteger()
    if bind == "float":
        return sa.Double()
    return column.type


def _place(numbers: _Numbers, op: str, value: Any) -> tuple[str, Any, str, str]:
    """``(how, bound, bind, op)``: ``value`` placed among the column's values (module doc)."""
    python_type = numbers.python_type
    down: Any
    up: Any
    if python_type is float:
        if type(value) is float:
            return "exact", value, "float", op
        down, up = _doubles_around(value)
        bind = "float"
    elif python_type is Decimal:
        beyond = _beyond_decimals(numbers.limit, value)
        if beyond is not None:
            return beyond, None, "column", op
        down, up = _decimals_around(numbers.scale, value)
        bind = "column"
    else:  # integers: the column's declared range, then what any database stores
        if value > _INT64[1]:  # infinity included
            return "above", None, "column", op
        if value < _INT64[0]:
            return "below", None, "column", op
        if type(value) is int:
            return "exact", value, _int_bind(numbers, value), op
        down, up = math.floor(value), math.ceil(value)
        bind = "column"
    if down == up:
        return "exact", down, _int_bind(numbers, down) if python_type is int else bind, op
    if op in ("==", "!="):
        return "between", None, bind, op
    ge = op in (">", ">=")
    bound = up if ge else down
    if python_type is int:
        if not _INT64[0] <= bound <= _INT64[1]:
            return ("above" if ge else "below"), None, "column", op
        bind = _int_bind(numbers, bound)
    return "exact", bound, bind, ">=" if ge else "<="


def _int_bind(numbers: _Numbers, value: Any) -> str:
    half = 1 << (numbers.bits - 1)
    return "column" if -half <= value < half else "bigint"


def _doubles_around(value: Any) -> tuple[float, float]:
    """The doubles ``down <= value <= up`` next to ``value`` (equal when it is one)."""
    try:
        near = float(value)
    except OverflowError:
        near = math.inf if value > 0 else -math.inf
    exact = Decimal(near)  # Decimal(float) is exact; so is comparing it with an int or Decimal
    if exact == value:
        return near, near
    if exact < value:
        return near, math.nextafter(near, math.inf)
    return math.nextafter(near, -math.inf), near


def _beyond_decimals(limit: Decimal | None, value: Any) -> str | None:
    """``above``/``below`` when no value of the decimal column reaches ``value``."""
    if limit is None:
        if isinstance(value, int) or (isinstance(value, Decimal | float) and not math.isinf(value)):
            return None
        return "above" if value > 0 else "below"  # an infinity
    if value >= limit:
        return "above"
    if value <= -limit:
        return "below"
    return None


def _decimals_around(scale: int | None, value: Any) -> tuple[Decimal, Decimal]:
    """The column's decimals ``down <= value <= up`` next to ``value`` (finite, in range)."""
    exact = value if type(value) is Decimal else Decimal(value)  # exact for int and float
    if scale is None or exact.as_tuple().exponent >= -scale:  # type: ignore[operator]
        return exact, exact  # on the grid already (the common case: a Decimal limit)
    step = _STEPS[scale] if scale < len(_STEPS) else Decimal(1).scaleb(-scale)
    context = Context(prec=max(28, exact.adjusted() + scale + 2))
    down = exact.quantize(step, rounding=ROUND_FLOOR, context=context)
    up = exact.quantize(step, rounding=ROUND_CEILING, context=context)
    return down, up


_STEPS: Final = tuple(Decimal(1).scaleb(-s) for s in range(20))


# ---------------------------------------------------------------------------------------
# SQL elements compiled per dialect
# ---------------------------------------------------------------------------------------


class NanTest(ColumnElement[bool]):
    """``column = 'NaN'`` (``is_nan``) or ``column <> 'NaN'`` on PostgreSQL; a constant elsewhere.

    Only PostgreSQL stores NaN in a float or numeric column (SQLite turns it into
    NULL), so anywhere else the test is known: never NaN.
    """

    inherit_cache = True
    _traverse_internals = [
        ("column", InternalTraversal.dp_clauseelement),
        ("is_nan", InternalTraversal.dp_boolean),
    ]

    def __init__(self, column: Any, is_nan: bool) -> None:
        self.column = column
        self.is_nan = is_nan
        self.type = sa.Boolean()


@compiles(NanTest)
def _compile_nan_default(element: NanTest, compiler: Any, **kw: Any) -> str:
    return "1 = 0" if element.is_nan else "1 = 1"


@compiles(NanTest, "postgresql")
def _compile_nan_pg(element: NanTest, compiler: Any, **kw: Any) -> str:
    op = "=" if element.is_nan else "<>"
    return f"{compiler.process(element.column, **kw)} {op} 'NaN'"


class CodePoint(ColumnElement[str]):
    """A text column compared by code point, as Python compares strings.

    PostgreSQL: ``COLLATE "C"``, whatever the database's or the column's
    collation. SQLite compares with BINARY unless the column declares another
    collation (``NOCASE``), so ``COLLATE BINARY`` is added only then.
    """

    inherit_cache = True
    _traverse_internals = [
        ("column", InternalTraversal.dp_clauseelement),
        ("explicit", InternalTraversal.dp_boolean),
    ]

    def __init__(self, column: Any, explicit: bool) -> None:
        self.column = column
        self.explicit = explicit
        self.type = sa.String()  # the column's type would carry its collation into casts


@compiles(CodePoint)
def _compile_code_point(element: CodePoint, compiler: Any, **kw: Any) -> str:
    text = str(compiler.process(element.column, **kw))
    return f"{text} COLLATE BINARY" if element.explicit else text


@compiles(CodePoint, "postgresql")
def _compile_code_point_pg(element: CodePoint, compiler: Any, **kw: Any) -> str:
    return f'{compiler.process(element.column, **kw)} COLLATE "C"'
