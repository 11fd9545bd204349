"""The credit tables: accounts with their balances, the ledger, holds and quota counters.

* ``charter_credit_accounts`` — one row per account: its tenant, name,
  currency and exponent, its ``balance`` in minor units, and whether it is
  ``bounded`` (may never go below zero: a customer's credits, the holds
  account). A tenant's customer account ``credits`` comes with three system
  accounts of the same currency: ``credits@issued`` (where granted credits come
  from; it goes negative by what was granted), ``credits@spent`` (what was
  consumed) and ``credits@held`` (what is reserved by pending holds).
* ``charter_ledger`` — append-only, double-entry: each row moves ``amount``
  from its ``debit`` account to its ``credit`` account. An account's balance is
  what was credited to it minus what was debited from it, which
  ``charter credits verify`` recomputes.
* ``charter_credit_holds`` — a reservation with an expiry: pending, then
  captured, released or expired (released by Charter).
* ``charter_quota_counters`` — one counter per (tenant, quota, period).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    SmallInteger,
    String,
    Table,
    UniqueConstraint,
)

from ..storage import metadata

__all__ = ["accounts_table", "holds_table", "ledger_table", "quota_table"]

_ID = BigInteger().with_variant(Integer, "sqlite")

accounts_table = Table(
    "charter_credit_accounts",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("tenant", String(128), nullable=False),
    Column("name", String(64), nullable=False),
    Column("currency", String(12), nullable=False),
    Column("exponent", SmallInteger, nullable=False),
    Column("balance", BigInteger, nullable=False),
    Column("bounded", Boolean, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("tenant", "name", name="uq_charter_credit_accounts_tenant_name"),
    # The database refuses an overdraft even if a statement forgot its condition.
    CheckConstraint("NOT bounded OR balance >= 0", name="ck_charter_credit_accounts_floor"),
)

ledger_table = Table(
    "charter_ledger",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("tenant", String(128), nullable=False),
    Column("debit", _ID, ForeignKey("charter_credit_accounts.id"), nullable=False),
    Column("credit", _ID, ForeignKey("charter_credit_accounts.id"), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("action", String(128), nullable=True),
    Column("request_id", String(128), nullable=True),
    Column("hold_id", _ID, nullable=True),
    Column("refund_of", _ID, nullable=True),
    CheckConstraint("amount > 0", name="ck_charter_ledger_amount"),
    CheckConstraint("debit <> credit", name="ck_charter_ledger_two_accounts"),
    # A movement is refunded at most once.
    Index("uq_charter_ledger_refund_of", "refund_of", unique=True),
)

holds_table = Table(
    "charter_credit_holds",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("tenant", String(128), nullable=False),
    Column("account", String(64), nullable=False),
    Column("reference", String(64), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("state", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("action", String(128), nullable=True),
    Column("request_id", String(128), nullable=True),
    # One hold per request and name: a resumed request finds its own hold again.
    UniqueConstraint("tenant", "reference", name="uq_charter_credit_holds_reference"),
    CheckConstraint("amount > 0", name="ck_charter_credit_holds_amount"),
    Index("ix_charter_credit_holds_pending", "state", "expires_at"),
)

quota_table = Table(
    "charter_quota_counters",
    metadata,
    Column("tenant", String(128), primary_key=True),
    Column("quota", String(64), primary_key=True),
    Column("period", String(16), primary_key=True),
    Column("used", Integer, nullable=False),
    CheckConstraint("used >= 0", name="ck_charter_quota_counters_used"),
)
