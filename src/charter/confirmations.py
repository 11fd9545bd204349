"""Pending confirmations: an agent's call that waits for a person (issue 12, item 6).

An action exposed with ``agent=Agent(confirm=True)`` does not run when an agent
calls it. The call is checked (its input, the agent's credential and grant),
then stored here as a *pending* request, audited, and the agent is told its id.
A person approves it through an ordinary channel (a library call, an HTTP
route); only then does the action run, through the whole gate again, as the
agent on behalf of the user, with the agent's stated purpose as its reason.

States: ``pending`` → ``approved`` (claimed by one approver, a conditional
UPDATE: two approvals never both run it) → ``executed`` or ``failed`` (the gate
refused it when it was decided again); ``pending`` → ``rejected`` (a person said
no) or ``expired`` (nobody approved in time: ``expires_at`` passed, refused from
then on, whoever asks).

This module holds the table and its statements; the channel that drives them
is :mod:`charter.integrations.agent`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Column, DateTime, Index, String, Table, Text, case, func, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.types import JSON

from .errors import Conflict, Forbidden
from .storage import metadata

__all__ = [
    "ConfirmationExpired",
    "ConfirmationForbidden",
    "ConfirmationNotPending",
    "ConfirmationState",
    "PendingRequest",
    "confirmation_table",
]


class ConfirmationState(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    EXECUTED = "executed"
    FAILED = "failed"
    REJECTED = "rejected"
    EXPIRED = "expired"


class ConfirmationNotPending(Conflict):
    """The request was already approved, rejected or run: it cannot be decided again."""

    code = "confirmation_not_pending"
    title = "This request is no longer pending"


class ConfirmationExpired(ConfirmationNotPending):
    """Nobody approved the request in time; the agent must ask again."""

    code = "confirmation_expired"
    status = 410
    title = "This request has expired"


class ConfirmationForbidden(Forbidden):
    """This person may not approve the request (the agent itself, another agent, a stranger)."""

    code = "confirmation_forbidden"
    title = "You may not confirm this request"


confirmation_table = Table(
    "charter_agent_confirmations",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("tenant", String(128), nullable=False),
    Column("action", String(128), nullable=False),
    Column("target", String(128), nullable=True),
    Column("input", JSON, nullable=False),
    Column("purpose", Text, nullable=False),
    Column("agent", String(128), nullable=False),
    Column("subject", String(128), nullable=False),
    Column("actor", JSON, nullable=False),  # the agent-for-user, as it called (no secrets)
    Column("idempotency_key", String(255), nullable=True),
    Column("request_id", String(128), nullable=False),
    Column("state", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("decided_by", String(128), nullable=True),
    Column("decided_at", DateTime(timezone=True), nullable=True),
    Column("outcome", String(64), nullable=True),
    Index("ix_charter_agent_confirmations_tenant_state", "tenant", "state", "created_at"),
)


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)  # SQLite drops the zone


@dataclass(frozen=True, slots=True)
class PendingRequest:
    """One stored request, as the approver and the agent see it."""

    id: str
    tenant: str
    action: str
    target: str | None
    input: Mapping[str, Any]
    purpose: str
    agent: str
    subject: str
    actor: Mapping[str, Any]
    idempotency_key: str | None
    request_id: str
    state: ConfirmationState
    created_at: datetime
    expires_at: datetime
    decided_by: str | None = None
    decided_at: datetime | None = None
    outcome: str | None = None

    @classmethod
    def of(cls, row: Any) -> PendingRequest:
        m = row._mapping
        return cls(
            **{k: m[k] for k in m if k not in ("state", "created_at", "expires_at",
                                               "decided_at")},
            state=ConfirmationState(m["state"]),
            created_at=_aware(m["created_at"]),
            expires_at=_aware(m["expires_at"]),
            decided_at=None if m["decided_at"] is None else _aware(m["decided_at"]),
        )  # fmt: skip

    def expired(self, now: datetime) -> bool:
        return self.state is ConfirmationState.PENDING and now >= self.expires_at

    def as_json(self) -> dict[str, Any]:
        """What an approver is shown: what would run, for whom, by which agent, and why."""
        return {
            "id": self.id,
            "action": self.action,
            "target": self.target,
            "input": dict(self.input),
            "purpose": self.purpose,
            "agent": self.agent,
            "on_behalf_of": self.subject,
            "state": str(self.state),
            "created_at": self.created_at.isoformat(),
            "expires_at": self.expires_at.isoformat(),
            "decided_by": self.decided_by,
            "outcome": self.outcome,
        }


def load(connection: Connection, tenant: str, request_id: str) -> PendingRequest | None:
    """One request of ``tenant`` (another tenant's id finds nothing)."""
    t = confirmation_table
    row = connection.execute(select(t).where(t.c.id == request_id, t.c.tenant == tenant)).first()
    return None if row is None else PendingRequest.of(row)


def pending_of(
    connection: Connection, tenant: str, now: datetime, limit: int
) -> list[PendingRequest]:
    """The requests of ``tenant`` still waiting (not expired), oldest first, at most ``limit``."""
    t = confirmation_table
    rows = connection.execute(
        select(t)
        .where(t.c.tenant == tenant, t.c.state == ConfirmationState.PENDING, t.c.expires_at > now)
        .order_by(t.c.created_at, t.c.id)
        .limit(limit)
    ).all()
    return [PendingRequest.of(r) for r in rows]


def lock_waiting(connection: Connection, tenant: str) -> None:
    """Serialize, until COMMIT, the writers that count ``tenant``'s waiting requests.

    PostgreSQL: a transaction-scoped advisory lock on the tenant (READ COMMITTED
    would let two concurrent requests both count N-1 and both insert). SQLite
    needs none: a write transaction (``BEGIN IMMEDIATE``) already excludes every
    other writer.
    """
    if connection.dialect.name != "postgresql":
        return
    digest = hashlib.blake2b(f"charter_agent_confirmations\0{tenant}".encode(), digest_size=8)
    key = int.from_bytes(digest.digest(), "big", signed=True)
    connection.execute(select(func.pg_advisory_xact_lock(key)))


def count_waiting(
    connection: Connection, tenant: str, agent: str, now: datetime
) -> tuple[int, int]:
    """How many requests still wait (pending, not expired): in ``tenant``, and of ``agent``."""
    t = confirmation_table
    of_agent = func.coalesce(func.sum(case((t.c.agent == agent, 1), else_=0)), 0)
    row = connection.execute(
        select(func.count(), of_agent).where(
            t.c.tenant == tenant, t.c.state == ConfirmationState.PENDING, t.c.expires_at > now
        )
    ).one()
    return int(row[0]), int(row[1])


def decide(
    connection: Connection,
    request: PendingRequest,
    to: ConfirmationState,
    by: str,
    now: datetime,
) -> bool:
    """Move a pending, unexpired request to ``to``; True for exactly one of concurrent callers."""
    t = confirmation_table
    result = connection.execute(
        update(t)
        .where(t.c.id == request.id, t.c.tenant == request.tenant)
        .where(t.c.state == ConfirmationState.PENDING, t.c.expires_at > now)
        .values(state=to, decided_by=by, decided_at=now)
    )
    return result.rowcount == 1


def expire(connection: Connection, request: PendingRequest, now: datetime) -> None:
    """Record that a pending request's time ran out (it is refused either way)."""
    t = confirmation_table
    connection.execute(
        update(t)
        .where(t.c.id == request.id, t.c.state == ConfirmationState.PENDING, t.c.expires_at <= now)
        .values(state=ConfirmationState.EXPIRED)
    )


def finish(connection: Connection, request_id: str, state: ConfirmationState, outcome: str) -> None:
    """Record how an approved request's run ended (``executed`` or ``failed``, and its code)."""
    t = confirmation_table
    connection.execute(
        update(t)
        .where(t.c.id == request_id, t.c.state == ConfirmationState.APPROVED)
        .values(state=state, outcome=outcome[:64])
    )
