"""``charter check``: the mistakes code review does not see, found in the live application.

Each rule has a stable code, a severity and a fingerprint per finding (see
:func:`fingerprint`); a finding is *accepted* only by a reviewed entry of the
accepted-findings file that carries the same fingerprint
(:mod:`charter.tools.accept`). The check fails on any error that is not
accepted; warnings are printed and change nothing.

========  ========  =====================================================================
code      severity  finding
========  ========  =====================================================================
CH001     error     a state-changing route (POST, PUT, PATCH, DELETE) that is not Charter's
CH002     warning   a GET route on a resource's path that reads without the gate
CH003     error     an action no rule allows: it can never run
CH004     error     a mutating action on a record whose rules never look at the record
CH005     warning   an action whose scope is only the default one
CH006     error     a ``financial``/``irreversible`` action without ``idempotency="required"``
CH007     error     an ``admin`` action, or one only support/operators reach, without a reason
CH008     error     a list or export with no page cap
CH009     error     a list or export whose page cap is above the configured maximum
CH010     error     an export counted against the ordinary read rate class
CH011     error     a ``financial``/``irreversible`` action that allows impersonation
CH012     error     an agent-exposed ``irreversible`` action without human confirmation
CH013     error     a webhook route without signature verification
CH014     error     a mutating action bound to a safe method (GET, HEAD)
========  ========  =====================================================================
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from ..actions import ActionSpec, default_scope
from ..actor import ActorKind
from ..data import MAX_PAGE
from ..idempotency.keys import IdempotencyMode
from ..policy import ActionPolicy, permission_matrix
from ..policy.expr import HasRole, Predicate, Ref
from ..policy.expr import Literal as Lit
from ..ratelimit.classes import default_class_of
from ..webhooks import WebhookVerifier
from .inventory import Entry, Inventory, Location, location_of

__all__ = [
    "RULES",
    "CheckConfig",
    "Finding",
    "Rule",
    "find",
    "fingerprint",
    "privileged_only",
    "rate_class_of",
]

Severity = Literal["error", "warning"]


@dataclass(frozen=True, slots=True)
class Rule:
    """One check: its stable code, name, severity and what to do about a finding."""

    code: str
    name: str
    severity: Severity
    summary: str
    help: str


RULES: Mapping[str, Rule] = {
    r.code: r
    for r in (
        Rule("CH001", "unguarded-mutating-route", "error",
             "A state-changing route whose endpoint is not one of Charter's adapters.",
             "Bind the route to an action (CharterRoutes.bind) so the gate decides, audits and "
             "makes it safe to retry; or accept it with a justification."),
        Rule("CH002", "ungated-resource-read", "warning",
             "A GET route on a resource's path that reads records without the gate.",
             "Bind it to a sensitive read (sensitive_read=True) or a list (CharterRoutes.list) "
             "so that the rules filter what it returns and the read is audited."),
        Rule("CH003", "action-without-rule", "error",
             "An action that no rule allows: it can never run.",
             "Declare allow= on the action, or a shared charter.allow(pattern, ...) rule "
             "before it."),
        Rule("CH004", "route-level-authorization", "error",
             "A mutating action on an existing record whose rules never mention the record "
             "beyond the built-in tenant check.",
             "Say who may act on *this* record (R.created_by == A.id, R.owner == A.id, "
             "R.amount <= A.approval_limit): otherwise anyone with the role acts on every "
             "record of the tenant."),
        Rule("CH005", "default-scope", "warning",
             "An action whose scope is only the default one (<resource>:write or :read).",
             "Declare scope= naming this action's own permission, so a token granted for "
             "ordinary writes cannot perform it."),
        Rule("CH006", "risky-without-required-idempotency", "error",
             "An action tagged financial or irreversible without idempotency='required'.",
             "Declare idempotency='required': a retry without a key would run it twice."),
        Rule("CH007", "privileged-without-reason", "error",
             "An action tagged admin, or reachable only by support or operators, without a "
             "required reason.",
             "Declare reason_required=True: the audit trail then says why it was done."),
        Rule("CH008", "list-without-page-cap", "error",
             "A list or export with no page cap.",
             "Give it a server-side cap that the caller cannot raise."),
        Rule("CH009", "page-cap-above-maximum", "error",
             "A list or export whose page cap is above the configured maximum.",
             "Lower the cap to the maximum (charter.data.MAX_PAGE, or --max-page)."),
        Rule("CH010", "export-on-read-rate-class", "error",
             "An export counted against the ordinary read rate class.",
             "Leave rate= unset (exports get the 'export' class) or name a stricter class."),
        Rule("CH011", "risky-allows-impersonation", "error",
             "An action tagged financial or irreversible that allows impersonation.",
             "Declare impersonation=False: support acting on behalf of a user must not "
             "move money or do what cannot be undone."),
        Rule("CH012", "agent-irreversible-without-confirmation", "error",
             "An agent-exposed irreversible action without human confirmation.",
             "Require a person's confirmation for the agent's call, or do not expose it."),
        Rule("CH013", "webhook-without-signature", "error",
             "A webhook route without signature verification.",
             "Serve it with CharterRoutes.webhook and a WebhookReceiver whose verifier is "
             "StandardWebhookVerifier or StripeSignatureVerifier."),
        Rule("CH014", "mutating-action-on-safe-method", "error",
             "A mutating action bound to a safe method (GET or HEAD).",
             "Bind it to POST, PUT, PATCH or DELETE: safe methods are prefetched, cached "
             "and sent cross-site without a preflight (RFC 9110 section 9.2.1)."),
    )
}  # fmt: skip

#: Paths that look like a partner's callback (CH013 rather than CH001).
_WEBHOOK_PATH = re.compile(r"(web)?hooks?|callbacks?|notifications?", re.IGNORECASE)
_NO_ROLE = "charter-check:no-role"  # a role no rule names: the actor without a role


@dataclass(frozen=True, slots=True)
class CheckConfig:
    """What the rules compare with: the page maximum, who counts as privileged, the read class.

    ``max_page`` None: the Charter's own ``max_page`` (else :data:`charter.data.MAX_PAGE`).
    """

    max_page: int | None = None
    privileged_roles: frozenset[str] = frozenset({"support", "operator", "operators", "ops"})
    privileged_kinds: frozenset[str] = frozenset(
        {ActorKind.SUPPORT, ActorKind.SYSTEM, ActorKind.OPERATOR}
    )
    read_classes: frozenset[str] = frozenset({"read"})


@dataclass(frozen=True, slots=True)
class Finding:
    """One finding: rule, what it is about, where, and the facts its fingerprint covers."""

    code: str
    subject: str
    message: str
    location: Location
    facts: Mapping[str, Any] = field(default_factory=dict)

    @property
    def rule(self) -> Rule:
        return RULES[self.code]

    @property
    def severity(self) -> Severity:
        return self.rule.severity

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.code, self.subject, self.facts)


def fingerprint(code: str, subject: str, facts: Mapping[str, Any]) -> str:
    """A hash of what was found: the rule, its subject and the declaration facts it depends on.

    Never a line number: moving code keeps an acceptance; changing what it
    accepted (the rules, the tags, the scope, the endpoint) does not.
    """
    body = json.dumps(
        {"code": code, "subject": subject, "facts": facts}, sort_keys=True, default=str
    )
    return hashlib.sha256(body.encode()).hexdigest()[:32]


# -- the rules --------------------------------------------------------------------------------


def find(inv: Inventory, config: CheckConfig = CheckConfig()) -> list[Finding]:
    """Every finding in ``inv``, in a stable order (code, then subject)."""
    if config.max_page is None:
        configured = getattr(inv.charter, "max_page", None)
        config = replace(config, max_page=configured if isinstance(configured, int) else MAX_PAGE)
    findings = [*_route_findings(inv), *_action_findings(inv, config)]
    findings += _page_findings(inv, config)
    findings += _agent_findings(inv)
    return sorted(findings, key=lambda f: (f.code, f.subject, f.fingerprint))


def _endpoint_facts(entry: Entry) -> dict[str, Any]:
    return {"route": entry.label, "endpoint": entry.name}


def _route_findings(inv: Inventory) -> Iterator[Finding]:
    prefixes = _resource_prefixes(inv)
    actions = inv.charter.actions
    for entry in inv.routes():
        if entry.kind == "webhook":
            yield from _webhook_verifier(entry)
        elif entry.kind == "action":  # a list or an export reads, whatever action filters it
            for name in entry.actions:
                spec = actions.get(name)
                if spec is not None and spec.mutates and not entry.mutating:
                    yield Finding(
                        "CH014", entry.label,
                        f"{entry.label} runs {name}, which changes data, on a safe method",
                        entry.location, {"route": entry.label, "action": name},
                    )  # fmt: skip
        elif entry.charters:
            continue
        elif entry.mutating and _looks_like_webhook(entry):
            yield Finding(
                "CH013", entry.label,
                f"{entry.label} looks like a webhook ({entry.name}) but is not a Charter "
                "webhook receiver: nothing verifies its signature",
                entry.location, _endpoint_facts(entry),
            )  # fmt: skip
        elif entry.mutating:
            yield Finding(
                "CH001", entry.label,
                f"{entry.label} ({entry.name}) changes state outside the gate: no action, "
                "no rules, no audit entry",
                entry.location, _endpoint_facts(entry),
            )  # fmt: skip
        elif "GET" in entry.methods and _first_segment(entry.path) in prefixes:
            yield Finding(
                "CH002", entry.label,
                f"{entry.label} ({entry.name}) is on a resource's path but is not Charter's: "
                "what it reads is not filtered by the rules nor audited",
                entry.location, _endpoint_facts(entry),
            )  # fmt: skip


def _webhook_verifier(entry: Entry) -> Iterator[Finding]:
    receiver = entry.marker.get("receiver") if entry.marker is not None else None
    verifier = getattr(receiver, "verifier", None)
    if not isinstance(verifier, WebhookVerifier):
        kind = type(verifier).__name__
        yield Finding(
            "CH013", entry.label,
            f"{entry.label}: the receiver's verifier ({kind}) is not one of Charter's "
            "signature verifiers",
            entry.location, {"route": entry.label, "verifier": kind},
        )  # fmt: skip


def _looks_like_webhook(entry: Entry) -> bool:
    words = re.split(r"[/_.:{}\-]+", f"{entry.path} {entry.name}")
    return any(_WEBHOOK_PATH.fullmatch(w) for w in words if w)


def _first_segment(path: str) -> str:
    for part in path.strip("/").split("/"):
        return part.lower().replace("_", "-")
    return ""


def _resource_prefixes(inv: Inventory) -> set[str]:
    """First path segments that name records: the resources', and those of Charter's routes."""
    prefixes = {name.replace("_", "-") for name in inv.charter.resources}
    for entry in inv.routes():
        for name in entry.actions:
            spec = inv.charter.actions.get(name)
            if spec is not None and spec.resource is not None:
                prefixes.add(_first_segment(entry.path))
    prefixes.discard("")
    return prefixes


def _rules_text(policy: ActionPolicy) -> list[str]:
    return [f"{r.effect} {r.name}: {r.condition.text()}" for r in policy.rules]


def _action_findings(inv: Inventory, config: CheckConfig) -> Iterator[Finding]:
    charter = inv.charter
    for name, spec in sorted(charter.actions.items()):
        policy = charter.policy_of(name)
        where = location_of(spec.handler)
        tags = sorted(spec.tags)
        risky = sorted(spec.tags & {"financial", "irreversible"})
        if not any(not (isinstance(r.condition, Lit) and not r.condition.value)
                   for r in policy.allows):  # fmt: skip
            yield Finding("CH003", name, f"{name}: no rule allows it, so no one can ever run it",
                          where, {"rules": _rules_text(policy)})  # fmt: skip
        elif _acts_on_existing(spec) and not _mentions_record(policy):
            yield Finding(
                "CH004", name,
                f"{name} changes an existing {spec.resource.name if spec.resource else ''} "
                "record, but its rules never look at the record (beyond its tenant): "
                "whoever passes them may act on every record of the tenant",
                where, {"rules": _rules_text(policy)},
            )  # fmt: skip
        if spec.scope == default_scope(name, spec.resource, sensitive_read=spec.sensitive_read):
            yield Finding("CH005", name, f"{name} has only the default scope {spec.scope!r}",
                          where, {"scope": spec.scope})  # fmt: skip
        if risky and spec.idempotency is not IdempotencyMode.REQUIRED:
            yield Finding(
                "CH006", name,
                f"{name} is tagged {' and '.join(risky)} but its idempotency is "
                f"{spec.idempotency.value!r}, not 'required'",
                where, {"tags": tags, "idempotency": spec.idempotency.value},
            )  # fmt: skip
        reaching = inv.reaching(name)
        operators_only = bool(reaching) and all(e.source == "cli" for e in reaching)
        if not spec.reason_required and (
            "admin" in spec.tags or operators_only or privileged_only(policy, config)
        ):
            why = "tagged admin" if "admin" in spec.tags else "reachable only by support/operators"
            facts = {"tags": tags, "rules": _rules_text(policy), "operators_only": operators_only}
            yield Finding("CH007", name, f"{name} is {why} but requires no reason", where, facts)
        if risky and spec.impersonation:
            yield Finding(
                "CH011", name,
                f"{name} is tagged {' and '.join(risky)} but may be performed under impersonation",
                where, {"tags": tags, "impersonation": True},
            )  # fmt: skip


def _acts_on_existing(spec: ActionSpec) -> bool:
    return spec.mutates and not spec.creates and spec.target is not None and bool(spec.resource)


def _mentions_record(policy: ActionPolicy) -> bool:
    """Whether a rule reads the record, other than its tenant and its workflow state.

    The state is the workflow's (when a step is possible), not who may take it;
    an opaque predicate receives the record and is taken to look at it.
    """
    resource = policy.resource
    ignored = {resource.tenant, resource.state} if resource is not None else set()
    for rule in policy.rules:
        for node in rule.condition.walk():
            if isinstance(node, Predicate):
                return True
            if isinstance(node, Ref) and node.root == "R" and node.path[0] not in ignored:
                return True
    return False


def privileged_only(policy: ActionPolicy, config: CheckConfig = CheckConfig()) -> bool:
    """Whether only support staff or operators can ever be allowed ``policy``'s action.

    Decided by the permission matrix's partial evaluation: ordinary actors (kinds
    other than the privileged ones, with each role the rules name that is not
    privileged, or none) are denied in every case, while a privileged one is not.
    """
    roles = {n.role for r in policy.rules for n in r.condition.walk() if isinstance(n, HasRole)}
    ordinary_roles = [*sorted(roles - config.privileged_roles), _NO_ROLE]
    kinds = [k.value for k in ActorKind]
    for kind in kinds:
        probe = ordinary_roles if kind not in config.privileged_kinds else []
        if probe and _reachable(policy, probe, kind):
            return False
    privileged = sorted(roles & config.privileged_roles)
    return (bool(privileged) and _reachable(policy, privileged, ActorKind.USER)) or any(
        _reachable(policy, [*sorted(roles), _NO_ROLE], k) for k in config.privileged_kinds
    )


def _reachable(policy: ActionPolicy, roles: list[str], kind: str) -> bool:
    matrix = permission_matrix([policy], roles=roles, kind=kind)
    return any(cell.outcome != "deny" for cell in matrix.cells)


def rate_class_of(spec: ActionSpec) -> str:
    """The rate class an action is counted against: its declared one or its default."""
    return spec.rate or default_class_of(spec)


def _is_export(spec: ActionSpec, entries: Iterable[Entry]) -> bool:
    return (
        "export" in spec.tags
        or spec.name.rpartition(".")[2].startswith("export")
        or any(e.kind == "export" for e in entries)
    )


def _declared_cap(spec: ActionSpec, entry: Entry | None) -> int | None:
    """The page cap of a list or export: its route's marker, or the declaration's.

    A seam for the export declarations of issue 11: a marker's ``page_cap``, or a
    declaration field ``page_cap``, ``max_page`` or ``max_rows``, whichever is set.
    """
    holders: list[Any] = [spec]
    if entry is not None and entry.marker is not None:
        holders.insert(0, entry.marker)
    for holder in holders:
        for attribute in ("page_cap", "max_page", "max_rows"):
            cap = (
                holder.get(attribute)
                if isinstance(holder, Mapping)
                else getattr(holder, attribute, None)
            )
            if isinstance(cap, int) and not isinstance(cap, bool):
                return cap
    return None


def _page_findings(inv: Inventory, config: CheckConfig) -> Iterator[Finding]:
    for name, spec in sorted(inv.charter.actions.items()):
        lists = [e for e in inv.reaching(name) if e.kind in ("list", "export")]
        export = _is_export(spec, lists)
        what = "export" if export else "list"
        pages: list[tuple[str, Location, int | None]] = [
            (e.label, e.location, _declared_cap(spec, e)) for e in lists
        ]
        if export and not pages:
            pages.append((name, location_of(spec.handler), _declared_cap(spec, None)))
        for subject, where, cap in pages:
            if cap is None:
                yield Finding("CH008", subject, f"the {what} {name} declares no page cap",
                              where, {"action": name, "kind": what})  # fmt: skip
            elif config.max_page is not None and cap > config.max_page:
                yield Finding(
                    "CH009", subject,
                    f"the {what} {name} pages up to {cap}, above the maximum {config.max_page}",
                    where, {"action": name, "cap": cap, "maximum": config.max_page},
                )  # fmt: skip
        if export and rate_class_of(spec) in config.read_classes:
            yield Finding(
                "CH010", name,
                f"the export {name} is counted against the read class {rate_class_of(spec)!r}",
                location_of(spec.handler), {"rate": rate_class_of(spec)},
            )  # fmt: skip


def _agent_findings(inv: Inventory) -> Iterator[Finding]:
    for tool in inv.agent_tools:
        spec = inv.charter.actions.get(tool.action)
        if spec is not None and "irreversible" in spec.tags and not tool.confirmation:
            yield Finding(
                "CH012", tool.name,
                f"agent tool {tool.name} runs {tool.action}, which is irreversible, "
                "without a person's confirmation",
                tool.location, {"action": tool.action, "tags": sorted(spec.tags)},
            )  # fmt: skip
