"""The charter command: a thin layer over the library, with useful exit codes."""

from __future__ import annotations

import pytest
from sqlalchemy import update
from typer.testing import CliRunner

from charter import Charter
from charter.audit import audit_table
from charter.cli import app
from charter.demo.service import build_charter
from charter.testing import make_actor

runner = CliRunner()


@pytest.fixture
def env(tmp_path, monkeypatch) -> str:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("CHARTER_ENV", "development")
    monkeypatch.setenv("CHARTER_DATABASE_URL", url)
    return url


def test_db_upgrade_then_audit_verify_show_and_tamper(env, disposing):
    assert 0 == runner.invoke(app, ["db", "upgrade"]).exit_code
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
    result = runner.invoke(app, ["policy", "matrix", "--format", fmt])
    assert 0 == result.exit_code
    assert "invoice.approve" in result.output


def test_a_bad_format_or_app_is_a_clear_error():
    assert 2 == runner.invoke(app, ["policy", "matrix", "--format", "xml"]).exit_code
    assert 2 == runner.invoke(app, ["policy", "matrix", "--app", "nope.nothing:x"]).exit_code


def test_idempotency_purge_and_resume_run(env):
    assert 0 == runner.invoke(app, ["db", "upgrade"]).exit_code
    assert "removed 0" in runner.invoke(app, ["idempotency", "purge"]).output
    assert "resumed 0" in runner.invoke(app, ["idempotency", "resume"]).output


def test_production_without_secrets_refuses_to_run(monkeypatch):
    monkeypatch.setenv("CHARTER_ENV", "production")
    monkeypatch.delenv("CHARTER_TOKEN_SECRET", raising=False)
    result = runner.invoke(app, ["audit", "verify"])
    assert 2 == result.exit_code


def test_pipeline_lists_an_actions_stages_in_order():
    result = runner.invoke(app, ["pipeline", "invoice.approve"])
    assert 0 == result.exit_code
    names = [line.split()[1] for line in result.output.splitlines()[1:]]
    assert "validate" == names[0]
    assert names.index("decide") < names.index("handler") < names.index("commit")
    assert 1 == runner.invoke(app, ["pipeline", "invoice.nothing"]).exit_code


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
