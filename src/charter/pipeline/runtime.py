"""What every stage of every pipeline shares: the engine, sessions, clock, audit trail, caches.

One :class:`Runtime` per :class:`~charter.Charter`. Stages are built over it
once, when an action is declared, so a call passes nothing around but its
:class:`~charter.pipeline.call.Call`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from ..audit.trail import AuditTrail
from ..idempotency.store import OutcomeCache
from ..policy import Readers
from ..resources import ResourceSpec
from ..storage import WRITE_OPTION, is_postgres, keep_prepared_statements, translate_errors
from .loading import Adopter
from .tenancy import GateSession, TenantGuard, watch_writes

if TYPE_CHECKING:
    from ..ratelimit.limiter import RateLimiter

__all__ = ["Runtime"]


class Runtime:
    """The shared parts of the gate (see the module docstring)."""

    def __init__(
        self,
        *,
        engine: Engine,
        clock: Callable[[], datetime],
        audit_trail: AuditTrail,
        resources: Mapping[type[Any], ResourceSpec],
        readers: Readers,
        idempotency_retention: timedelta,
        recovery_lease: timedelta,
        conflict_retries: int,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.readers = readers
        self.audit_trail = audit_trail
        self.idempotency_retention = idempotency_retention
        self.recovery_lease = recovery_lease
        self.conflict_retries = conflict_retries
        #: PostgreSQL: row locks, and the statements that fold several writes into one.
        self.postgres = is_postgres(engine)
        writes = engine.execution_options(**{WRITE_OPTION: True})
        if self.postgres and engine.dialect.driver == "psycopg":
            keep_prepared_statements(writes)  # a refused call's ROLLBACK keeps them
        watch_writes(writes)  # did a handler that refused write anything? (TenantGuard.wrote)
        self.sessions = sessionmaker(writes, class_=GateSession, expire_on_commit=False)
        self.read_sessions = sessionmaker(engine, expire_on_commit=False)
        self.autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.outcomes = OutcomeCache()
        #: Counts calls per (tenant, actor, rate class); None: no limits (Charter(rate_limits=)).
        self.rate_limiter: RateLimiter | None = None
        self.tenancy = TenantGuard(resources)
        self.tenancy.install(self.sessions)
        self._adopters: dict[type[Any], Adopter] = {}

    def adopter(self, model: type[Any]) -> Adopter:
        """How Core rows of ``model`` become instances (built once per model)."""
        adopter = self._adopters.get(model)
        if adopter is None:
            adopter = self._adopters[model] = Adopter(model)
        return adopter

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        """A connection for reads outside any call's transaction, database errors translated.

        PostgreSQL: autocommit, so each statement is its own round trip, with no
        BEGIN and no COMMIT around it. SQLite: a plain connection (no write lock).
        """
        engine = self.autocommit if self.postgres else self.engine
        with translate_errors(), engine.connect() as connection:
            yield connection

    @contextmanager
    def write_session(self) -> Iterator[Session]:
        """A write transaction (SQLite: ``BEGIN IMMEDIATE``), database errors translated."""
        with translate_errors(), self.sessions() as session:
            yield session
