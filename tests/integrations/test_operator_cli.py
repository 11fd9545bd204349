"""charter run and charter export: an operator acts through the gate, never around it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from typer.testing import CliRunner

from charter import Actor, Charter
from charter.actor import ActorKind
from charter.audit import audit_table
from charter.cli import app
from charter.demo.app import create_app, demo_scopes
from charter.demo.models import Invoice
from charter.demo.service import DEMO_USERS, build_charter
from charter.errors import ConfigurationError
from charter.integrations.operator import (
    MAX_INPUT,
    OperatorDirectory,
    UnknownOperator,
    parse_input,
)
from charter.settings import DEVELOPMENT_TOKEN_SECRET, Settings
from charter.tokens import TokenSigner

runner = CliRunner()


@pytest.fixture
def demo_db(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Charter]:
    """The reference service on the test database, as `charter ... --demo` reaches it."""
    monkeypatch.setenv("CHARTER_ENV", "development")
    monkeypatch.setenv("CHARTER_DATABASE_URL", database_url)
    monkeypatch.delenv("CHARTER_OPERATORS", raising=False)
    charter = build_charter(Charter(database_url=database_url, development=True))
    yield charter
    charter.engine.dispose()


def charter_run(*args: str) -> Any:
    return runner.invoke(app, ["run", *args, "--demo"])


def create(*, operator: str = "ops-olga", amount: str = "120.00") -> int:
    result = charter_run(
        "invoice.create", "--as", operator, "--reason", "migrating a paper invoice",
        "--input", json.dumps({"customer": "ACME", "amount": amount}),
    )  # fmt: skip
    assert 0 == result.exit_code, result.output
    return int(json.loads(result.stdout)["resource_id"])


def entries(charter: Charter) -> int:
    with charter.engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(audit_table)).scalar_one())


def entry(charter: Charter, entry_id: int) -> Any:
    with charter.engine.connect() as connection:
        return connection.execute(select(audit_table).where(audit_table.c.id == entry_id)).one()


def state(charter: Charter, invoice_id: int) -> str:
    with charter.session() as session:
        return str(session.get(Invoice, invoice_id).state)  # type: ignore[union-attr]


def test_an_allowed_operator_voids_with_its_reason_recorded_on_channel_cli(demo_db):
    invoice = create()
    result = charter_run(
        "invoice.void", "--as", "ops-olga", "--reason", "customer asked", "--target", str(invoice)
    )
    assert 0 == result.exit_code, result.output
    printed = json.loads(result.stdout)
    assert (True, "void", str(invoice)) == (
        printed["ok"], printed["body"]["state"], printed["resource_id"]
    )  # fmt: skip
    row = entry(demo_db, printed["audit_entry"]["id"])
    assert ("cli", "ops-olga", "operator", "customer asked", "allow", "ok", "invoice.void") == (
        row.channel, row.subject, row.subject_kind, row.reason, row.decision, row.outcome,
        row.action,
    )  # fmt: skip
    assert (row.stream, row.seq) == (
        printed["audit_entry"]["stream"],
        printed["audit_entry"]["seq"],
    )
    assert sorted(["invoices:read", "invoices:write"]) == row.scopes
    assert "void" == state(demo_db, invoice)


def test_a_rule_that_does_not_allow_the_operator_refuses_it_exit_1_and_audited(demo_db):
    invoice = create(operator="ops-olga")
    # ops-oscar is a member: CAN_VOID allows the creator or an admin, and he is neither.
    result = charter_run(
        "invoice.void", "--as", "ops-oscar", "--reason", "tidy up", "--target", str(invoice)
    )
    assert 1 == result.exit_code
    printed = json.loads(result.stdout)
    assert (False, "forbidden", 403) == (printed["ok"], printed["code"], printed["status"])
    assert "Traceback" not in result.output
    assert "error (forbidden)" in result.output
    row = entry(demo_db, printed["audit_entry"]["id"])
    assert ("deny", "forbidden", "cli", "ops-oscar", "tidy up") == (
        row.decision, row.outcome, row.channel, row.subject, row.reason
    )  # fmt: skip
    assert "draft" == state(demo_db, invoice)


def test_an_operator_without_the_scope_cannot_approve_whatever_its_roles(demo_db):
    invoice = create(operator="ops-oscar")
    assert 0 == charter_run("invoice.submit", "--as", "ops-oscar", "--reason", "r",
                            "--target", str(invoice)).exit_code  # fmt: skip
    result = charter_run(
        "invoice.approve", "--as", "ops-olga", "--reason", "urgent", "--target", str(invoice)
    )
    assert (1, "forbidden") == (result.exit_code, json.loads(result.stdout)["code"])
    assert "submitted" == state(demo_db, invoice)


def test_another_tenants_operator_finds_nothing(demo_db):
    invoice = create()
    result = charter_run("invoice.void", "--as", "ops-gus", "--reason", "x", "--target",
                         str(invoice))  # fmt: skip
    assert (1, "not_found") == (result.exit_code, json.loads(result.stdout)["code"])


@pytest.mark.parametrize("reason", [None, "", "   "])
def test_the_reason_is_mandatory_and_nothing_runs_without_one(demo_db, reason):
    invoice = create()
    before = entries(demo_db)
    args = ["invoice.void", "--as", "ops-olga", "--target", str(invoice)]
    result = charter_run(*args, *([] if reason is None else ["--reason", reason]))
    assert 2 == result.exit_code
    assert (before, "draft") == (entries(demo_db), state(demo_db, invoice))


@pytest.mark.parametrize("who", ["ops-nobody", "alice", "", "ops-olga "])
def test_an_unknown_operator_is_refused_before_anything_runs(demo_db, who):
    """A user of the user directory (alice) is no operator."""
    invoice = create()
    before = entries(demo_db)
    result = charter_run("invoice.void", "--as", who, "--reason", "r", "--target", str(invoice))
    assert 1 == result.exit_code
    assert "unknown_operator" in result.output
    assert (before, "draft") == (entries(demo_db), state(demo_db, invoice))


def test_a_key_makes_the_second_run_a_replay(demo_db):
    args = ["invoice.create", "--as", "ops-olga", "--reason", "r", "--key", "paper-17",
            "--input", '{"customer": "ACME", "amount": "5"}']  # fmt: skip
    first, second = json.loads(charter_run(*args).stdout), json.loads(charter_run(*args).stdout)
    assert (False, True) == (first["replayed"], second["replayed"])
    assert first["resource_id"] == second["resource_id"]
    assert "replay" == entry(demo_db, second["audit_entry"]["id"]).rule


def test_input_is_strict_json_bounded_and_may_come_from_a_file(demo_db, tmp_path):
    base = ["invoice.create", "--as", "ops-olga", "--reason", "r"]
    twice = charter_run(*base, "--input", '{"customer": "A", "amount": "1", "amount": "900"}')
    assert (2, True) == (twice.exit_code, "malformed_body" in twice.output)
    nan = charter_run(*base, "--input", '{"customer": "A", "amount": NaN}')
    assert 2 == nan.exit_code
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"customer": "x" * MAX_INPUT, "amount": "1"}))
    assert 2 == charter_run(*base, "--input", f"@{big}").exit_code
    good = tmp_path / "invoice.json"
    good.write_text('{"customer": "From a file", "amount": "3.50"}')
    result = charter_run(*base, "--input", f"@{good}")
    assert (0, "From a file") == (result.exit_code, json.loads(result.stdout)["body"]["customer"])
    unknown = charter_run(*base, "--input", '{"customer": "A", "amount": "1", "state": "paid"}')
    assert (1, "invalid_input") == (unknown.exit_code, json.loads(unknown.stdout)["code"])


# -- the operator directory --------------------------------------------------------------------


def test_a_directory_file_in_json_or_toml_names_operators(demo_db, tmp_path):
    (tmp_path / "ops.toml").write_text(
        '[ops-tess]\ntenant = "acme"\nroles = ["admin"]\n'
        'scopes = ["invoices:read", "invoices:write"]\n'
    )
    (tmp_path / "ops.json").write_text(json.dumps(
        {"ops-jo": {"tenant": "acme", "roles": ["admin"], "scopes": ["invoices:*"]}}
    ))  # fmt: skip
    for who, path in (("ops-tess", "ops.toml"), ("ops-jo", "ops.json")):
        result = runner.invoke(app, [
            "run", "invoice.create", "--as", who, "--reason", "r", "--demo",
            "--operators", str(tmp_path / path), "--input", '{"customer": "A", "amount": "1"}',
        ])  # fmt: skip
        assert 0 == result.exit_code, result.output
        assert who == json.loads(result.stdout)["body"]["created_by"]
    # The reference service's own operators are not in that file.
    other = runner.invoke(app, ["run", "invoice.create", "--as", "ops-olga", "--reason", "r",
                                "--demo", "--operators", str(tmp_path / "ops.json")])  # fmt: skip
    assert 1 == other.exit_code


@pytest.mark.parametrize(
    "entry",
    [
        {"tenant": "acme", "roles": ["admin"]},  # no scopes: fail closed, not "everything"
        {"tenant": "acme", "scopes": ["*"], "scope": ["x"]},  # a typo is refused
        {"roles": ["admin"], "scopes": ["*"]},  # no tenant
        "acme",
    ],
)
def test_a_directory_entry_that_is_not_complete_is_a_configuration_error(entry):
    with pytest.raises(ConfigurationError):
        OperatorDirectory({"ops-x": entry})


def test_a_callable_directory_must_yield_operators_with_scopes():
    user = Actor.make("ops-u", "acme", roles={"admin"}, scopes=["*"])
    unscoped = Actor.make("ops-n", "acme", kind=ActorKind.OPERATOR, roles={"admin"})
    good = Actor.make("ops-g", "acme", kind=ActorKind.OPERATOR, scopes=["invoices:read"])
    found = {"ops-u": user, "ops-n": unscoped, "ops-g": good}
    directory = OperatorDirectory(found.get)
    assert good == directory.resolve("ops-g")
    for name in ("ops-u", "ops-n"):
        with pytest.raises(ConfigurationError):
            directory.resolve(name)
    with pytest.raises(UnknownOperator):
        directory.resolve("ops-missing")


def test_an_app_module_names_its_operators(tmp_path, monkeypatch, database_url):
    module = tmp_path / "opsapp.py"
    module.write_text(
        "from charter import Charter\nfrom charter.demo.service import build_charter\n"
        f"charter = build_charter(Charter(database_url={database_url!r}, development=True))\n"
        "operators = {'ops-mod': {'tenant': 'acme', 'roles': ['member'],"
        " 'scopes': ['invoices:write']}}\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CHARTER_OPERATORS", raising=False)
    result = runner.invoke(app, ["run", "invoice.create", "--as", "ops-mod", "--reason", "r",
                                 "--app", "opsapp:charter",
                                 "--input", '{"customer": "A", "amount": "1"}'])  # fmt: skip
    assert 0 == result.exit_code, result.output
    missing = tmp_path / "bare.py"
    missing.write_text(module.read_text().replace("operators =", "_ops ="))
    bare = runner.invoke(app, ["run", "invoice.create", "--as", "ops-mod", "--reason", "r",
                               "--app", "bare:charter"])  # fmt: skip
    assert 2 == bare.exit_code
    assert "no operator directory" in bare.output


def test_parse_input_reads_stdin_within_the_bound():
    import io

    assert {"a": 1} == parse_input("@-", stdin=io.BytesIO(b'{"a": 1}'))
    assert parse_input(None) is None


# -- exports -----------------------------------------------------------------------------------


def test_a_cli_export_is_byte_for_byte_the_http_export_for_the_same_actor(demo_db, tmp_path):
    alice = DEMO_USERS[("acme", "alice")]
    for amount in ("300.00", "12.00", "4500.00"):
        create(amount=amount)
    # alice, as an operator entry: same tenant, roles and scopes as her HTTP token.
    directory = tmp_path / "ops.json"
    directory.write_text(json.dumps({"alice": {"tenant": "acme", "roles": sorted(alice.roles),
                                               "scopes": demo_scopes(alice)}}))  # fmt: skip
    settings = Settings(environment="development", token_secrets=(DEVELOPMENT_TOKEN_SECRET,),
                        audit_keys={"dev": "charter-development-audit-key-not-secret"})  # fmt: skip
    token = TokenSigner([DEVELOPMENT_TOKEN_SECRET]).issue(
        "alice", "acme", scopes=demo_scopes(alice)
    )
    http_charter = Charter(database_url=str(demo_db.engine.url.render_as_string(False)),
                           development=True)  # fmt: skip
    try:
        with TestClient(create_app(settings, charter=http_charter)) as client:
            for fmt in ("csv", "jsonl"):
                response = client.get(
                    "/invoices/export",
                    params={"format": fmt, "sort": "-amount", "filter.state": "draft"},
                    headers={"Authorization": f"Bearer {token}"},
                )
                assert 200 == response.status_code, response.text
                out = tmp_path / f"export.{fmt}"
                result = runner.invoke(app, [
                    "export", "invoice.export", "--as", "alice", "--reason", "quarterly review",
                    "--format", fmt, "--sort", "-amount", "--filter", "state=draft",
                    "-o", str(out), "--demo", "--operators", str(directory),
                ])  # fmt: skip
                assert 0 == result.exit_code, result.output
                assert response.content == out.read_bytes()
                assert 3 == len(out.read_bytes().strip().splitlines()) - (fmt == "csv")
    finally:
        http_charter.engine.dispose()
    with demo_db.engine.connect() as connection:
        rows = connection.execute(
            select(audit_table.c.outcome, audit_table.c.reason, audit_table.c.subject_kind)
            .where(audit_table.c.channel == "cli", audit_table.c.action == "invoice.export")
            .order_by(audit_table.c.id)
        ).all()
    assert [
        ("export_started", "quarterly review", "operator"),
        ("export_completed", "quarterly review", "operator"),
    ] * 2 == [tuple(r) for r in rows]


def test_an_export_refused_writes_no_file_and_exits_1(demo_db, tmp_path):
    out = tmp_path / "x.csv"
    bad_sort = runner.invoke(app, ["export", "invoice.export", "--as", "ops-olga", "--reason", "r",
                                   "--sort", "bank_account", "-o", str(out), "--demo"])  # fmt: skip
    assert 1 == bad_sort.exit_code
    assert not out.exists()
    assert not Path(f"{out}.part").exists()
    no_reason = runner.invoke(app, ["export", "invoice.export", "--as", "ops-olga", "--reason",
                                    " ", "-o", str(out), "--demo"])  # fmt: skip
    assert 2 == no_reason.exit_code
    to_stdout = runner.invoke(app, ["export", "invoice.export", "--as", "ops-olga", "--reason",
                                    "r", "--format", "jsonl", "--demo"])  # fmt: skip
    assert (0, b"") == (to_stdout.exit_code, to_stdout.stdout_bytes)
