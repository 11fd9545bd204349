"""Alembic environment: runs on the connection handed over by :mod:`charter.migrate`."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - always called through charter.migrate
    raise RuntimeError("run Charter's migrations through `charter db upgrade`")

context.configure(connection=connection, target_metadata=None, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
