"""Alembic migrations produce exactly the tables the code declares."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import MetaData, Table, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session

from charter.demo.models import Base as DemoBase
from charter.idempotency import lookup
from charter.migrate import alembic_config
from charter.storage import make_engine, metadata

from .conftest import require_postgres


def test_the_migrated_schema_matches_the_declared_tables(database_url):
    target = MetaData()
    for source in (metadata, DemoBase.metadata):
        for table in source.tables.values():
            table.to_metadata(target)
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            diffs = [d for d in compare_metadata(context, target) if _ours(d, target)]
    finally:
        engine.dispose()
    assert [] == diffs


def _ours(diff: tuple, target: MetaData) -> bool:
    """Ignore tables of the test application, which live in the same database."""
    kind, obj = diff[0], diff[1]
    table = obj if kind.endswith("_table") else getattr(obj, "table", None)
    return table is None or table.name in target.tables


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with no tables at all (PostgreSQL: a scratch database, recreated)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'migrations.db'}"
        return
    base = make_url(require_postgres())
    scratch = base.set(database=f"{base.database}_migrations")
    admin = make_engine(base.set(database="postgres").render_as_string(hide_password=False))
    try:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{scratch.database}"'))
            conn.execute(text(f'CREATE DATABASE "{scratch.database}"'))
    finally:
        admin.dispose()
    yield scratch.render_as_string(hide_password=False)


def _migrate(engine: Engine, step: Callable[[Config, str], None], revision: str) -> None:
    config = alembic_config()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        step(config, revision)


def test_outcomes_keep_their_data_when_rekeyed_by_scope_and_back(empty_database):
    engine = make_engine(empty_database)
    now = datetime(2026, 11, 22, 9, 30, tzinfo=UTC)
    try:
        _migrate(engine, command.upgrade, "charter_0002")
        with engine.begin() as conn:
            claims = Table("charter_idempotency", MetaData(), autoload_with=conn)
            outcomes = Table("charter_idempotency_outcomes", MetaData(), autoload_with=conn)
            common = {"tenant": "acme", "subject": "alice", "fingerprint": "f" * 64,
                      "action": "doc.charge", "phase": 0, "created_at": now,
                      "expires_at": now + timedelta(hours=24)}  # fmt: skip
            conn.execute(claims.insert(), [{"id": 7, "key": "done", **common},
                                           {"id": 8, "key": "running", **common}])  # fmt: skip
            conn.execute(
                outcomes.insert(),
                {"claim_id": 7, "resource_id": "d1", "response_status": 201,
                 "response_body": {"charged": "5.00"}, "error": None, "outcome": "ok",
                 "completed_at": now},
            )  # fmt: skip

        _migrate(engine, command.upgrade, "charter_0003")
        _migrate(engine, command.upgrade, "head")  # lookup() reads today's columns
        with Session(engine) as session:
            done = lookup(session, "acme", "alice", "done")
            running = lookup(session, "acme", "alice", "running")
        assert done is not None
        assert running is not None
        assert (201, {"charged": "5.00"}, "ok", "d1") == (
            done.response_status,
            done.response_body,
            done.outcome,
            done.resource_id,
        )
        assert None is running.completed_at  # still in progress, as before

        _migrate(engine, command.downgrade, "charter_0002")
        with engine.connect() as conn:
            back = conn.execute(text("SELECT claim_id, response_status FROM "
                                     "charter_idempotency_outcomes")).all()  # fmt: skip
        assert [(7, 201)] == [tuple(row) for row in back]
    finally:
        engine.dispose()
