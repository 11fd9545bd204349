"""Tool definitions for automated agents: which exposed actions an agent may call, described.

:meth:`Charter.tools(actor) <charter.Charter.tools>` is :func:`tool_definitions`.
``actor`` is an agent acting on behalf of a user (``agent.impersonate(user)``,
what the agent channel authenticates); any other actor gets no tool. A tool is
listed only when every one of these holds:

* its action is exposed (``agent=``, :mod:`charter.exposure`; the default is not);
* the credential gate lets the agent-for-user through: the agent token's scopes,
  a declared impersonation grant for this agent and this user, and the action
  not declared ``impersonation=False``;
* the action's rules can allow this actor at all: their SQL form is not
  ``false`` for it (an approval rule for a user who is no approver), or, for an
  action on no record, the rules allow it now.

Listing is not authorization: every call is decided again by the gate.

Each definition carries the MCP tool shape (the 2025-06-18 schema's ``Tool``):
the input schema wraps the action's input model as ``input``, adds ``target``
for an action on a record, ``purpose`` (the reason the audit records, always
required) and ``idempotency_key``; the annotations say what the declaration
says. MCP's defaults are the pessimistic ones (``destructiveHint`` and
``openWorldHint`` true), so each hint is stated explicitly either way.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.sql.elements import False_

from .actions import ActionSpec
from .actor import Actor, ActorKind, Channel
from .context import ActionContext
from .idempotency.keys import MAX_KEY_LENGTH, IdempotencyMode
from .policy import ActionPolicy

__all__ = [
    "MAX_PURPOSE",
    "ToolDefinition",
    "is_delegated",
    "possible",
    "tool_definitions",
    "tool_schema",
]

#: The longest purpose an agent may state (it is the audit entry's reason).
MAX_PURPOSE = 500
#: The tag an action carries when it calls an outside service (also: its handler
#: calls ``ctx.external``, the recovered outside step).
EXTERNAL_TAG = "external"


@dataclass(frozen=True, slots=True)
class ToolDefinition:
    """One tool: its name (the action's), description, input schema and annotations."""

    name: str
    description: str
    input_schema: dict[str, Any]
    annotations: dict[str, Any]
    confirmation: bool
    action: str = field(default="")

    def as_mcp(self) -> dict[str, Any]:
        """The MCP ``Tool`` object (camelCase, as ``tools/list`` answers it)."""
        return {
            "name": self.name,
            "description": self.description,
            "inputSchema": self.input_schema,
            "annotations": dict(self.annotations),
            "_meta": {"charter/confirmation": self.confirmation},
        }


def is_delegated(actor: Actor) -> bool:
    """Whether ``actor`` is an agent acting on behalf of someone (the one shape with tools)."""
    return actor.kind is ActorKind.AGENT and actor.on_behalf_of is not None


def tool_definitions(
    actions: Mapping[str, ActionSpec],
    policy_of: Callable[[str], ActionPolicy],
    actor: Actor,
    now: datetime,
) -> tuple[ToolDefinition, ...]:
    """The tools ``actor`` (already resolved: its grant's scopes set) may call, by name."""
    if not is_delegated(actor):
        return ()
    tools = []
    for name, spec in sorted(actions.items()):
        if spec.agent is None:
            continue
        policy = policy_of(name)
        if policy.credential_denial(actor) is not None or not possible(spec, policy, actor, now):
            continue
        tools.append(describe(spec))
    return tuple(tools)


def describe(spec: ActionSpec) -> ToolDefinition:
    """The tool of an exposed action, whoever asks."""
    assert spec.agent is not None  # only exposed actions are described
    return ToolDefinition(
        name=spec.name,
        description=spec.agent.description or _docstring(spec),
        input_schema=tool_schema(spec),
        annotations=tool_annotations(spec),
        confirmation=spec.agent.confirm,
        action=spec.name,
    )


def tool_annotations(spec: ActionSpec) -> dict[str, Any]:
    """The MCP tool annotations of an action, every hint stated (MCP's defaults are pessimistic)."""
    read = spec.sensitive_read
    return {
        "title": spec.name,
        "readOnlyHint": read,
        # Only what the declaration calls irreversible is destructive: the MCP default is
        # true, so an update the workflow can undo or move on from says false.
        "destructiveHint": (not read) and "irreversible" in spec.tags,
        # A read changes nothing; a change is idempotent when its key is mandatory, so a
        # repeated call with the same arguments (the key among them) has no further effect.
        "idempotentHint": read or spec.idempotency is IdempotencyMode.REQUIRED,
        "openWorldHint": _open_world(spec),
    }


def tool_schema(spec: ActionSpec) -> dict[str, Any]:
    """The JSON Schema of a tool's arguments (``input``, ``target``, ``purpose``, key)."""
    model = spec.input.model_json_schema()
    defs = model.pop("$defs", None)
    properties: dict[str, Any] = {
        "purpose": {
            "type": "string", "minLength": 1, "maxLength": MAX_PURPOSE,
            "description": "Why this call is made, for the person it is made for (audited).",
        },
        "input": model,
    }  # fmt: skip
    required = ["purpose"]
    if spec.input.model_fields:
        required.append("input")
    if spec.target == "argument":
        properties["target"] = _target_schema(spec)
        required.append("target")
    if spec.idempotency is not IdempotencyMode.NONE:
        properties["idempotency_key"] = {
            "type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH,
            "description": "The same key again returns the first call's outcome.",
        }  # fmt: skip
        if spec.idempotency is IdempotencyMode.REQUIRED:
            required.append("idempotency_key")
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }
    if defs:
        schema["$defs"] = defs  # the input model's references stay "#/$defs/..."
    return schema


def _target_schema(spec: ActionSpec) -> dict[str, Any]:
    resource = spec.resource
    assert resource is not None  # a target needs a resource (ActionSpec.declare)
    domain = resource.domain(spec.by)
    what = f"The {resource.name} record to act on" + (f", by its {spec.by}" if spec.by else "")
    if domain.python_type is int:
        return {"type": "integer", "minimum": domain.low, "maximum": domain.high,
                "description": what}  # fmt: skip
    schema: dict[str, Any] = {"type": "string", "minLength": 1, "description": what}
    if domain.max_length is not None:
        schema["maxLength"] = domain.max_length
    return schema


def _docstring(spec: ActionSpec) -> str:
    doc = inspect.getdoc(spec.handler)
    return doc.strip() if doc else spec.name


def _open_world(spec: ActionSpec) -> bool:
    """An outside step: tagged ``external``, or the handler calls ``ctx.external``."""
    if EXTERNAL_TAG in spec.tags:
        return True
    try:
        source = inspect.getsource(spec.handler)
    except (OSError, TypeError):
        return False
    return ".external(" in source


def possible(spec: ActionSpec, policy: ActionPolicy, actor: Actor, now: datetime) -> bool:
    """Whether the rules can allow ``actor`` on some record (or now, for no record)."""
    ctx = ActionContext(action=spec.name, actor=actor, channel=Channel.AGENT, now=now,
                        request_id="")  # fmt: skip
    if spec.resource is None or spec.creates:
        return policy.is_allowed(actor, None, ctx)
    try:
        clause = policy.where(actor, ctx)
    except Exception:  # a rule SQL cannot express: the gate decides each call
        return True
    return not isinstance(clause, False_)
