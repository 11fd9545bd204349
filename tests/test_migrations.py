"""Alembic migrations produce exactly the tables the code declares."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import MetaData

from charter.demo.models import Base as DemoBase
from charter.storage import make_engine, metadata


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
