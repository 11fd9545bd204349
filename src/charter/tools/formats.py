"""The check's results as text for people, JSON for tools and SARIF 2.1.0 for code scanning.

SARIF follows the OASIS standard (SARIF Version 2.1.0, errata01): one run, the
tool's rules in ``tool.driver.rules``, one result per finding with its rule's
``level``, its source location relative to ``%SRCROOT%`` (the working
directory), and the finding's fingerprint as ``partialFingerprints`` (so
code-scanning systems track it across line moves). An accepted finding is a
result with an external suppression carrying its justification (section 3.35).
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from .accept import Judged
from .check import RULES, Finding
from .inventory import Inventory

__all__ = ["FORMATS", "SARIF_SCHEMA", "render", "to_json", "to_sarif", "to_text"]

SARIF_SCHEMA = (
    "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
)
FINGERPRINT_KEY = "charterFinding/v1"


def _version() -> str:
    try:
        return metadata.version("charter")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree
        return "0"


def _counts(judged: Judged, inv: Inventory) -> dict[str, int]:
    return {
        "errors": len(judged.errors),
        "warnings": len(judged.warnings),
        "accepted": len(judged.accepted),
        "stale_acceptances": len(judged.stale),
        "routes": len(inv.routes()),
        "actions": len(inv.charter.actions),
        "commands": sum(1 for e in inv.entries if e.source == "cli"),
        "webhook_events": sum(1 for e in inv.entries if e.source == "webhook"),
        "agent_tools": len(inv.agent_tools),
    }


def to_text(judged: Judged, inv: Inventory) -> str:
    """One block per open finding (compiler style), the accepted ones, then a summary."""
    lines: list[str] = []
    for finding in judged.open:
        lines.append(
            f"{finding.location}: {finding.severity} {finding.code} "
            f"[{finding.rule.name}] {finding.subject}"
        )
        lines.append(f"    {finding.message}")
        changed = judged.changed(finding)
        if changed is not None:
            lines.append(
                "    (accepted before, but what was accepted has changed: review it again; "
                f"it was: {changed.justification})"
            )
        lines.append(f"    fix: {finding.rule.help}")
        lines.append(f"    fingerprint: {finding.fingerprint}")
    for finding in judged.findings:
        if judged.is_accepted(finding):
            why = judged.accepted[finding.fingerprint].justification
            lines.append(f"accepted {finding.code} {finding.subject}: {why}")
    for stale in judged.stale:
        if not any(judged.changed(f) is stale for f in judged.open):
            lines.append(
                f"stale acceptance {stale.code} {stale.subject} ({stale.fingerprint}): "
                "it matches no finding any more; remove it"
            )
    n = _counts(judged, inv)
    status = "FAILED" if judged.errors else "passed"
    lines.append(
        f"charter check {status}: {n['errors']} errors, {n['warnings']} warnings, "
        f"{n['accepted']} accepted; {n['routes']} routes, {n['actions']} actions, "
        f"{n['commands']} commands, {n['webhook_events']} webhook events, "
        f"{n['agent_tools']} agent tools"
    )
    return "\n".join(lines) + "\n"


def _finding_json(finding: Finding, judged: Judged) -> dict[str, Any]:
    acceptance = judged.accepted.get(finding.fingerprint)
    return {
        "code": finding.code,
        "name": finding.rule.name,
        "severity": finding.severity,
        "subject": finding.subject,
        "message": finding.message,
        "location": {"file": finding.location.file, "line": finding.location.line},
        "fingerprint": finding.fingerprint,
        "accepted": acceptance is not None,
        "justification": acceptance.justification if acceptance is not None else None,
    }


def to_json(judged: Judged, inv: Inventory) -> str:
    """Everything, for tools: the summary, every finding (accepted or not), the inventory."""
    body = {
        "version": 1,
        "passed": not judged.errors,
        "summary": _counts(judged, inv),
        "findings": [_finding_json(f, judged) for f in judged.findings],
        "stale_acceptances": [
            {"code": a.code, "subject": a.subject, "fingerprint": a.fingerprint}
            for a in judged.stale
        ],
        "entries": [
            {
                "source": e.source,
                "methods": list(e.methods),
                "path": e.path,
                "name": e.name,
                "kind": e.kind,
                "actions": list(e.actions),
                "location": {"file": e.location.file, "line": e.location.line},
            }
            for e in inv.entries
        ],
    }
    return json.dumps(body, indent=2, sort_keys=True) + "\n"


def _artifact(file: str) -> dict[str, Any]:
    if os.path.isabs(file):
        return {"uri": Path(file).as_uri()}
    return {"uri": file, "uriBaseId": "%SRCROOT%"}


def _sarif_result(finding: Finding, index: int, judged: Judged) -> dict[str, Any]:
    result: dict[str, Any] = {
        "ruleId": finding.code,
        "ruleIndex": index,
        "level": finding.severity,
        "message": {"text": f"{finding.subject}: {finding.message}"},
        "partialFingerprints": {FINGERPRINT_KEY: finding.fingerprint},
    }
    if finding.location.line > 0:
        result["locations"] = [
            {
                "physicalLocation": {
                    "artifactLocation": _artifact(finding.location.file),
                    "region": {"startLine": finding.location.line},
                }
            }
        ]
    acceptance = judged.accepted.get(finding.fingerprint)
    if acceptance is not None:
        result["suppressions"] = [
            {"kind": "external", "status": "accepted", "justification": acceptance.justification}
        ]
    return result


def to_sarif(judged: Judged, inv: Inventory) -> str:
    """A SARIF 2.1.0 log: one run of ``charter check`` (see the module docstring)."""
    codes = sorted(RULES)
    rules = [
        {
            "id": code,
            "name": RULES[code].name,
            "shortDescription": {"text": RULES[code].summary},
            "help": {"text": RULES[code].help},
            "defaultConfiguration": {"level": RULES[code].severity},
        }
        for code in codes
    ]
    log = {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "charter check",
                        "version": _version(),
                        "rules": rules,
                    }
                },
                "originalUriBaseIds": {"%SRCROOT%": {"uri": Path.cwd().as_uri() + "/"}},
                "results": [_sarif_result(f, codes.index(f.code), judged) for f in judged.findings],
                "columnKind": "unicodeCodePoints",
            }
        ],
    }
    return json.dumps(log, indent=2, sort_keys=True) + "\n"


FORMATS = {"text": to_text, "json": to_json, "sarif": to_sarif}


def render(fmt: str, judged: Judged, inv: Inventory) -> str:
    """The results in ``fmt`` (``text``, ``json`` or ``sarif``)."""
    try:
        renderer = FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown format {fmt!r} ({', '.join(FORMATS)})") from None
    return renderer(judged, inv)
