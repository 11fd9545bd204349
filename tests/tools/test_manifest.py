"""The manifest: canonical, complete per action, committed for the reference service and kept
up to date, with --frozen failing (and saying what changed) when it is not."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from charter import A, Charter, R
from charter.cli import app as cli_app
from charter.tools.inventory import inventory
from charter.tools.manifest import compare, manifest, render_manifest, write_manifest
from tests import unsafe_app
from tests.tools.conftest import DEMO_ENV

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "charter.lock.json"
REGENERATE = (
    "CHARTER_ENV=development CHARTER_DATABASE_URL=sqlite:// "
    ".venv/bin/charter check charter.demo:app --manifest charter.lock.json"
)
runner = CliRunner()


def test_the_reference_services_manifest_is_committed_and_up_to_date(demo):
    drift = compare(demo, LOCK)
    assert drift.fresh, (
        f"charter.lock.json is out of date: review the change, then regenerate it with\n"
        f"    {REGENERATE}\n{drift.summary(LOCK)}"
    )


def test_the_manifest_is_canonical_sorted_and_without_timestamps(demo):
    text = render_manifest(demo)
    assert text == render_manifest(demo)
    assert text.endswith("}\n")
    body = json.loads(text)
    assert text == json.dumps(body, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    assert " at 0x" not in text
    assert "2026-" not in text


def test_the_manifest_covers_every_action_with_its_security_model(demo):
    actions = manifest(demo)["actions"]
    assert set(demo.charter.actions) == set(actions)
    pay = actions["invoice.pay"]
    assert {
        "rules", "scope", "idempotency", "cost", "rate_class", "reason_required",
        "impersonation", "transition", "routes",
    } <= set(pay)  # fmt: skip
    assert "allow invoice.pay" not in json.dumps(pay["rules"]["deny"])
    assert [{"condition": "A.has_role('admin')", "name": "invoice.pay", "pattern": "invoice.pay"}] \
        == pay["rules"]["allow"]  # fmt: skip
    assert ("invoices:write", "required", "financial", False) == (
        pay["scope"],
        pay["idempotency"],
        pay["rate_class"],
        pay["impersonation"],
    )
    assert {"from": ["approved"], "to": "payment_pending", "guard": None, "requires": []} == (
        pay["transition"]
    )
    assert ["POST /invoices/{id}/pay"] == pay["routes"]
    assert actions["invoice.void"]["reason_required"] is True
    assert {"quota": "exports", "limit": 20, "per": "day", "uses": 1} == (
        actions["invoice.export"]["cost"]
    )
    assert ["/webhooks/payments#payment.settled"] == (
        actions["invoice.mark_paid"]["webhook_events"]
    )
    assert "tenant: R.tenant_id == A.tenant" in pay["rules"]["gates"]


def _charter(rule: object) -> Charter:
    charter = Charter(database_url="sqlite://", development=True, checkpoint_interval=None)
    charter.resource(unsafe_app.Ledger, tenant="tenant_id", state="state", version="version")
    charter.action("ledger.note", on=unsafe_app.Ledger, allow=rule)(unsafe_app._handler)
    charter.action("ledger.get", on=unsafe_app.Ledger, allow=R.owner_id == A.id,
                   sensitive_read=True)(unsafe_app._handler)  # fmt: skip
    return charter


def test_a_rule_change_is_a_small_diff_and_frozen_names_the_action(tmp_path):
    path = tmp_path / "charter.lock.json"
    assert write_manifest(inventory(_charter(A.has_role("clerk"))), path)
    assert not write_manifest(inventory(_charter(A.has_role("clerk"))), path)  # unchanged
    assert compare(inventory(_charter(A.has_role("clerk"))), path).fresh
    drift = compare(inventory(_charter(A.has_role("manager"))), path)
    assert not drift.fresh
    assert (("ledger.note",), (), ()) == (drift.changed, drift.added, drift.removed)
    changed = [line for line in drift.diff.splitlines() if line[:1] in "+-"][2:]
    assert 2 == len(changed)
    assert "manager" in changed[1]
    summary = drift.summary(path)
    assert "actions changed: ledger.note" in summary
    assert "regenerate" in summary


def test_frozen_fails_when_out_of_date_or_missing_and_passes_when_fresh(tmp_path, monkeypatch):
    import charter.demo

    for name, value in DEMO_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(ROOT)
    monkeypatch.delattr(charter.demo, "app", raising=False)  # see test_check.demo_env
    lock = tmp_path / "charter.lock.json"
    base = ["check", "charter.demo:app", "--accept", "charter.accepted.json"]
    missing = runner.invoke(cli_app, [*base, "--manifest", str(lock), "--frozen"])
    assert 1 == missing.exit_code
    assert "does not exist" in missing.output
    assert 0 == runner.invoke(cli_app, [*base, "--manifest", str(lock)]).exit_code
    assert LOCK.read_text() == lock.read_text()
    assert 0 == runner.invoke(cli_app, [*base, "--manifest", str(lock), "--frozen"]).exit_code
    edited = json.loads(lock.read_text())
    edited["actions"]["invoice.pay"]["idempotency"] = "optional"
    lock.write_text(json.dumps(edited, indent=2, sort_keys=True) + "\n")
    stale = runner.invoke(cli_app, [*base, "--manifest", str(lock), "--frozen"])
    assert 1 == stale.exit_code
    assert "actions changed: invoice.pay" in stale.output
    assert '-      "idempotency": "optional"' in stale.output
