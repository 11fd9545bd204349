"""The reference service's tables."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import JSON, DateTime, Index, Numeric, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["Base", "Invoice", "InvoiceState", "PlanUpgrade", "UpgradeState"]


class Base(DeclarativeBase):
    pass


class InvoiceState:
    DRAFT = "draft"
    SUBMITTED = "submitted"
    APPROVED = "approved"
    PAYMENT_PENDING = "payment_pending"
    PAID = "paid"
    VOID = "void"


class Invoice(Base):
    __tablename__ = "invoices"
    # The approval queue and lists filter by tenant and state (see the policy's SQL).
    __table_args__ = (
        Index("ix_invoices_tenant_state", "tenant_id", "state"),
        # A provider's charge id names at most one invoice per tenant (lookups by it).
        Index("uq_invoices_tenant_charge", "tenant_id", "charge_id", unique=True),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    customer: Mapped[str] = mapped_column(String(200))
    amount: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    currency: Mapped[str] = mapped_column(String(3))
    state: Mapped[str] = mapped_column(String(16), default=InvoiceState.DRAFT)
    version: Mapped[int] = mapped_column(default=1)
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    submitted_by: Mapped[str | None] = mapped_column(String(64), default=None)
    approved_by: Mapped[str | None] = mapped_column(String(64), default=None)
    charge_id: Mapped[str | None] = mapped_column(String(64), default=None)
    paid_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    #: The customer's bank account (IBAN): only the finance role sees it (demo_0005).
    bank_account: Mapped[str | None] = mapped_column(String(34), default=None)


class UpgradeState:
    INITIATED = "initiated"
    VERIFIED = "verified"
    PAYMENT_CAPTURED = "payment_captured"
    COMPLETE = "complete"


class PlanUpgrade(Base):
    """A plan-upgrade flow: one server-side record per upgrade, steps taken by its actor."""

    __tablename__ = "plan_upgrades"

    id: Mapped[str] = mapped_column(
        String(32), primary_key=True
    )  # random: knowing it grants nothing
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    actor_id: Mapped[str] = mapped_column(String(64))
    plan: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(24), default=UpgradeState.INITIATED)
    version: Mapped[int] = mapped_column(default=1)
    deadline: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    steps: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
