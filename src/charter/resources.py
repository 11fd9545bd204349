"""Resources: the application's SQLAlchemy mapped classes that actions act on."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import PrimaryKeyConstraint, UniqueConstraint
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import Mapper

from .errors import ConfigurationError

__all__ = ["ResourceSpec", "coerce_id", "request_id_or_new"]

MAX_REQUEST_ID = 128


@dataclass(frozen=True, slots=True)
class ResourceSpec:
    """How Charter sees one mapped class.

    ``tenant`` names the tenant column (``None`` for a global, non-tenant
    resource: it must be declared ``tenant=None`` explicitly). ``state`` names
    the workflow state column, ``version`` the optimistic-concurrency counter
    that the gate bumps on every change (exposed as an ETag over HTTP).
    """

    model: type[Any]
    name: str
    id: str
    tenant: str | None
    state: str | None = None
    version: str | None = None
    view: Callable[[Any], Any] | None = None
    id_type: type[Any] | None = None  # the primary key's Python type, to coerce ids

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
        try:
            id_type: type[Any] | None = mapper.primary_key[0].type.python_type
        except NotImplementedError:
            id_type = None
        return cls(
            model=model,
            name=resource_name,
            id=str(pk[0]),
            tenant=tenant,
            state=state,
            version=version,
            view=view,
            id_type=id_type,
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
        """A locator value as the column's Python type, or None if it cannot be one."""
        if name is None:
            return coerce_id(self, value)
        try:
            python_type = sa_inspect(self.model).columns[name].type.python_type
        except NotImplementedError:
            return value
        if isinstance(value, python_type):
            return value
        try:
            return python_type(value)
        except (TypeError, ValueError):
            return None

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
    """The target id as the primary key's Python type, or None if it cannot be one."""
    python_type = resource.id_type
    if python_type is None:
        return target
    if isinstance(target, python_type):
        return target
    try:
        return python_type(target)
    except (TypeError, ValueError):
        return None
