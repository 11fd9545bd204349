"""Database plumbing: engines for SQLite and PostgreSQL, transactions, error translation.

SQLite is the embedded default: WAL journal, foreign keys on, a busy timeout,
and write transactions opened with ``BEGIN IMMEDIATE`` so two writers never
deadlock on a read-to-write lock upgrade (SQLite serializes writers anyway;
``SELECT ... FOR UPDATE`` does not exist there). PostgreSQL runs through
psycopg 3 with the row locks the gate asks for.

No connection pre-ping: it would add a round trip to every transaction. A lost
connection is detected when it is used, the pool is invalidated by SQLAlchemy,
and the caller gets :class:`~charter.errors.StorageUnavailable` (503, retryable).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import MetaData, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.engine.url import make_url
from sqlalchemy.pool import StaticPool

from .errors import CharterError, Conflict, StorageError, StorageUnavailable

__all__ = [
    "WRITE_OPTION",
    "begin_now",
    "is_postgres",
    "is_sqlite",
    "make_engine",
    "metadata",
    "translate_errors",
]

#: Charter's own tables (audit trail, checkpoints, idempotency records...).
metadata = MetaData()

#: Execution option that marks a connection as about to write (SQLite: BEGIN IMMEDIATE).
WRITE_OPTION = "charter_write"


def make_engine(
    url: str,
    *,
    pool_size: int = 10,
    max_overflow: int = 20,
    echo: bool = False,
    lock_timeout_ms: int | None = 10_000,
) -> Engine:
    """Create an engine configured the way the gate needs it."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        pooling: dict[str, Any] = {"pool_size": pool_size, "max_overflow": max_overflow}
        if parsed.database in (None, "", ":memory:"):
            # One shared connection, or every checkout would see its own empty database.
            pooling = {"poolclass": StaticPool}
        engine = create_engine(
            parsed,
            echo=echo,
            connect_args={"check_same_thread": False, "timeout": 30},
            **pooling,
        )
        configure_sqlite(engine)
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() in ("", "psycopg2"):
        # Charter is tested against psycopg 3; map the bare scheme onto it.
        parsed = parsed.set(drivername="postgresql+psycopg")
    connect_args: dict[str, Any] = {}
    if parsed.get_backend_name() == "postgresql" and lock_timeout_ms is not None:
        # Bound every lock wait (row locks, a concurrent duplicate's idempotency
        # claim) as a connection setting: no extra statement per transaction.
        connect_args["options"] = f"-c lock_timeout={int(lock_timeout_ms)}"
    return create_engine(
        parsed,
        echo=echo,
        pool_size=pool_size,
        max_overflow=max_overflow,
        connect_args=connect_args,
    )


def configure_sqlite(engine: Engine) -> None:
    """WAL, foreign keys, busy timeout, and explicit BEGIN control (see module docstring)."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module, which would
        # otherwise open transactions lazily and defeat BEGIN IMMEDIATE.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            if engine.url.database not in (None, "", ":memory:"):
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if conn.get_execution_options().get(WRITE_OPTION):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")


def keep_prepared_statements(engine: Engine) -> None:
    """Roll ``engine``'s PostgreSQL transactions back without losing the prepared statements.

    psycopg's ``rollback()`` forgets every prepared statement of the connection
    and sends ``DEALLOCATE ALL``: it cannot tell whether the transaction changed
    the schema under a cached plan. Every refused call rolls back, so under
    refusals the statements of the next calls on that connection were parsed and
    planned again until psycopg prepared them anew: with one approval in five
    refused, the allowed ones took 25% longer (benchmarks/RESULTS.md). The gate's
    transactions change no schema (a handler must not run DDL), so their
    ROLLBACK goes to libpq directly, through psycopg's documented
    ``Connection.pgconn``; psycopg's own rollback then finds the connection idle
    and does nothing. When that fails (a connection that is gone), psycopg's
    rollback runs as before and reports what happened.
    """
    from psycopg import pq

    open_states = (pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR)

    @event.listens_for(engine, "rollback")
    def _rollback(conn: Connection) -> None:
        try:
            pgconn = conn.connection.driver_connection.pgconn  # type: ignore[union-attr]
            if pgconn.transaction_status in open_states:
                pgconn.exec_(b"ROLLBACK")
        except Exception:  # noqa: S110 - psycopg's rollback, next, raises what is wrong
            pass


def begin_now(connection: Connection) -> None:
    """Send ``connection``'s BEGIN now, not with its first statement (PostgreSQL, psycopg).

    psycopg begins a transaction with a round trip of its own just before the
    first statement. A caller with another round trip in flight (the rate limit's
    count, :mod:`charter.ratelimit.stage`) sends BEGIN first, so that the two
    overlap: the command psycopg would send (its isolation level, read-only and
    deferrable settings), through libpq and psycopg's documented
    ``Connection.pgconn``, as :func:`keep_prepared_statements` does for ROLLBACK;
    psycopg then finds the transaction open and sends none. Best effort: on
    another driver, or when BEGIN fails, nothing is changed, and psycopg's own
    BEGIN with the first statement reports what is wrong.
    """
    from psycopg import Connection as PsycopgConnection
    from psycopg import pq

    raw = connection.connection.driver_connection
    if not isinstance(raw, PsycopgConnection) or raw.autocommit:
        return
    try:
        if raw.pgconn.transaction_status != pq.TransactionStatus.IDLE:
            return
        parts = [b"BEGIN"]
        if raw.isolation_level is not None:
            parts.append(b"ISOLATION LEVEL " + raw.isolation_level.name.replace("_", " ").encode())
        if raw.read_only is not None:
            parts.append(b"READ ONLY" if raw.read_only else b"READ WRITE")
        if raw.deferrable is not None:
            parts.append(b"DEFERRABLE" if raw.deferrable else b"NOT DEFERRABLE")
        raw.pgconn.exec_(b" ".join(parts))
    except Exception:  # noqa: S110 - psycopg's BEGIN, with the first statement, raises it
        pass


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def _is_unavailable(exc: sa_exc.DBAPIError) -> bool:
    if exc.connection_invalidated:
        return True
    if isinstance(exc, sa_exc.OperationalError):
        # Lost connections, refused connections, server shutdown, SQLite
        # "database is locked" after the busy timeout: all retryable.
        return True
    return isinstance(exc, sa_exc.InterfaceError)


@contextmanager
def translate_errors() -> Iterator[None]:
    """Translate SQLAlchemy and driver exceptions into Charter errors.

    The original exception is chained (``from exc``) for logs; clients only see
    the Charter error, with no driver text that could leak schema details.
    """
    try:
        yield
    except CharterError:
        raise
    except sa_exc.TimeoutError as exc:  # pool exhausted
        raise StorageUnavailable("The database is busy; retry shortly.") from exc
    except sa_exc.IntegrityError as exc:
        raise Conflict(
            "The change conflicts with existing data (a uniqueness or reference rule)."
        ) from exc
    except sa_exc.DBAPIError as exc:
        if _is_unavailable(exc):
            raise StorageUnavailable(
                "The database is unavailable; the request was not carried out. Retry shortly."
            ) from exc
        raise StorageError("The database rejected the operation.") from exc
    except sa_exc.SQLAlchemyError as exc:
        raise StorageError("The database layer failed.") from exc
