"""The charter command: a thin layer over the library, with useful exit codes."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import inspect, update
from typer.testing import CliRunner

from charter import Charter, cli
from charter.audit import audit_table
from charter.cli import app
from charter.demo.service import build_charter
from charter.settings import Settings
from charter.storage import make_engine
from charter.testing import make_actor
from charter.webhooks import generate_secret

runner = CliRunner()


@pytest.fixture
def env(tmp_path, monkeypatch) -> str:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("CHARTER_ENV", "development")
    monkeypatch.setenv("CHARTER_DATABASE_URL", url)
    return url


def test_db_upgrade_then_audit_verify_show_and_tamper(env, disposing):
    assert 0 == runner.invoke(app, ["db", "upgrade", "--demo"]).exit_code
    charter = disposing(build_charter(Charter(database_url=env, development=True)))
    alice = make_actor("alice", "acme", "member")
    outcome = charter.execute(alice, "invoice.create", {"customer": "x", "amount": "10"})
    verified = runner.invoke(app, ["audit", "verify"])
    assert (0, True) == (verified.exit_code, "verified" in verified.output)
    shown = runner.invoke(app, ["audit", "show", "invoices", outcome.resource_id])
    assert "invoice.create" in shown.output
    assert 0 == runner.invoke(app, ["audit", "checkpoint"]).exit_code
    with charter.engine.begin() as conn:
        conn.execute(update(audit_table).values(reason="edited"))
    tampered = runner.invoke(app, ["audit", "verify", "--json"])
    assert (1, True) == (tampered.exit_code, '"modified"' in tampered.output)


@pytest.mark.parametrize("fmt", ["markdown", "csv", "json"])
def test_policy_matrix_prints_every_format(fmt):
    result = runner.invoke(app, ["policy", "matrix", "--demo", "--format", fmt])
    assert 0 == result.exit_code
    assert "invoice.approve" in result.output


def test_a_bad_format_or_app_is_a_clear_error():
    assert 2 == runner.invoke(app, ["policy", "matrix", "--demo", "--format", "xml"]).exit_code
    assert 2 == runner.invoke(app, ["policy", "matrix", "--app", "nope.nothing:x"]).exit_code


@pytest.mark.parametrize(
    "command", [["policy", "matrix"], ["pipeline", "invoice.pay"], ["idempotency", "resume"]]
)
def test_an_app_command_without_app_or_demo_says_what_to_give(command):
    result = runner.invoke(app, command)
    assert 2 == result.exit_code
    assert "--app module:attribute" in result.output
    assert "--demo" in result.output


def test_idempotency_purge_and_resume_run(env):
    assert 0 == runner.invoke(app, ["db", "upgrade", "--demo"]).exit_code
    assert "removed 0" in runner.invoke(app, ["idempotency", "purge"]).output
    assert "resumed 0" in runner.invoke(app, ["idempotency", "resume", "--demo"]).output


def test_the_command_lines_overrides_replace_only_their_own_settings(monkeypatch):
    monkeypatch.setenv("CHARTER_ENV", "development")
    monkeypatch.setenv("CHARTER_DATABASE_URL", "sqlite:///from-env.db")
    monkeypatch.setenv("CHARTER_PAYMENTS_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("CHARTER_PAYMENTS_WEBHOOK_SECRET", generate_secret())
    expected = dataclasses.replace(Settings.from_env(), database_url="sqlite:///flag.db")
    assert expected == cli._settings("sqlite:///flag.db")
    assert Settings.from_env() == cli._settings(None)


def test_db_upgrade_migrates_charter_and_the_applications_directories_only(tmp_path, monkeypatch):
    monkeypatch.setenv("CHARTER_ENV", "development")
    url = f"sqlite:///{tmp_path / 'own.db'}"
    assert 0 == runner.invoke(app, ["db", "upgrade", "--database-url", url]).exit_code
    engine = make_engine(url)
    try:
        tables = set(inspect(engine).get_table_names())
        assert {"charter_audit", "charter_idempotency"} <= tables
        assert "invoices" not in tables
        mine = ["db", "upgrade", "--database-url", url, "--migrations", "charter.demo:migrations"]
        assert 0 == runner.invoke(app, mine).exit_code
        assert "invoices" in inspect(engine).get_table_names()
    finally:
        engine.dispose()


def test_production_without_secrets_refuses_to_run(monkeypatch):
    monkeypatch.setenv("CHARTER_ENV", "production")
    monkeypatch.delenv("CHARTER_TOKEN_SECRET", raising=False)
    result = runner.invoke(app, ["audit", "verify"])
    assert 2 == result.exit_code


def test_pipeline_lists_an_actions_stages_in_order():
    result = runner.invoke(app, ["pipeline", "invoice.approve", "--demo"])
    assert 0 == result.exit_code
    names = [line.split()[1] for line in result.output.splitlines()[1:]]
    assert ["rate_limit", "validate"] == names[:2]
    assert names.index("decide") < names.index("handler") < names.index("commit")
    assert 1 == runner.invoke(app, ["pipeline", "invoice.nothing", "--demo"]).exit_code


def test_an_app_is_found_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "shop_service.py").write_text(
        "from charter import Charter\n"
        "from charter.demo.service import build_charter\n"
        "charter = build_charter(Charter(database_url='sqlite://', development=True))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        "sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))]
    )
    result = runner.invoke(app, ["pipeline", "invoice.pay", "--app", "shop_service:charter"])
    assert 0 == result.exit_code
    assert "handler" in result.output


CHARTER = str(Path(sys.executable).parent / "charter")


def test_policy_matrix_finds_the_app_in_the_working_directory_without_pythonpath(tmp_path):
    (tmp_path / "service.py").write_text(
        textwrap.dedent(
            """
            from charter import Charter
            from charter.demo.service import build_charter

            charter = build_charter(Charter(database_url="sqlite://", development=True))
            """
        )
    )
    for command in (["policy", "matrix"], ["pipeline", "invoice.pay"]):
        result = subprocess.run(
            [CHARTER, *command, "--app", "service:charter"],
            cwd=tmp_path,
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert 0 == result.returncode, result.stderr  # was: No module named 'service'
        assert "invoice.pay" in result.stdout


# -- charter support sessions revoke: an operator of the directory, as charter run --------------


@pytest.fixture
def opened_session(env, disposing, monkeypatch) -> tuple[Charter, str]:
    """An open support session (sam for alice) in the reference service's database."""
    from charter.sessions import ImpersonationSessions

    monkeypatch.delenv("CHARTER_OPERATORS", raising=False)
    assert 0 == runner.invoke(app, ["db", "upgrade", "--demo"]).exit_code
    charter = disposing(build_charter(Charter(database_url=env, development=True)))
    sam = make_actor("sam", "acme", "support", kind="support", scopes={"support:sessions"})
    return charter, ImpersonationSessions.of(charter).open(sam, "alice", reason="ticket 1").id


def revocations(charter: Charter) -> list[tuple[str, str, str, str]]:
    with charter.engine.connect() as conn:
        rows = conn.execute(
            audit_table.select().where(audit_table.c.action == "support.session.revoke")
        )
        return [(r.subject, r.subject_kind, r.channel, r.outcome) for r in rows]


@pytest.mark.parametrize("who", ["nobody-at-all", "operator", "alice", "ops-olga "])
def test_revoking_as_a_name_no_operator_directory_knows_is_refused_like_charter_run(
    opened_session, who
):
    charter, session = opened_session
    result = runner.invoke(
        app, ["support", "sessions", "revoke", session, "--reason", "r", "--as", who, "--demo"]
    )
    assert 1 == result.exit_code, result.output
    assert "unknown_operator" in result.output
    assert [] == revocations(charter)
    listed = runner.invoke(app, ["support", "sessions", "list", "--json", "--demo"])
    assert '"status": "open"' in listed.output


def test_an_operator_of_the_directory_revokes_as_itself_when_the_gate_allows_it(
    opened_session, tmp_path
):
    charter, session = opened_session
    directory = tmp_path / "operators.json"
    directory.write_text(
        '{"ops-sue": {"tenant": "acme", "roles": ["operator"], "scopes": ["support:sessions"]}}'
    )
    args = ["support", "sessions", "revoke", session, "--reason", "left open", "--demo"]
    refused = runner.invoke(app, [*args, "--as", "ops-olga"])  # the demo's: no support:sessions
    assert 1 == refused.exit_code, refused.output
    revoked = runner.invoke(app, [*args, "--as", "ops-sue", "--operators", str(directory)])
    assert 0 == revoked.exit_code, revoked.output
    assert "revoked by ops-sue" in revoked.output
    assert ("ops-sue", "operator", "cli", "ok") == revocations(charter)[-1]
