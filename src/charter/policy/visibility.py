"""Field-level visibility: which of a resource's fields an actor may see (OWASP API3:2023).

Declared once per resource, as rule expressions over the actor and context::

    charter.resource(Invoice, tenant="tenant_id", visible={"bank_account": A.has_role("finance")})

A field whose condition is false for the actor — or fails to evaluate: fail
closed — is *hidden*. The model is Hasura's per-role column permissions: what
decides is who asks, never the row, so a condition may not read ``R`` (refused
at declaration). That keeps every page's columns the same for all its rows,
and lets a hidden field be refused as a filter, sort or page key before any
row is read.

Enforced in one place, this module, for every output:

* single-record outcome bodies — the ``visibility`` pipeline stage
  (:func:`charter.data.visible.visibility`: after ``track`` has rendered the
  body, before ``seal`` stores it for replays);
* list pages (:meth:`charter.data.lists.Page.items`) and exports
  (:mod:`charter.data.export`, which does not even select a hidden column);
* anything else that renders records for an actor — bulk results, agent
  tools — through :func:`redact_for`.

A hidden field used to filter, sort or page is refused exactly as an unknown
field is (400 ``invalid_page``, "no such field"): answering "forbidden" would
tell the actor the field exists, and filtering by it would leak its values by
bisection.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import ConfigurationError
from ..resources import ResourceSpec
from .expr import Condition, Ref, as_condition
from .pyeval import evaluate

__all__ = ["check_visible", "hidden_fields", "redact", "redact_for"]


def check_visible(
    resource: ResourceSpec, visible: Mapping[str, Any] | None
) -> tuple[tuple[str, Condition], ...]:
    """Validate a resource's ``visible=`` mapping at declaration: field → condition."""
    if not visible:
        return ()
    checked: list[tuple[str, Condition]] = []
    columns = resource.columns
    for name, rule in visible.items():
        where = f"resource {resource.name}, visible={name!r}"
        if name not in columns:
            raise ConfigurationError(f"{where}: not a mapped column ({', '.join(sorted(columns))})")
        if name in (resource.id, resource.tenant, resource.version, resource.state):
            raise ConfigurationError(
                f"{where}: the id, tenant, version and state columns are always visible"
            )
        try:
            condition = as_condition(rule)
        except TypeError as exc:
            raise ConfigurationError(f"{where}: {exc}") from exc
        record_refs = [n for n in condition.walk() if isinstance(n, Ref) and n.root == "R"]
        if record_refs:
            raise ConfigurationError(
                f"{where}: {record_refs[0].text()} reads the record; a field's visibility "
                "depends on who asks (A, C), not on the row"
            )
        checked.append((name, condition))
    return tuple(checked)


def hidden_fields(resource: ResourceSpec | None, actor: Any, ctx: Any = None) -> frozenset[str]:
    """The fields of ``resource`` that ``actor`` may not see (an evaluation error hides)."""
    if resource is None or not resource.visible:
        return frozenset()
    hidden = []
    for name, condition in resource.visible:
        try:
            shown = evaluate(condition, actor, None, ctx)
        except Exception:
            shown = False  # fail closed
        if not shown:
            hidden.append(name)
    return frozenset(hidden)


def redact(body: Any, hidden: frozenset[str]) -> Any:
    """``body`` without the members named in ``hidden``, at any depth (JSON values).

    Over-redacting is the safe error: a nested object with a member of a hidden
    field's name loses it too.
    """
    if not hidden:
        return body
    if isinstance(body, dict):
        return {k: redact(v, hidden) for k, v in body.items() if k not in hidden}
    if isinstance(body, list | tuple):
        return [redact(item, hidden) for item in body]
    return body


def redact_for(resource: ResourceSpec | None, actor: Any, body: Any, ctx: Any = None) -> Any:
    """``body`` (rendered records of ``resource``) as ``actor`` may see it."""
    return redact(body, hidden_fields(resource, actor, ctx))
