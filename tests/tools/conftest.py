"""The reference service and the unsafe application, inventoried as `charter check` does."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from charter import Charter
from charter.cli import app as cli_app
from charter.demo.app import create_app
from charter.settings import Settings
from charter.tools.inventory import Inventory, inventory

#: The environment `charter check charter.demo:app` is run with (the README's, CI's).
DEMO_ENV = {"CHARTER_ENV": "development", "CHARTER_DATABASE_URL": "sqlite://"}


def demo_inventory(charter: Charter) -> Inventory:
    """The reference service on ``charter``, with Charter's CLI, as the CLI inventories it."""
    application = create_app(Settings.from_env(DEMO_ENV), charter=charter)
    return inventory(application, cli=cli_app)


@pytest.fixture
def demo() -> Iterator[Inventory]:
    charter = Charter(database_url="sqlite://", development=True, checkpoint_interval=None)
    yield demo_inventory(charter)
    charter.engine.dispose()


@pytest.fixture
def unsafe() -> Inventory:
    from tests import unsafe_app

    return inventory(unsafe_app.app, agent_tools=lambda _: unsafe_app.AGENT_TOOLS)
