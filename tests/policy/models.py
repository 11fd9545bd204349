"""Mapped classes for the policy tests (tables prefixed ``policy_`` to stay out of others' way)."""

from __future__ import annotations

import enum
from datetime import datetime
from decimal import Decimal

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from charter.resources import ResourceSpec


class Base(DeclarativeBase):
    pass


class Priority(enum.Enum):
    LOW = "low"
    HIGH = "high"


class Invoice(Base):
    __tablename__ = "policy_invoices"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.String(20))
    state: Mapped[str | None] = mapped_column(sa.String(20))
    amount: Mapped[Decimal | None] = mapped_column(sa.Numeric(12, 2))
    created_by: Mapped[str | None] = mapped_column(sa.String(20))
    qty: Mapped[int] = mapped_column(default=0)
    paid: Mapped[bool | None] = mapped_column(sa.Boolean)
    due: Mapped[datetime | None] = mapped_column(sa.DateTime)
    priority: Mapped[Priority | None] = mapped_column(sa.Enum(Priority, native_enum=False))
    label: Mapped[str | None] = mapped_column(sa.String(20))


class Country(Base):
    """A global (non-tenant) resource."""

    __tablename__ = "policy_countries"

    code: Mapped[str] = mapped_column(sa.String(2), primary_key=True)
    open: Mapped[bool] = mapped_column(default=True)


INVOICES = ResourceSpec.declare(Invoice, name="invoice", tenant="tenant_id", state="state")
COUNTRIES = ResourceSpec.declare(Country, name="country", tenant=None)
