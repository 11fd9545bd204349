"""Alembic migrations for Charter's own tables (branch ``charter``)."""
