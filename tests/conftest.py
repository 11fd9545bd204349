"""Shared fixtures: one suite, parametrized over SQLite and PostgreSQL."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from charter import Actor, Charter
from charter.migrate import upgrade
from charter.storage import make_engine

from . import app as test_app

PG_URL = os.environ.get(
    "CHARTER_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/charter_test"
)
REDIS_URL = os.environ.get("CHARTER_REDIS_URL", "redis://127.0.0.1:6379/0")
IN_CI = os.environ.get("CI", "").lower() == "true"
AUDIT_KEYS = {"k1": "test-audit-key-0123456789abcdef"}
DEMO_MIGRATIONS = ("charter.demo:migrations",)


def _ensure_pg_database(url: str) -> str | None:
    """Create the test database if missing; return a reason when PostgreSQL is unusable."""
    from sqlalchemy.engine import make_url

    target = make_url(url)
    admin = make_engine(target.set(database="postgres").render_as_string(hide_password=False))
    try:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            exists = conn.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": target.database}
            ).scalar()
            if not exists:
                conn.execute(text(f'CREATE DATABASE "{target.database}"'))
    except Exception as exc:
        return f"PostgreSQL unavailable at {target.render_as_string()}: {exc.__class__.__name__}"
    finally:
        admin.dispose()
    return None


_pg_state: dict[str, str | None] = {}


def require_postgres() -> str:
    if "reason" not in _pg_state:
        _pg_state["reason"] = _ensure_pg_database(PG_URL)
    reason = _pg_state["reason"]
    if reason is not None:
        if IN_CI:
            pytest.fail(f"CI requires PostgreSQL: {reason}")
        pytest.skip(reason)
    return PG_URL


_redis_state: dict[str, str | None] = {}


def require_redis() -> str:
    """``CHARTER_REDIS_URL`` if Redis answers; under CI a failure, elsewhere a skip with why."""
    if "reason" not in _redis_state:
        try:
            import redis

            client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=1)
            try:
                client.ping()
                _redis_state["reason"] = None
            finally:
                client.close()
        except Exception as exc:
            _redis_state["reason"] = f"Redis unavailable at {REDIS_URL}: {exc.__class__.__name__}"
    reason = _redis_state["reason"]
    if reason is not None:
        if IN_CI:
            pytest.fail(f"CI requires Redis: {reason}")
        pytest.skip(reason)
    return REDIS_URL


_CHARTER_TABLES = ("charter_audit", "charter_audit_checkpoints", "charter_audit_links")


@pytest.fixture(scope="session")
def pg_schema() -> str:
    """Migrate the PostgreSQL test database once per session (fresh tables)."""
    url = require_postgres()
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS alembic_version, test_docs CASCADE"))
            for table in (
                *_CHARTER_TABLES,
                "invoices",
                "plan_upgrades",  # the reference service's plan-upgrade flows (demo_0004)
                "charter_idempotency_outcomes",
                "charter_idempotency",
                "charter_webhook_messages",
                "charter_ledger",  # credits (charter_0007)
                "charter_credit_holds",
                "charter_credit_accounts",
                "charter_quota_counters",
                "charter_impersonation_sessions",  # support sessions (charter_0011)
                "charter_agent_confirmations",  # agents' pending calls (charter_0010)
            ):
                conn.execute(text(f"DROP TABLE IF EXISTS {table} CASCADE"))
        upgrade(engine, extra_locations=DEMO_MIGRATIONS)
        test_app.Base.metadata.create_all(engine)
    finally:
        engine.dispose()
    return url


def _truncate_pg(url: str) -> None:
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            names = (
                conn.execute(
                    text(
                        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                        "AND tablename <> 'alembic_version' AND tablename NOT LIKE 'policy%' "
                        "AND tablename NOT LIKE 'bench%'"
                    )
                )
                .scalars()
                .all()
            )
            if names:
                conn.execute(text(f"TRUNCATE {', '.join(names)} RESTART IDENTITY CASCADE"))
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A freshly migrated database: a SQLite file, or the truncated PostgreSQL test database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'charter.db'}"
        engine = make_engine(url)
        try:
            upgrade(engine, extra_locations=DEMO_MIGRATIONS)
            test_app.Base.metadata.create_all(engine)
        finally:
            engine.dispose()
        return url
    url: str = request.getfixturevalue("pg_schema")
    _truncate_pg(url)
    return url


@pytest.fixture
def charter(database_url: str) -> Iterator[Charter]:
    instance = test_app.build(Charter(database_url=database_url, audit_keys=AUDIT_KEYS))
    yield instance
    instance.engine.dispose()


Owned = TypeVar("Owned", Charter, Engine)


@pytest.fixture
def disposing() -> Iterator[Callable[[Owned], Owned]]:
    """``disposing(Charter(...))``: the Charter (or Engine) is disposed at teardown, pass or fail.

    Disposing as the last line of a test is skipped when the test fails or errors;
    the pool's psycopg connections are then closed by the garbage collector, in
    whichever later test it runs, and psycopg's ResourceWarning ("... was deleted
    while still open") fails that test under ``filterwarnings = error``.
    """
    owned: list[Charter | Engine] = []

    def own(instance: Owned) -> Owned:
        owned.append(instance)
        return instance

    yield own
    for instance in reversed(owned):
        (instance.engine if isinstance(instance, Charter) else instance).dispose()


@pytest.fixture
def alice() -> Actor:
    return Actor.make("alice", "acme", roles={"member"})


@pytest.fixture
def eve() -> Actor:
    """A member of another tenant."""
    return Actor.make("eve", "globex", roles={"member", "editor"})


@pytest.fixture
def editor() -> Actor:
    return Actor.make("ed", "acme", roles={"member", "editor"})
