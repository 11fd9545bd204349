"""``charter report``: the security model as one static page people can read.

One HTML file, self-contained: the style is inline, the diagrams and charts
are inline SVG, there is no script and no reference to anything outside the
file, so it opens offline and can be attached to a review. It holds:

* the action catalogue (rules, scope, idempotency, cost, rate class, reason);
* the permission matrix, roles x actions x states, per resource;
* each workflow's state diagram;
* the route coverage from ``charter check`` (which entries reach the gate) and
  its findings;
* with a database, audit statistics as charts: denials per action,
  impersonation (who acted on behalf of whom), replays, the most active actors.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from ..audit import audit_table
from ..policy import ActionPolicy, permission_matrix
from ..policy.expr import HasRole
from .accept import Judged
from .check import rate_class_of
from .inventory import Inventory
from .manifest import manifest
from .svg import bar_chart, workflow_svg

__all__ = ["AuditStats", "audit_stats", "render_report"]

#: At most this many rows per chart (the largest first).
CHART_ROWS = 15

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2330;
background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:18px 28px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#c9cfdb}main{padding:8px 28px 40px}
section{background:#fff;border:1px solid #dde1e8;border-radius:8px;margin:18px 0;
padding:4px 18px 16px;overflow-x:auto}
h2{font-size:18px;margin:14px 0 8px}h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;width:100%;margin:6px 0}th,td{border:1px solid #dde1e8;
padding:4px 7px;text-align:left;vertical-align:top}th{background:#eef1f5;font-weight:600}
code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace;white-space:pre-wrap}
.allow{background:#c8ecd0;color:#0c4a1c}.deny{background:#f6c9c9;color:#6d1010}
.conditional{background:#fde9b6;color:#5c4100}.gate-no{background:#f6c9c9}
.gate-yes{background:#c8ecd0}.error{color:#a40e0e;font-weight:600}.warning{color:#8a5a00;font-weight:600}
.accepted{color:#4b5565}.summary span{display:inline-block;margin-right:18px}
svg text{font:11px system-ui,sans-serif;fill:#1d2330}
svg .state rect{fill:#dbe7ff;stroke:#2f5bb7;stroke-width:1.5}
svg .state.initial rect{fill:#c8ecd0;stroke:#1d7a35}svg .state.terminal rect{fill:#e4e0f5;
stroke:#5b3fb0;stroke-width:2.5}svg .edge{fill:none;stroke:#445;stroke-width:1.3}
svg .edge-label{fill:#2a3140;font-size:10px}svg .bar{fill:#2f5bb7}svg .chart-title{font-weight:600;
font-size:13px}svg .empty{fill:#6b7280}
"""


@dataclass(frozen=True, slots=True)
class AuditStats:
    """What the audit trail says, counted: each a list of (label, count)."""

    calls: int
    denials: Sequence[tuple[str, int]]
    impersonation: Sequence[tuple[str, int]]
    replays: Sequence[tuple[str, int]]
    actors: Sequence[tuple[str, int]]


def audit_stats(connection: Connection, *, limit: int = CHART_ROWS) -> AuditStats:
    """Count the audit entries: denials per action, impersonation pairs, replays, top actors.

    Aggregates in SQL (grouped, ordered, limited): the trail may hold millions of rows.
    Impersonation is counted by (real actor, subject) pair: one line per support
    person acting on behalf of one user, with the number of calls made so.
    """
    t = audit_table
    count = func.count().label("n")

    def top(label: Any, *where: Any) -> list[tuple[str, int]]:
        stmt = select(label, count).where(*where).group_by(*_columns(label))
        rows = connection.execute(stmt.order_by(count.desc(), *_columns(label)).limit(limit))
        return [(str(r[0]), int(r[1])) for r in rows]

    pair = (t.c.real_actor + " → " + t.c.subject).label("pair")
    return AuditStats(
        calls=int(connection.execute(select(func.count()).select_from(t)).scalar_one()),
        denials=top(t.c.action, t.c.decision == "deny"),
        impersonation=top(pair, t.c.real_actor.is_not(None)),
        replays=top(t.c.action, t.c.replayed.is_(True)),
        actors=top(t.c.subject),
    )


def _columns(label: Any) -> list[Any]:
    element = getattr(label, "element", label)  # a labelled expression groups by its element
    return [element]


# -- the page -------------------------------------------------------------------------------


Cell = str | tuple[str, str]  # text, or (CSS class of the cell, text)


def _table(head: Iterable[str], rows: Iterable[Iterable[Cell]], *, raw: bool = False) -> str:
    """A table; cells are escaped unless ``raw`` (then the caller escaped them)."""
    out = ["<table><thead><tr>", *(f"<th>{escape(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for row in rows:
        cells = []
        for value in row:
            css, text = value if isinstance(value, tuple) else ("", value)
            text = text if raw else escape(text)
            cells.append(f'<td class="{css}">{text}</td>' if css else f"<td>{text}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _catalogue(model: dict[str, Any]) -> str:
    rows = []
    for name, a in model["actions"].items():
        rules = [f"allow {r['name']}: {r['condition']}" for r in a["rules"]["allow"]]
        rules += [f"deny {r['name']}: {r['condition']}" for r in a["rules"]["deny"]]
        cost = a["cost"]
        rows.append(
            [
                f"<code>{escape(name)}</code>",
                escape(a["resource"] or "—"),
                "<code>" + escape("\n".join(rules) or "(none: never allowed)") + "</code>",
                f"<code>{escape(a['scope'])}</code>",
                escape(a["idempotency"]),
                escape(", ".join(f"{k} {v}" for k, v in cost.items()) if cost else "—"),
                escape(a["rate_class"]),
                "required" if a["reason_required"] else "—",
                "allowed" if a["impersonation"] else "refused",
                escape(", ".join(a["tags"]) or "—"),
                escape(", ".join(a["routes"] + a["webhook_events"]) or "—"),
            ]
        )
    head = ["action", "resource", "rules", "scope", "idempotency", "cost", "rate class",
            "reason", "impersonation", "tags", "reached by"]  # fmt: skip
    return _section("Action catalogue", _table(head, rows, raw=True), "catalogue")


def _roles(policies: Iterable[ActionPolicy]) -> list[str]:
    return sorted(
        {n.role for p in policies for r in p.rules for n in r.condition.walk()
         if isinstance(n, HasRole)}
    )  # fmt: skip


def _matrix(inv: Inventory) -> str:
    charter = inv.charter
    groups: dict[str, list[ActionPolicy]] = {}
    for name, spec in sorted(charter.actions.items()):
        key = spec.resource.name if spec.resource is not None else "(no resource)"
        groups.setdefault(key, []).append(charter.policy_of(name))
    parts = [
        "<p>Assumptions: the actor is in the record's tenant, not impersonating, and its "
        "credential carries the action's scope. A conditional cell shows what remains to "
        "hold on the record or the actor.</p>"
    ]
    workflows = charter.workflows
    for resource, policies in groups.items():
        roles = _roles(policies) or ["(any)"]
        states = list(workflows[resource].states) if resource in workflows else None
        matrix = permission_matrix(policies, roles=roles, states=states)
        rows = []
        for action in matrix.actions:
            for state in matrix.states:
                row: list[Cell] = [f"<code>{escape(action)}</code>", escape(state or "*")]
                for role in matrix.roles:
                    cell = matrix.cell(role, action, state)
                    text = escape(cell.outcome) + (
                        f"<br><code>{escape(cell.condition)}</code>" if cell.condition else ""
                    )
                    row.append((cell.outcome, text))
                rows.append(row)
        parts.append(f"<h3>{escape(resource)}</h3>")
        parts.append(_table(["action", "state", *matrix.roles], rows, raw=True))
    return _section("Permission matrix (roles x actions x states)", "".join(parts), "matrix")


def _workflows(inv: Inventory) -> str:
    workflows = inv.charter.workflows
    if not workflows:
        return _section("Workflows", "<p>No workflow is declared.</p>", "workflows")
    parts = []
    for name, workflow in sorted(workflows.items()):
        parts.append(f"<h3>{escape(name)}</h3>{workflow_svg(workflow)}")
    return _section("Workflows", "".join(parts), "workflows")


def _coverage(inv: Inventory, judged: Judged) -> str:
    by_subject: dict[str, list[str]] = {}
    for f in judged.findings:
        state = "accepted" if judged.is_accepted(f) else f.severity
        by_subject.setdefault(f.subject, []).append(f'<span class="{state}">{f.code}</span>')
    rows = []
    for e in inv.entries:
        marks = by_subject.get(e.label, []) + [m for a in e.actions for m in by_subject.get(a, [])]
        gate = "gate-yes" if e.charters else "gate-no"
        rows.append(
            [
                escape(e.source),
                f"<code>{escape(e.label)}</code>",
                escape(e.kind or "not Charter's"),
                escape(", ".join(e.actions) or "—"),
                f'<span class="{gate}">{"yes" if e.charters else "no"}</span>',
                " ".join(dict.fromkeys(marks)) or "—",
            ]
        )
    table = _table(["source", "entry", "kind", "actions", "through the gate", "findings"], rows,
                   raw=True)  # fmt: skip
    finding_rows = [
        [
            f'<span class="{"accepted" if judged.is_accepted(f) else f.severity}">{f.code}</span>',
            escape(f.severity + (" (accepted)" if judged.is_accepted(f) else "")),
            f"<code>{escape(f.subject)}</code>",
            escape(f.message),
            f"<code>{escape(str(f.location))}</code>",
            escape(j.justification if (j := judged.accepted.get(f.fingerprint)) else "—"),
        ]
        for f in judged.findings
    ]
    head = ["code", "severity", "subject", "finding", "where", "justification"]
    findings = _table(head, finding_rows, raw=True) if finding_rows else "<p>No findings.</p>"
    body = f"{table}<h3>Findings of charter check</h3>{findings}"
    return _section("Route coverage", body, "coverage")


def _audit(stats: AuditStats | None) -> str:
    if stats is None:
        return _section(
            "Audit statistics",
            "<p>No database was given (<code>--database-url</code>): no statistics.</p>",
            "audit",
        )
    charts = [
        bar_chart("Denials per action", stats.denials),
        bar_chart("Impersonation: support acting on behalf of a user (calls)",
                  stats.impersonation),
        bar_chart("Replays per action (idempotent retries answered from the record)",
                  stats.replays),
        bar_chart("Actors with the most calls", stats.actors),
    ]  # fmt: skip
    body = f"<p>{stats.calls} audit entries.</p>" + "".join(f"<div>{c}</div>" for c in charts)
    return _section("Audit statistics", body, "audit")


def _section(title: str, body: str, anchor: str) -> str:
    return f'<section id="{anchor}"><h2>{escape(title)}</h2>{body}</section>'


def render_report(
    inv: Inventory, judged: Judged, *, stats: AuditStats | None = None, title: str = "Charter"
) -> str:
    """The report page (see the module docstring) as one HTML document."""
    model = manifest(inv)
    summary = (
        f"<span>{len(model['actions'])} actions</span>"
        f"<span>{len(inv.routes())} routes</span>"
        f"<span>{len(model['workflows'])} workflows</span>"
        f'<span class="{"error" if judged.errors else "accepted"}">'
        f"{len(judged.errors)} open errors</span>"
        f"<span>{len(judged.warnings)} warnings</span>"
        f"<span>{len(judged.accepted)} accepted findings</span>"
    )
    rate_classes = sorted({rate_class_of(s) for s in inv.charter.actions.values()})
    return "".join(
        [
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{escape(title)}: security model</title><style>{STYLE}</style></head><body>",
            f"<header><h1>{escape(title)}: security model</h1>",
            f'<p class="summary">{summary}</p>',
            f"<p>Rate classes in use: {escape(', '.join(rate_classes) or 'none')}</p></header>",
            "<main>",
            _catalogue(model),
            _matrix(inv),
            _workflows(inv),
            _coverage(inv, judged),
            _audit(stats),
            "</main></body></html>\n",
        ]
    )
