"""Rule expressions: a typed tree over the actor ``A``, the record ``R`` and the context ``C``.

Rules are *data*, not lambdas, so that one tree can be compiled four ways:
to a Python callable (decide), interpreted with values (explain), compiled to
SQL (filter) and partially evaluated per role and state (permission matrix).

Operators build nodes instead of computing values::

    A.has_role("approver") & (R.state == "submitted") & (R.amount <= A.approval_limit)

``&``, ``|`` and ``~`` combine conditions (Python's ``and``/``or``/``not``
cannot be overloaded, so an expression refuses ``bool()``: ``if expr`` or
``a and b`` raise :class:`TypeError` instead of silently picking an operand).

Meaning of the references:

- ``A.id``, ``A.tenant``, ``A.kind``, ``A.roles``, ``A.scopes`` and any other
  name (``A.approval_limit`` -> ``actor.attribute("approval_limit")``) read
  the *subject*: under impersonation, the impersonated user.
- ``A.real.id`` / ``A.real.kind`` / ``A.real.tenant`` read the person at the
  keyboard; ``A.impersonating`` is true under impersonation.
- ``R.amount`` is ``record.amount`` (a mapped column, checked at declaration).
- ``C.now``, ``C.channel``, ``C.input.<field>`` read the :class:`ActionContext`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import date, datetime
from decimal import Decimal
from enum import Enum
from itertools import pairwise
from typing import Any, ClassVar, Final, NoReturn
from uuid import UUID

from ..redaction import MASK, is_secret_name, is_secret_value

__all__ = [
    "ALWAYS",
    "NEVER",
    "A",
    "And",
    "C",
    "Compare",
    "Condition",
    "Const",
    "Expr",
    "HasRole",
    "HasScope",
    "In",
    "IsNone",
    "Literal",
    "Not",
    "Or",
    "Predicate",
    "R",
    "Ref",
    "Truthy",
    "Value",
    "as_condition",
    "as_value",
    "show",
    "show_operand",
]

#: Actor fields that resolve on the subject (``A.<name>``) without going through attributes.
SUBJECT_FIELDS: Final = frozenset({"id", "tenant", "kind", "roles", "scopes"})
#: Fields of the real actor reachable as ``A.real.<name>``.
REAL_FIELDS: Final = frozenset({"id", "tenant", "kind", "roles", "scopes"})

OPS: Final = {"==": "!=", "!=": "==", "<": ">=", "<=": ">", ">": "<=", ">=": "<"}
ORDERING: Final = frozenset({"<", "<=", ">", ">="})


def show(value: Any) -> str:
    """Render a runtime value for an explanation (``12000``, ``'draft'``, ``None``, ``***``)."""
    if is_secret_value(value):
        return MASK
    if isinstance(value, Enum):
        return repr(value.value)
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int | float | Decimal):
        return str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, frozenset | set):
        return "{" + ", ".join(sorted(show(v) for v in value)) + "}" if value else "{}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, str | bytes | UUID):
        return repr(value)
    # A model, a mapping, any object: its repr would show every field, secret ones too
    # (Payment(number='4111…', pin='9999')), so only its type is shown.
    return f"<{type(value).__name__}>"


def show_operand(node: Value, value: Any) -> str:
    """``R.amount 12000``: an operand and its value, for an explanation.

    Explanations go to the audit trail and the log, so the value of an operand
    that names a secret (``R.pin``, ``C.input.password``, ``A.api_token``: the
    names :mod:`charter.redaction` calls secret) is shown as ``***``; the
    operand's name still says which condition failed.
    """
    if not isinstance(node, Ref):
        return f"{node.text()} {show(value)}"
    # Each name of the path, and each two that follow each other (C.input.card.number:
    # "card_number"), against the secret names.
    names = [*node.path, *("_".join(pair) for pair in pairwise(node.path))]
    secret = any(is_secret_name(name) for name in names)
    return f"{node.text()} {MASK if secret else show(value)}"


class Expr:
    """Base of every node. Nodes are immutable and compare by identity."""

    __slots__ = ()

    def text(self) -> str:
        raise NotImplementedError

    def children(self) -> tuple[Expr, ...]:
        return ()

    def __repr__(self) -> str:
        return self.text()

    def __hash__(self) -> int:
        return id(self)

    def __bool__(self) -> NoReturn:
        raise TypeError(
            f"a rule expression has no truth value ({self.text()}); combine conditions with "
            "& | ~ and parenthesize comparisons: (R.state == 'x') & A.has_role('y')"
        )

    def walk(self) -> Iterable[Expr]:
        yield self
        for child in self.children():
            yield from child.walk()


# ---------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------


class Value(Expr):
    """An operand: comparing values yields a :class:`Condition`."""

    __slots__ = ()

    def _cmp(self, op: str, other: object) -> Compare:
        return Compare(op, self, as_value(other))

    def __eq__(self, other: object) -> Compare:  # type: ignore[override]
        return self._cmp("==", other)

    def __ne__(self, other: object) -> Compare:  # type: ignore[override]
        return self._cmp("!=", other)

    def __lt__(self, other: object) -> Compare:
        return self._cmp("<", other)

    def __le__(self, other: object) -> Compare:
        return self._cmp("<=", other)

    def __gt__(self, other: object) -> Compare:
        return self._cmp(">", other)

    def __ge__(self, other: object) -> Compare:
        return self._cmp(">=", other)

    __hash__ = Expr.__hash__

    def in_(self, options: Iterable[Any] | Value) -> In:
        """``value in options``; options are constants or an actor/context collection."""
        if isinstance(options, Value):
            return In(self, options)
        if isinstance(options, str | bytes | Expr):
            raise TypeError("in_() takes a list of constants or a collection reference")
        return In(self, Const(tuple(options)))

    def not_in(self, options: Iterable[Any] | Value) -> Not:
        return Not(self.in_(options))

    def contains(self, item: Any) -> In:
        """``item in self`` (``A.roles.contains("approver")``)."""
        return In(as_value(item), self, contains=True)

    def is_none(self) -> IsNone:
        return IsNone(self)

    def is_not_none(self) -> Not:
        return Not(IsNone(self))

    # A value used where a condition is expected means "is truthy" (A.impersonating).
    def __and__(self, other: object) -> And:
        return as_condition(self) & other

    def __or__(self, other: object) -> Or:
        return as_condition(self) | other

    def __invert__(self) -> Not:
        return ~as_condition(self)


class Const(Value):
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def text(self) -> str:
        if isinstance(self.value, tuple):
            return "[" + ", ".join(show(v) for v in self.value) + "]"
        return show(self.value)


class Ref(Value):
    """A reference: ``root`` is ``"A"``, ``"A.real"``, ``"R"`` or ``"C"``; ``path`` the names."""

    __slots__ = ("path", "root")

    def __init__(self, root: str, path: tuple[str, ...]) -> None:
        self.root = root
        self.path = path

    def text(self) -> str:
        return ".".join((self.root, *self.path))

    def __getitem__(self, name: str) -> Ref:
        """``C.input["text"]`` for input fields whose names clash with expression methods."""
        if self.root == "C" and self.path == ("input",):
            return Ref("C", (*self.path, name))
        raise TypeError(f"{self.text()}[...] is only supported on C.input")

    def __getattr__(self, name: str) -> Ref:
        if name.startswith("_"):
            raise AttributeError(name)
        if self.root == "C" and self.path == ("input",):
            return Ref("C", (*self.path, name))
        raise AttributeError(f"{self.text()} has no attribute {name!r} in a rule")


def as_value(obj: object) -> Value:
    if isinstance(obj, Value):
        return obj
    if isinstance(obj, Expr):
        raise TypeError(f"a condition ({obj.text()}) cannot be used as a value")
    if isinstance(obj, list | set | frozenset):
        return Const(tuple(obj))
    return Const(obj)


# ---------------------------------------------------------------------------------------
# Conditions
# ---------------------------------------------------------------------------------------


class Condition(Expr):
    """A boolean node; combine with ``&``, ``|`` and ``~``."""

    __slots__ = ()

    def __and__(self, other: object) -> And:
        return And((self, as_condition(other)))

    def __rand__(self, other: object) -> And:
        return And((as_condition(other), self))

    def __or__(self, other: object) -> Or:
        return Or((self, as_condition(other)))

    def __ror__(self, other: object) -> Or:
        return Or((as_condition(other), self))

    def __invert__(self) -> Not:
        return Not(self)

    def __eq__(self, other: object) -> bool:
        return self is other

    __hash__ = Expr.__hash__


def as_condition(obj: object) -> Condition:
    if isinstance(obj, Condition):
        return obj
    if isinstance(obj, Value):
        return Truthy(obj)
    if isinstance(obj, bool):
        return ALWAYS if obj else NEVER
    raise TypeError(f"expected a rule condition, got {obj!r}")


class Literal(Condition):
    __slots__ = ("value",)

    def __init__(self, value: bool) -> None:
        self.value = value

    def text(self) -> str:
        return "ALWAYS" if self.value else "NEVER"


ALWAYS: Final = Literal(True)
NEVER: Final = Literal(False)


class Compare(Condition):
    __slots__ = ("left", "op", "right")

    def __init__(self, op: str, left: Value, right: Value) -> None:
        if op not in OPS:
            raise ValueError(f"unknown comparison {op!r}")
        self.op = op
        self.left = left
        self.right = right

    def children(self) -> tuple[Expr, ...]:
        return (self.left, self.right)

    def text(self) -> str:
        return f"{self.left.text()} {self.op} {self.right.text()}"


class In(Condition):
    """``item in options``; ``contains`` only changes how it reads."""

    __slots__ = ("contains", "item", "options")

    def __init__(self, item: Value, options: Value, *, contains: bool = False) -> None:
        self.item = item
        self.options = options
        self.contains = contains

    def children(self) -> tuple[Expr, ...]:
        return (self.item, self.options)

    def text(self) -> str:
        if self.contains:
            return f"{self.options.text()}.contains({self.item.text()})"
        return f"{self.item.text()}.in_({self.options.text()})"


class IsNone(Condition):
    __slots__ = ("operand",)

    def __init__(self, operand: Value) -> None:
        self.operand = operand

    def children(self) -> tuple[Expr, ...]:
        return (self.operand,)

    def text(self) -> str:
        return f"{self.operand.text()}.is_none()"


class Truthy(Condition):
    """A value used as a condition: Python truthiness (``A.impersonating``, ``R.paid``)."""

    __slots__ = ("operand",)

    def __init__(self, operand: Value) -> None:
        self.operand = operand

    def children(self) -> tuple[Expr, ...]:
        return (self.operand,)

    def text(self) -> str:
        return self.operand.text()


class HasRole(Condition):
    __slots__ = ("role",)

    def __init__(self, role: str) -> None:
        self.role = role

    def text(self) -> str:
        return f"A.has_role({self.role!r})"


class HasScope(Condition):
    __slots__ = ("scope",)

    def __init__(self, scope: str) -> None:
        self.scope = scope

    def text(self) -> str:
        return f"A.has_scope({self.scope!r})"


class Predicate(Condition):
    """A plain callable ``(actor, record, ctx) -> bool``: decides, never filters in SQL."""

    __slots__ = ("fn", "name")

    def __init__(self, fn: Callable[[Any, Any, Any], object], name: str | None = None) -> None:
        self.fn = fn
        self.name = name or getattr(fn, "__name__", None) or repr(fn)

    def text(self) -> str:
        return f"predicate {self.name}"


class _Junction(Condition):
    __slots__ = ("items",)
    symbol = "?"

    def __init__(self, items: Iterable[Condition]) -> None:
        flat: list[Condition] = []
        for item in items:
            # Flatten (a & b) & c into one node: shorter SQL, flatter explanations.
            if isinstance(item, _Junction) and type(item) is type(self):
                flat.extend(item.items)
            else:
                flat.append(item)
        self.items: tuple[Condition, ...] = tuple(flat)

    def children(self) -> tuple[Expr, ...]:
        return self.items

    def text(self) -> str:
        return f" {self.symbol} ".join(_wrap(item) for item in self.items)


class And(_Junction):
    __slots__ = ()
    symbol = "&"


class Or(_Junction):
    __slots__ = ()
    symbol = "|"


class Not(Condition):
    __slots__ = ("item",)

    def __init__(self, item: Condition) -> None:
        self.item = item

    def children(self) -> tuple[Expr, ...]:
        return (self.item,)

    def text(self) -> str:
        if isinstance(self.item, IsNone):
            return f"{self.item.operand.text()}.is_not_none()"
        return f"~({self.item.text()})"


def _wrap(item: Condition) -> str:
    if isinstance(item, Compare | _Junction):
        return f"({item.text()})"
    return item.text()


# ---------------------------------------------------------------------------------------
# Namespaces
# ---------------------------------------------------------------------------------------


class _Real:
    __slots__ = ()

    def __getattr__(self, name: str) -> Ref:
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in REAL_FIELDS:
            raise AttributeError(
                f"A.real.{name}: the real actor exposes {', '.join(sorted(REAL_FIELDS))}"
            )
        return Ref("A.real", (name,))

    def __repr__(self) -> str:
        return "A.real"


class _Root:
    """What ``A``, ``R`` and ``C`` share: any public attribute is a reference under the root."""

    __slots__ = ()
    _root: ClassVar[str]

    def __getattr__(self, name: str) -> Ref:
        if name.startswith("_"):
            raise AttributeError(name)
        return Ref(self._root, (name,))

    def __repr__(self) -> str:
        return self._root


class _Actor(_Root):
    """``A``: the actor. Attribute access reads the subject's fields and attributes."""

    __slots__ = ()
    _root = "A"
    real: Final = _Real()

    def has_role(self, role: str) -> HasRole:
        return HasRole(role)

    def has_scope(self, scope: str) -> HasScope:
        return HasScope(scope)

    @property
    def impersonating(self) -> Ref:
        return Ref("A", ("impersonating",))


class _Record(_Root):
    """``R``: the target record; ``R.amount`` is ``record.amount``."""

    __slots__ = ()
    _root = "R"


class _Context(_Root):
    """``C``: the call context (``C.now``, ``C.channel``, ``C.input.<field>``)."""

    __slots__ = ()
    _root = "C"


A: Final = _Actor()
R: Final = _Record()
C: Final = _Context()
