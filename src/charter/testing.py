"""Test helpers for applications that use Charter: clocks, doubles and policy checks.

``FrozenClock`` makes time deterministic (``Charter(clock=FrozenClock(...))``);
``assert_filter_agrees`` proves that an action's SQL filter returns exactly the
records its in-memory decision allows (run it on your own rules and data);
``assert_matrix_snapshot`` pins a permission matrix so every policy change
shows up in a diff; ``NullAuditTrail`` turns auditing off, for measuring what
the audit costs and for nothing else.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from .actor import Actor, ActorKind
from .audit import AuditEntry, AuditKeyring, AuditLease, AuditTrail
from .policy import assert_filter_agrees, assert_matrix_snapshot, filter_disagreements

__all__ = [
    "FrozenClock",
    "NullAuditTrail",
    "assert_filter_agrees",
    "assert_matrix_snapshot",
    "filter_disagreements",
    "make_actor",
]


class FrozenClock:
    """A clock that only moves when told to; thread-safe. Call it to read the time."""

    def __init__(self, start: datetime | None = None) -> None:
        start = start or datetime(2026, 1, 1, tzinfo=UTC)
        if start.tzinfo is None:
            raise ValueError("FrozenClock needs an aware datetime")
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, delta: timedelta) -> datetime:
        with self._lock:
            self._now += delta
            return self._now

    def set(self, when: datetime) -> None:
        with self._lock:
            self._now = when


class _NullLease(AuditLease):
    def seal(self, entries: Iterable[AuditEntry]) -> list[dict[str, Any]]:
        return []  # no rows: every write path of the gate writes nothing


class NullAuditTrail(AuditTrail):
    """An audit trail that writes nothing: for benchmarks that price the audit, never production."""

    def __init__(self) -> None:
        super().__init__(AuditKeyring({"null": "null-audit-key-not-used"}))

    def lease(self) -> AuditLease:
        return _NullLease(self, super().lease().stream, seals=False)


def make_actor(
    id: str = "user",
    tenant: str = "tenant",
    *roles: str,
    scopes: Iterable[str] = ("*",),
    kind: ActorKind | str = ActorKind.USER,
    **attributes: Any,
) -> Actor:
    """A concise actor for tests: ``make_actor("bob", "acme", "approver", approval_limit=5000)``."""
    return Actor.make(id, tenant, kind=kind, roles=roles, scopes=scopes, attributes=attributes)
