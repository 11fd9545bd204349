"""The OpenAPI operation of a bulk route (``CharterRoutes.bulk``), from the action's declaration.

Built from :func:`charter.integrations.openapi.action_operation` — the same
parameters, problems and ``x-charter`` as the single call — with the batch's own
body (``{"items": [...]}``, at most ``max_batch`` items, each the single call's
item), its 200 answer (a result per item) and its own problems: 400
``batch_empty``, 413 ``batch_too_large``, 422 ``batch_failed`` (all-or-nothing).
"""

from __future__ import annotations

from typing import Any

from ..actions import ActionSpec, BulkMode, NoInput
from . import openapi

__all__ = ["bulk_operation"]

_ITEM_RESULT: dict[str, Any] = {
    "type": "object",
    "required": ["position", "status", "http_status"],
    "properties": {
        "position": {"type": "integer", "minimum": 0},
        "status": {"enum": ["applied", "refused", "replayed"]},
        "http_status": {"type": "integer", "description": "What the single call answered."},
        "body": {"description": "The single call's response body (applied, replayed)."},
        "resource_id": {"type": ["string", "null"]},
        "version": {"type": ["integer", "null"]},
        "error": {
            "type": "object",
            "description": "A refused item's problem: code, status, message.",
            "required": ["code", "status", "message"],
            "properties": {
                "code": {"type": "string"},
                "status": {"type": "integer"},
                "message": {"type": "string"},
            },
        },
        "replayed": {"type": "boolean", "description": "A stored refusal, replayed."},
    },
}


def bulk_operation(
    spec: ActionSpec,
    *,
    path: str,
    max_batch: int,
    rate_limited: bool = False,
    auth_scheme: str | None = "Bearer",
) -> dict[str, Any]:
    """``POST path`` with ``{"items": [...]}``: ``spec`` once per item (see the module doc)."""
    problems = {400: {"batch_empty", "bulk_unsupported"}, 413: {"batch_too_large"}}
    if spec.bulk is BulkMode.ALL_OR_NOTHING:
        problems[422] = {"batch_failed"}
    result = {
        "type": "object",
        "required": ["action", "mode", "size", "applied", "refused", "partial", "items"],
        "properties": {
            "action": {"type": "string"},
            "mode": {"enum": [str(m) for m in BulkMode]},
            "size": {"type": "integer", "minimum": 1, "maximum": max_batch},
            "applied": {"type": "integer", "minimum": 0},
            "replayed": {"type": "integer", "minimum": 0},
            "refused": {"type": "integer", "minimum": 0},
            "partial": {"type": "boolean"},
            "items": {"type": "array", "items": _ITEM_RESULT},
        },
    }
    success = {
        "description": f"A result per item of {spec.name}, in request order ({spec.bulk}).",
        "content": {"application/json": {"schema": result}},
    }
    doc = openapi.action_operation(
        spec, method="POST", path=path, target=None, rate_limited=rate_limited, if_match=False,
        auth_scheme=auth_scheme, success=success, extra_problems=problems,
    )  # fmt: skip
    answered = doc["responses"].pop(str(spec.status))  # a batch answers 200, even of creations
    doc["responses"] = {"200": answered, **doc["responses"]}
    doc["operationId"] = f"bulk:{spec.name}"
    item = _item_schema(spec, doc.pop("requestBody", None))
    doc["requestBody"] = {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["items"],
                    "additionalProperties": False,
                    "properties": {
                        "items": {
                            "type": "array", "minItems": 1, "maxItems": max_batch, "items": item,
                        }
                    },
                }
            }
        },
    }  # fmt: skip
    doc["x-charter"] = {**doc.get("x-charter", {}), "bulk": str(spec.bulk), "max_batch": max_batch}
    return doc


def _item_schema(spec: ActionSpec, body: dict[str, Any] | None) -> dict[str, Any]:
    """One item: the single call's input, or for a call on a given record its id (and input)."""
    schema: dict[str, Any] = (
        body["content"]["application/json"]["schema"]
        if body is not None
        else ({"type": "object", "additionalProperties": False} if spec.input is NoInput else {})
    )
    if spec.target != "argument" or spec.resource is None:
        return schema
    domain = spec.resource.domain(spec.by)
    target: dict[str, Any] = (
        {"type": "integer", "minimum": domain.low, "maximum": domain.high}
        if domain.python_type is int
        else {"type": "string", "minLength": 1, **(
            {"maxLength": domain.max_length} if domain.max_length is not None else {}
        )}
    )  # fmt: skip
    return {
        "oneOf": [
            target,
            {
                "type": "object",
                "required": ["target"],
                "additionalProperties": False,
                "properties": {"target": target, "input": schema},
            },
        ]
    }
