"""Resources: the application's SQLAlchemy mapped classes that actions act on."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    Integer,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import Mapper

from .errors import ConfigurationError

__all__ = ["ColumnDomain", "ResourceSpec", "coerce_id", "declared_for", "request_id_or_new"]

T = TypeVar("T")

MAX_REQUEST_ID = 128
#: The SQL integer types' ranges (SQL:2016 §4.4.3; PostgreSQL enforces them, SQLite does not).
_INTEGER_BITS = ((BigInteger, 64), (SmallInteger, 16), (Integer, 32))


@dataclass(frozen=True, slots=True)
class ColumnDomain:
    """The values one column can hold, on every dialect alike: what a locator must be.

    A locator outside the domain names no record, so :meth:`coerce` returns
    ``None`` and the gate answers *not found* (audited) without asking the
    database, which would otherwise fail on it: PostgreSQL refuses an INTEGER
    parameter of 2**31 and any text with a NUL character. An integer column
    takes Python ints of its declared type's range (INTEGER: 32 bits, even on
    SQLite, so that one id means the same on every database) or strings of
    ASCII digits only (``int()`` also reads Arabic-Indic digits and ``"1_0"``); a string
    column takes strings without NUL, no longer than its declared length.
    """

    python_type: type[Any] | None
    low: int | None = None
    high: int | None = None
    max_length: int | None = None

    @classmethod
    def of(cls, column: Any) -> ColumnDomain:
        """The domain of a mapped column (its SQLAlchemy type, unwrapped from a TypeDecorator)."""
        sql_type = column.type
        if isinstance(sql_type, TypeDecorator):
            sql_type = sql_type.impl_instance
        if isinstance(sql_type, Integer) and not isinstance(sql_type, Boolean):
            bits = next(b for t, b in _INTEGER_BITS if isinstance(sql_type, t))
            return cls(int, low=-(1 << (bits - 1)), high=(1 << (bits - 1)) - 1)
        if isinstance(sql_type, String):
            return cls(str, max_length=sql_type.length)
        try:
            return cls(sql_type.python_type)
        except NotImplementedError:
            return cls(None)

    def coerce(self, value: Any) -> Any:
        """``value`` as a value of the column, or ``None`` if no row can hold it."""
        if isinstance(value, str) and "\x00" in value:
            return None
        if self.python_type is int:
            return self._integer(value)
        if self.python_type is str:
            if isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, str):
                return None
            return value if self.max_length is None or len(value) <= self.max_length else None
        if self.python_type is None or isinstance(value, self.python_type):
            return value
        try:
            return self.python_type(value)
        except (TypeError, ValueError):
            return None

    def _integer(self, value: Any) -> int | None:
        if isinstance(value, str):
            # ASCII digits only, and few enough of them to be worth parsing.
            if not (value.isascii() and value.isdigit()) or len(value) > 20:
                return None
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            return None  # True is not invoice 1, nor 1.9
        if (self.low is not None and value < self.low) or (
            self.high is not None and value > self.high
        ):
            return None
        return value


@dataclass(frozen=True, slots=True)
class ResourceSpec:
    """How Charter sees one mapped class.

    ``tenant`` names the tenant column (``None`` for a global, non-tenant
    resource: it must be declared ``tenant=None`` explicitly). ``state`` names
    the workflow state column, ``version`` the optimistic-concurrency counter
    that the gate bumps on every change (exposed as an ETag over HTTP).

    ``conceal`` (on by default): a record the actor may not *read* answers
    404, like a missing one, when an action on it is denied, so ids cannot be
    enumerated inside a tenant. "May read" means one of the resource's
    sensitive reads would be allowed on it; an actor who may read the record
    but not act on it still gets 403. The denial is audited as a denial.

    ``visible`` names the fields only some actors may see (``visible=`` of
    :meth:`Charter.resource`, :mod:`charter.policy.visibility`).
    """

    model: type[Any]
    name: str
    id: str
    tenant: str | None
    state: str | None = None
    version: str | None = None
    view: Callable[[Any], Any] | None = None
    id_domain: ColumnDomain = ColumnDomain(None)  # the values an id can take (coerce_id)
    conceal: bool = True
    #: Field visibility: (column, condition on the actor) pairs, checked by the registry
    #: (charter.policy.visibility); a field whose condition fails is left out of every output.
    visible: tuple[tuple[str, Any], ...] = field(default=(), compare=False)

    @classmethod
    def declare(
        cls,
        model: type[Any],
        *,
        name: str | None = None,
        tenant: str | None,
        state: str | None = None,
        version: str | None = None,
        view: Callable[[Any], Any] | None = None,
        conceal: bool = True,
    ) -> ResourceSpec:
        """Validate the declaration against the mapper; fail at start-up, loudly."""
        try:
            mapper: Mapper[Any] = sa_inspect(model)
        except Exception as exc:
            raise ConfigurationError(
                f"{model!r} is not a SQLAlchemy mapped class; declare resources with "
                "their ORM model"
            ) from exc
        columns = set(mapper.columns.keys())
        pk = [c.key for c in mapper.primary_key]
        if len(pk) != 1:
            raise ConfigurationError(
                f"resource {model.__name__}: Charter needs a single-column primary key, "
                f"found {pk or 'none'}"
            )
        for role, column in (("tenant", tenant), ("state", state), ("version", version)):
            if column is not None and column not in columns:
                raise ConfigurationError(
                    f"resource {model.__name__}: {role} column {column!r} is not a mapped "
                    f"column (columns: {', '.join(sorted(columns))})"
                )
        resource_name = name or str(getattr(mapper.local_table, "name", ""))
        if not resource_name or not resource_name.replace("_", "").isalnum():
            raise ConfigurationError(f"resource name {resource_name!r} must be an identifier")
        return cls(
            model=model,
            name=resource_name,
            id=str(pk[0]),
            tenant=tenant,
            state=state,
            version=version,
            view=view,
            id_domain=ColumnDomain.of(mapper.primary_key[0]),
            conceal=bool(conceal),
        )

    def render(self, record: Any) -> Any:
        """The JSON view of a record (the resource's ``view=``, or its mapped columns)."""
        if self.view is not None:
            return self.view(record)
        return {name: getattr(record, name) for name in sorted(self.columns)}

    @property
    def columns(self) -> frozenset[str]:
        mapper: Mapper[Any] = sa_inspect(self.model)
        return frozenset(mapper.columns.keys())

    def check_unique(self, name: str, where: str) -> None:
        """Refuse, at declaration, a lookup column that is not unique within the tenant.

        Unique means a unique constraint or index on the column alone or on
        (tenant, column): with anything less, a lookup could find two records.
        """
        mapper: Mapper[Any] = sa_inspect(self.model)
        if name not in mapper.columns:
            raise ConfigurationError(f"{where}: {name!r} is not a column of {self.model.__name__}")
        column = mapper.columns[name]
        wanted = [{column.name}]
        if self.tenant is not None:
            wanted.append({column.name, mapper.columns[self.tenant].name})
        table: Any = mapper.local_table
        unique_sets = [
            {c.name for c in constraint.columns}
            for constraint in table.constraints
            if isinstance(constraint, UniqueConstraint | PrimaryKeyConstraint)
        ]
        unique_sets += [{c.name for c in index.columns} for index in table.indexes if index.unique]
        if column.unique:
            unique_sets.append({column.name})
        if not any(s in wanted for s in unique_sets):
            raise ConfigurationError(
                f"{where}: {self.model.__name__}.{name} must be unique within the tenant "
                f"(declare UniqueConstraint({self.tenant!r}, {name!r}) or unique=True) "
                "to locate records by it"
            )

    def coerce(self, name: str | None, value: Any) -> Any:
        """A locator value as a value of the column, or None if no row can hold it."""
        return self.domain(name).coerce(value)

    def domain(self, name: str | None) -> ColumnDomain:
        """The values column ``name`` (``None``: the primary key) can hold."""
        if name is None:
            return self.id_domain
        return ColumnDomain.of(sa_inspect(self.model).columns[name])

    def column(self, name: str) -> Any:
        """The mapped attribute (``Invoice.amount``) for a column name."""
        return getattr(self.model, name)

    def identity(self, record: Any) -> str:
        return str(getattr(record, self.id))

    def tenant_of(self, record: Any) -> str | None:
        return None if self.tenant is None else getattr(record, self.tenant)

    def state_of(self, record: Any) -> str | None:
        if self.state is None or record is None:
            return None
        value = getattr(record, self.state)
        return None if value is None else str(getattr(value, "value", value))


def request_id_or_new(value: str | None) -> str:
    if value and len(value) <= MAX_REQUEST_ID and value.isprintable() and value.isascii():
        return value
    return os.urandom(16).hex()


def coerce_id(resource: ResourceSpec, target: Any) -> Any:
    """The target id as a value of the primary key, or None if no row can have it."""
    return resource.id_domain.coerce(target)


def declared_for(declared: Mapping[type[Any], T], model: type[Any]) -> T | None:
    """What is declared for ``model``, or for the nearest declared class it inherits from.

    A subclass of a declared model (single-table or joined inheritance: the
    same rows, the same tenant and state columns) is under the same resource,
    workflow and guards: looked up by its exact class, its records escaped both
    guards (a ``Contract(Doc)`` created in another tenant, or moved to another
    state, committed).
    """
    found = declared.get(model)
    if found is None:
        for base in model.__mro__[1:]:
            found = declared.get(base)
            if found is not None:
                break
    return found
