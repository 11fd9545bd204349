"""Period quotas: at most ``limit`` uses per tenant per period, counted with one conditional write.

``Quota("exports", limit=20, per="day")`` allows 20 uses of the actions that
declare it, per tenant and UTC day. A use is one statement::

    INSERT INTO charter_quota_counters (tenant, quota, period, used) VALUES (:t, :q, :p, :n)
    ON CONFLICT (tenant, quota, period) DO UPDATE SET used = used + :n
     WHERE charter_quota_counters.used + :n <= :limit
    RETURNING used

— the same shape as a credit debit: no read before the write, so two
concurrent uses of the last slot cannot both pass (the second waits for the
first's row lock, then its condition sees the committed count). The counter
of a new period starts at zero: there is nothing to reset.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import bindparam
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from ..errors import ConfigurationError
from .tables import quota_table

__all__ = ["PERIODS", "Quota", "consume_quota"]

#: Period name -> (strftime format of its key, how to find the next period's start).
PERIODS = ("hour", "day", "month")
_NAME = re.compile(r"[a-z][a-z0-9_.-]{0,63}", re.ASCII)


@dataclass(frozen=True, slots=True)
class Quota:
    """At most ``limit`` uses of ``name`` per tenant and ``per`` period (UTC)."""

    name: str
    limit: int
    per: str = "day"
    uses: int = 1  # what one call consumes

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ConfigurationError(
                f"quota name {self.name!r} must be lowercase letters, digits, '_', '.', '-'"
            )
        for field, value in (("limit", self.limit), ("uses", self.uses)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 10**9:
                raise ConfigurationError(f"quota {self.name}: {field} must be an integer 1-10^9")
        if self.per not in PERIODS:
            raise ConfigurationError(f"quota {self.name}: per= must be one of {', '.join(PERIODS)}")
        if self.uses > self.limit:  # no call could ever pass: a typo, refused at declaration
            raise ConfigurationError(
                f"quota {self.name}: one call uses {self.uses}, more than the limit {self.limit}"
            )

    def period(self, now: datetime) -> str:
        """The key of the period ``now`` falls in (``2026-12-01`` for a day)."""
        now = now.astimezone(UTC)
        return now.strftime({"hour": "%Y-%m-%dT%H", "day": "%Y-%m-%d", "month": "%Y-%m"}[self.per])

    def resets_at(self, now: datetime) -> datetime:
        """When the period ``now`` falls in ends (the next one starts at zero)."""
        now = now.astimezone(UTC)
        if self.per == "hour":
            return now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        if self.per == "day":
            return day + timedelta(days=1)
        return (day.replace(day=1) + timedelta(days=32)).replace(day=1)


def _upsert(dialect: Any) -> Any:
    q = quota_table
    statement = dialect.insert(q).values(
        tenant=bindparam("q_tenant"), quota=bindparam("q_quota"), period=bindparam("q_period"),
        used=bindparam("q_uses"),
    )  # fmt: skip
    return statement.on_conflict_do_update(
        index_elements=[q.c.tenant, q.c.quota, q.c.period],
        set_={"used": q.c.used + bindparam("q_uses")},
        where=q.c.used + bindparam("q_uses") <= bindparam("q_limit"),
    ).returning(q.c.used)


_PG_UPSERT = _upsert(postgresql)
_SQLITE_UPSERT = _upsert(sqlite)


def consume_quota(
    connection: Connection, quota: Quota, tenant: str, now: datetime, *, postgres: bool
) -> int | None:
    """Use ``quota`` once for ``tenant`` now; the uses left in the period, or ``None``: used up."""
    if quota.uses > quota.limit:
        return None
    row = connection.execute(
        _PG_UPSERT if postgres else _SQLITE_UPSERT,
        {
            "q_tenant": tenant, "q_quota": quota.name, "q_period": quota.period(now),
            "q_uses": quota.uses, "q_limit": quota.limit,
        },
    ).first()  # fmt: skip
    return None if row is None else quota.limit - int(row.used)
