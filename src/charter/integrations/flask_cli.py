"""``flask charter ...``: the commands of :mod:`charter.cli`, on the Flask application's Charter.

Each command is the Typer command of ``charter`` itself (so the two cannot
differ), invoked with ``--app charter.integrations.flask_cli:current_charter``: the
Charter that ``CharterFlask.init_app`` gave the application Flask loaded.
``audit verify`` reads the application's database (its engine's URL) with the
audit keys and anchor from the environment, as ``charter audit verify`` does.
"""

from __future__ import annotations

import click
import typer
from flask import current_app
from flask.cli import AppGroup

from .. import cli
from ..errors import ConfigurationError
from ..gate import Charter

__all__ = ["charter_commands", "current_charter"]

CURRENT = "charter.integrations.flask_cli:current_charter"


def current_charter() -> Charter:
    """The Charter of the application handling the current request or command."""
    state = current_app.extensions.get("charter")
    if state is None:
        raise ConfigurationError("this Flask application has no CharterFlask (init_app)")
    charter: Charter = state.charter
    return charter


charter_commands = AppGroup("charter", help="Charter's commands, on this application's Charter.")
policy_commands = AppGroup("policy", help="Review the rules.")
audit_commands = AppGroup("audit", help="The tamper-evident audit trail.")
charter_commands.add_command(policy_commands)
charter_commands.add_command(audit_commands)


def _run(command: typer.models.CommandFunctionType, **arguments: object) -> None:
    """Run a Typer command of charter.cli; its exit codes become the click command's."""
    try:
        command(**arguments)
    except typer.Exit as exit_:
        raise click.exceptions.Exit(exit_.exit_code) from None


@charter_commands.command("pipeline")
@click.argument("action")
def pipeline(action: str) -> None:
    """List the stages ACTION runs, in order."""
    _run(cli.pipeline, action=action, app_spec=CURRENT, demo=False)


@policy_commands.command("matrix")
@click.option("--roles", default="member,approver,admin,support", show_default=True)
@click.option("--states", default="draft,submitted,approved", show_default=True)
@click.option("--format", "fmt", default="markdown", show_default=True)
def policy_matrix(roles: str, states: str, fmt: str) -> None:
    """Print roles x actions x states -> allow, deny or conditional."""
    _run(cli.policy_matrix, roles=roles, states=states, fmt=fmt, app_spec=CURRENT, demo=False)


@audit_commands.command("verify")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def audit_verify(as_json: bool) -> None:
    """Check every audit entry and checkpoint of this application's database."""
    url = current_charter().engine.url.render_as_string(hide_password=False)
    _run(cli.audit_verify, database_url=url, as_json=as_json)
