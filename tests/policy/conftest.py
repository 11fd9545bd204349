"""Fixtures for the policy tests: actors, a context, SQLite and PostgreSQL sessions."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session

from charter.actor import Actor, Channel
from charter.context import ActionContext

from .models import Base

PG_URL = os.environ.get(
    "CHARTER_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/charter_test"
)
NOW = datetime(2025, 3, 1, 12, 0, 0)


def make_ctx(actor: Actor, action: str = "invoice.approve", **extra: object) -> ActionContext:
    return ActionContext(
        action=action, actor=actor, channel=Channel.HTTP, now=NOW, request_id="req-1", **extra
    )  # type: ignore[arg-type]


@pytest.fixture
def approver() -> Actor:
    return Actor.make(
        "u-approver",
        "t1",
        roles=["approver"],
        scopes=["invoices:*"],
        attributes={"approval_limit": Decimal("5000")},
    )


@pytest.fixture
def sqlite_engine(tmp_path: object) -> Iterator[Engine]:
    engine = sa.create_engine("sqlite://")
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


def _pg_engine() -> Engine:
    url = make_url(PG_URL)
    admin = sa.create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    engine = sa.create_engine(url)
    try:
        try:
            with admin.connect() as conn:
                exists = conn.scalar(
                    sa.text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": url.database}
                )
                if not exists:
                    conn.execute(sa.text(f'CREATE DATABASE "{url.database}"'))
        finally:
            admin.dispose()
        with engine.connect():
            pass
    except sa.exc.OperationalError as exc:
        engine.dispose()
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL at {PG_URL} is required in CI: {exc}")
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}: {exc.orig}")
    return engine


@pytest.fixture(scope="session")
def pg_engine() -> Iterator[Engine]:
    engine = _pg_engine()
    try:
        Base.metadata.drop_all(engine)
        Base.metadata.create_all(engine)
        yield engine
        Base.metadata.drop_all(engine)
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest) -> Engine:
    """The same suite over SQLite and PostgreSQL."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_engine")  # type: ignore[no-any-return]
    return request.getfixturevalue("pg_engine")  # type: ignore[no-any-return]


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    with Session(engine) as s:
        for table in reversed(Base.metadata.sorted_tables):
            s.execute(table.delete())
        s.commit()
        yield s
        s.rollback()
