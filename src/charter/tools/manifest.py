"""The manifest of the security model: one canonical file, every action, small diffs.

``charter check APP --manifest charter.lock.json`` writes it; committed next to
the code, every change to who may do what shows up in review as a diff of this
file. ``--frozen`` fails when the file is out of date (CI), with a summary of
what changed.

Canonical: keys sorted, lists in a stable order, no timestamps, no memory
addresses, UTF-8 with a final newline; the same declarations always give the
same bytes. For each action: its rules (the rendered policy expressions,
shared rules and the workflow's state rules included) and the gates every call
passes (tenant, impersonation, scope); its scope, idempotency mode, cost, rate
class, reason requirement, impersonation setting, workflow transition, and
every route, webhook event, command and agent tool that reaches it. A
declaration field this module does not know yet (a later issue's) is written
under ``"declared"`` as long as its value is plain data, so it is reviewed too.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any

from ..actions import ActionSpec
from ..credits import Quota
from ..credits.costs import Cost
from ..policy import ActionPolicy
from ..workflow import Workflow
from .check import rate_class_of
from .inventory import Inventory

__all__ = ["FORMAT", "Drift", "compare", "manifest", "render_manifest", "write_manifest"]

FORMAT = "charter-manifest/1"
#: ActionSpec fields the manifest renders itself (the rest go under "declared").
_KNOWN = frozenset({
    "name", "handler", "input", "resource", "target", "creates", "allow", "reason_required",
    "sensitive_read", "scope", "impersonation", "listable", "status", "idempotency", "by",
    "locks", "cost", "tags", "workflow", "rate",
})  # fmt: skip


def _plain(value: Any) -> Any:
    """A declaration value as JSON, or ``None`` for what is not plain data (functions...)."""
    if isinstance(value, Enum):
        return _plain(value.value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, frozenset | set):
        items = [_plain(v) for v in value]
        return sorted(items, key=str) if None not in items else None
    if isinstance(value, list | tuple):
        items = [_plain(v) for v in value]
        return items if None not in items else None
    return None


def _cost(cost: Cost | Quota | None) -> dict[str, Any] | None:
    if cost is None:
        return None
    if isinstance(cost, Quota):
        return {"quota": cost.name, "limit": cost.limit, "per": cost.per, "uses": cost.uses}
    amount = "computed per call" if callable(cost.amount) else cost.amount
    return {"credits": amount, "account": cost.account}


def _rules(policy: ActionPolicy) -> dict[str, Any]:
    def rendered(effect: str) -> list[dict[str, str]]:
        return [
            {"name": r.name, "pattern": r.pattern, "condition": r.condition.text()}
            for r in policy.rules
            if r.effect == effect
        ]

    return {
        "gates": [f"{label}: {gate.text()}" for label, gate in policy.gates],
        "allow": rendered("allow"),
        "deny": rendered("deny"),
    }


def _transition(spec: ActionSpec) -> dict[str, Any] | None:
    move = spec.workflow.transition_of(spec.name) if spec.workflow is not None else None
    if move is None:
        return None
    guard = move.condition
    return {
        "from": list(move.sources),
        "to": move.target,
        "guard": guard.text() if guard is not None else None,
        "requires": list(move.requires),
    }


def _action(spec: ActionSpec, policy: ActionPolicy, inv: Inventory) -> dict[str, Any]:
    reaching = inv.reaching(spec.name)
    declared = {
        f.name: _plain(getattr(spec, f.name))
        for f in dataclasses.fields(spec)
        if f.name not in _KNOWN and _plain(getattr(spec, f.name)) is not None
    }
    return {
        "resource": spec.resource.name if spec.resource is not None else None,
        "input": spec.input.__name__,
        "target": spec.target,
        "by": spec.by,
        "creates": spec.creates,
        "sensitive_read": spec.sensitive_read,
        "listable": spec.listable,
        "status": spec.status,
        "rules": _rules(policy),
        "scope": spec.scope,
        "idempotency": spec.idempotency.value,
        "cost": _cost(spec.cost),
        "rate_class": rate_class_of(spec),
        "rate_declared": spec.rate is not None,
        "reason_required": spec.reason_required,
        "impersonation": spec.impersonation,
        "tags": sorted(spec.tags),
        "locks_further_records": spec.locks is not None,
        "transition": _transition(spec),
        "routes": sorted(e.label for e in reaching if e.source in ("fastapi", "flask")),
        "webhook_events": sorted(e.path for e in reaching if e.source == "webhook"),
        "commands": sorted(e.path for e in reaching if e.source == "cli"),
        "agent_tools": [
            {"name": t.name, "confirmation": t.confirmation}
            for t in sorted(inv.agent_tools, key=lambda t: t.name)
            if t.action == spec.name
        ],
        "declared": declared,
    }


def _workflow(workflow: Workflow) -> dict[str, Any]:
    return {
        "states": list(workflow.states),
        "initial": workflow.initial,
        "terminal": list(workflow.terminal()),
        "transitions": {name: {"from": list(t.sources), "to": t.target}
                        for name, t in workflow.transitions.items()},
        "deadline": workflow.deadline,
        "expires_seconds": {s: int(d.total_seconds()) for s, d in workflow.expires.items()},
        "log": workflow.log,
    }  # fmt: skip


def manifest(inv: Inventory) -> dict[str, Any]:
    """The manifest of ``inv``'s security model, as a JSON-ready dictionary."""
    charter = inv.charter
    return {
        "format": FORMAT,
        "actions": {
            name: _action(spec, charter.policy_of(name), inv)
            for name, spec in sorted(charter.actions.items())
        },
        "resources": {
            name: {
                "model": r.model.__name__,
                "tenant": r.tenant,
                "state": r.state,
                "version": r.version,
                "conceal": r.conceal,
            }
            for name, r in sorted(charter.resources.items())
        },
        "workflows": {name: _workflow(w) for name, w in sorted(charter.workflows.items())},
        "impersonation_grants": {
            g.name: {
                "by": sorted(g.by),
                "of_roles": sorted(g.of_roles),
                "of_kinds": sorted(str(k) for k in g.of_kinds),
                "scopes": sorted(g.scopes),
            }
            for g in charter.impersonation_grants
        },
        "entries": sorted(
            (
                {
                    "entry": e.label,
                    "source": e.source,
                    "kind": e.kind,
                    "gate": e.charters,
                    "actions": list(e.actions),
                }
                for e in inv.entries
            ),
            key=lambda e: (str(e["source"]), str(e["entry"])),
        ),
    }


def render_manifest(inv: Inventory) -> str:
    """The manifest's canonical text (sorted keys, two-space indent, final newline)."""
    return json.dumps(manifest(inv), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_manifest(inv: Inventory, path: str | Path) -> bool:
    """Write the manifest to ``path``; returns whether its content changed."""
    target = Path(path)
    text = render_manifest(inv)
    if target.exists() and target.read_text(encoding="utf-8") == text:
        return False
    target.write_text(text, encoding="utf-8")
    return True


@dataclasses.dataclass(frozen=True, slots=True)
class Drift:
    """How a committed manifest differs from the application's security model."""

    missing: bool
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    diff: str

    @property
    def fresh(self) -> bool:
        return not (self.missing or self.diff)

    def summary(self, path: str | Path, *, max_lines: int = 80) -> str:
        if self.missing:
            return f"{path} does not exist: write it with --manifest {path} (without --frozen)"
        parts = [f"{path} is out of date:"]
        for label, names in (
            ("actions added", self.added),
            ("actions removed", self.removed),
            ("actions changed", self.changed),
        ):
            if names:
                parts.append(f"  {label}: {', '.join(names)}")
        lines = self.diff.splitlines()
        parts.extend(lines[:max_lines])
        if len(lines) > max_lines:
            parts.append(f"  ... {len(lines) - max_lines} more diff lines")
        parts.append(f"regenerate: charter check APP --manifest {path}, then review the diff")
        return "\n".join(parts)


def compare(inv: Inventory, path: str | Path) -> Drift:
    """Compare the committed manifest at ``path`` with ``inv``'s (for ``--frozen``)."""
    target = Path(path)
    current = render_manifest(inv)
    if not target.exists():
        return Drift(True, (), (), (), "")
    committed = target.read_text(encoding="utf-8")
    if committed == current:
        return Drift(False, (), (), (), "")
    try:
        old = json.loads(committed).get("actions", {})
    except (json.JSONDecodeError, AttributeError):
        old = {}
    new = manifest(inv)["actions"]
    old = old if isinstance(old, Mapping) else {}
    diff = "".join(
        difflib.unified_diff(
            committed.splitlines(keepends=True),
            current.splitlines(keepends=True),
            fromfile=f"{target} (committed)",
            tofile="the application",
            n=2,
        )
    )
    return Drift(
        False,
        tuple(sorted(set(new) - set(old))),
        tuple(sorted(set(old) - set(new))),
        tuple(sorted(n for n in set(new) & set(old) if new[n] != old[n])),
        diff or "(the files differ only in formatting)",
    )
