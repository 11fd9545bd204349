"""Schema migrations (Alembic) for Charter's tables and, optionally, an application's.

Charter's revisions form the ``charter`` branch. An application adds its own
version directories (``extra_locations``), whose revisions may declare
``depends_on = "charter_0001"``; :func:`upgrade` brings every branch to its head.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Engine

from .storage import translate_errors

__all__ = ["alembic_config", "upgrade"]


def alembic_config(extra_locations: Sequence[str] = ()) -> Config:
    config = Config()
    config.set_main_option("script_location", "charter:migrations")
    locations = ["charter:migrations/versions", *extra_locations]
    config.set_main_option("version_locations", " ".join(locations))
    config.set_main_option("path_separator", "space")
    return config


def upgrade(engine: Engine, *, extra_locations: Sequence[str] = ()) -> None:
    """Bring Charter's tables (and the given application branches) to their heads."""
    config = alembic_config(extra_locations)
    with translate_errors(), engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "heads")
