"""The permission matrix: roles x actions x states, rendered and snapshot-tested."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from charter.policy import A, PolicySet, R, assert_matrix_snapshot, permission_matrix
from charter.policy.matrix import PermissionMatrix

from .models import INVOICES


def matrix() -> PermissionMatrix:
    policy = PolicySet()
    policy.allow(
        "invoice.approve",
        A.has_role("approver") & (R.state == "submitted") & (R.amount <= A.approval_limit),
        name="approvers-approve",
    )
    policy.allow("invoice.submit", A.has_role("clerk") & (R.state == "draft"), name="submit")
    policy.deny("invoice.*", A.kind == "partner", name="no-partners")
    compiled = [
        policy.compile(resource=INVOICES, action=a) for a in ("invoice.approve", "invoice.submit")
    ]
    return permission_matrix(compiled, roles=["approver", "clerk"], states=["draft", "submitted"])


def test_cells_are_allow_deny_or_conditional_with_the_residual_condition() -> None:
    m = matrix()
    approve = m.cell("approver", "invoice.approve", "submitted")
    assert (approve.outcome, approve.condition) == ("conditional", "R.amount <= A.approval_limit")
    assert m.cell("approver", "invoice.approve", "draft").outcome == "deny"
    assert m.cell("clerk", "invoice.submit", "draft").outcome == "allow"
    assert m.cell("clerk", "invoice.approve", "submitted").outcome == "deny"


def test_matrix_renders_as_markdown_csv_and_json() -> None:
    m = matrix()
    assert "| invoice.approve | submitted | if R.amount <= A.approval_limit | deny |" in (
        m.to_markdown()
    )
    assert "clerk,invoice.submit,draft,allow,\n" in m.to_csv()
    cells = json.loads(m.to_json())["cells"]
    assert len(cells) == 8
    assert {
        "role": "clerk",
        "action": "invoice.submit",
        "state": "draft",
        "outcome": "allow",
        "condition": "",
    } in cells


def test_snapshot_is_written_on_first_run_and_then_compared(tmp_path: Path) -> None:
    path = tmp_path / "matrix.md"
    assert_matrix_snapshot(matrix(), path)
    assert path.read_text() == matrix().to_markdown()
    assert_matrix_snapshot(matrix(), path)


def test_snapshot_fails_with_a_diff_when_the_policy_changes(tmp_path: Path) -> None:
    path = tmp_path / "matrix.csv"
    path.write_text(matrix().to_csv().replace("clerk,invoice.submit,draft,allow", "clerk,x,y,z"))
    with pytest.raises(AssertionError, match=r"(?s)permission matrix changed.*\+clerk,invoice"):
        assert_matrix_snapshot(matrix(), path)


def test_snapshot_update_env_rewrites_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "matrix.json"
    path.write_text("stale")
    monkeypatch.setenv("CHARTER_UPDATE_SNAPSHOTS", "1")
    assert_matrix_snapshot(matrix(), path)
    assert path.read_text() == matrix().to_json()


def test_reviewed_invoice_matrix_snapshot() -> None:
    """The example policy's matrix, kept in the repository so a change shows in the diff."""
    assert_matrix_snapshot(matrix(), Path(__file__).parent / "snapshots" / "invoice_matrix.md")
