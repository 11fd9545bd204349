"""The OpenAPI description of Charter's routes, derived from the declarations so it cannot drift.

Each operation an adapter creates for an action is described from the
:class:`~charter.actions.ActionSpec` alone — the same object the gate runs —
so what the document says is what the service does:

* parameters: the path's (the target typed from its column: an integer's range,
  a string's length), ``Idempotency-Key`` (required when the action says
  ``idempotency="required"``, absent when it takes none), ``If-Match`` (on a
  record with a version), ``X-Charter-Reason`` (required when the action says
  ``reason_required``), ``X-On-Behalf-Of``;
* the request body: the action's input model, none when it takes none;
* every status the call can answer, each with the RFC 9457 problem schema and the
  ``code`` values that status can carry (an enum): the ones the gate raises for
  this declaration (:func:`action_problems`), the adapter's own (401, 413, 415,
  428, 429 from the per-address limit, 500, 503), and those the caller declares
  its handler raises (``errors=``);
* the response headers: ``ETag``, ``Location``, ``Idempotent-Replayed``, the
  ``RateLimit`` fields, ``Retry-After`` on 429, ``WWW-Authenticate`` on 401,
  ``Accept`` on 415, ``X-Request-ID`` on every answer;
* ``x-charter``: the action, its scope, tags, idempotency mode, rate class,
  cost and workflow transition, for reviewers and tools.

Adapters other than the action routes (lists, webhooks, bulk, export) describe
themselves with the same pieces: :func:`action_problems` for what the gate may
refuse, :func:`responses` to render statuses, :func:`action_operation` for a whole
operation (with ``success=`` and ``extra_problems=`` for their own answers).
:func:`install` finishes an app's document: the bearer scheme, the framework's
own answers on every operation, FastAPI's validation 422 rewritten as the
problem it really is.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..actions import ActionSpec, NoInput
from ..credits.costs import Cost
from ..credits.quotas import Quota
from ..errors import CharterError
from ..idempotency.keys import MAX_KEY_LENGTH, IdempotencyMode
from ..pipeline.stages import MAX_REASON
from ..ratelimit.classes import default_class_of
from .http import (
    IDEMPOTENCY_HEADER,
    IF_MATCH_PATTERN,
    ON_BEHALF_HEADER,
    PROBLEM_JSON,
    REASON_HEADER,
    REQUEST_ID_HEADER,
    versioned,
)

__all__ = [
    "Problems",
    "action_operation",
    "action_parameters",
    "action_problems",
    "install",
    "problem_responses",
    "problem_schema",
    "responses",
]

#: Status -> the ``code`` values a problem of that status can carry.
Problems = dict[int, set[str]]

BEARER = "bearer"
#: What every request served behind the adapter's middleware may be answered with.
FRAMEWORK_PROBLEMS: Mapping[int, tuple[str, ...]] = {
    400: ("bad_request",),  # a header field holding NUL, CR or LF
    413: ("payload_too_large",),
    500: ("charter_error", "internal_error", "configuration_error", "storage_error",
          "audit_integrity_error"),
    503: ("storage_unavailable",),
}  # fmt: skip
#: The bare form of an ``Idempotency-Key`` field: printable ASCII but ``"``, ``#``,
#: ``,`` and ``\\``.
_BARE_KEY = f"^[ !$-+\\--\\[\\]-~]{{1,{MAX_KEY_LENGTH}}}$"
_RETRY_AFTER = {"description": "Seconds to wait before retrying (RFC 9110 section 10.2.3).",
                "schema": {"type": "string", "pattern": "^[0-9]{1,10}$"}}  # fmt: skip
_RATELIMIT = {
    "RateLimit-Policy": {
        "description": "The rate classes this call counts against "
        "(draft-ietf-httpapi-ratelimit-headers).",
        "schema": {"type": "string"},
    },
    "RateLimit": {
        "description": "What is left of each class's window.",
        "schema": {"type": "string"},
    },
}
_PATH_PARAMETER = re.compile(r"{(\w+)}")
#: The syntax of Standard Webhooks' fields (charter.webhooks checks the same).
_WEBHOOK_HEADERS: Mapping[str, dict[str, Any]] = {
    "webhook-id": {"type": "string", "pattern": "^[!-~]{1,256}$"},
    "webhook-timestamp": {"type": "string", "pattern": "^[0-9]{1,16}$"},
    "webhook-signature": {"type": "string", "minLength": 1, "maxLength": 4096},
}


def problem_schema(status: int, codes: Iterable[str]) -> dict[str, Any]:
    """The RFC 9457 problem document of ``status``, its ``code`` one of ``codes``."""
    return {
        "type": "object",
        "required": ["type", "title", "status", "detail", "code"],
        "properties": {
            "type": {"type": "string", "description": "A URI naming the problem's kind."},
            "title": {"type": "string"},
            "status": {"type": "integer", "enum": [status]},
            "detail": {"type": "string", "description": "What went wrong, for a person."},
            "code": {"type": "string", "enum": sorted(set(codes))},
            "instance": {"type": "string"},
            "request_id": {"type": "string"},
        },
        "additionalProperties": True,  # RFC 9457 extension members (errors, state, ...)
    }


def _problem_response(status: int, codes: Iterable[str], auth_scheme: str | None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": _PHRASES.get(status, "Problem"),
        "content": {PROBLEM_JSON: {"schema": problem_schema(status, codes)}},
    }
    headers: dict[str, Any] = {}
    if status == 401 and auth_scheme:
        headers["WWW-Authenticate"] = {
            "description": "The authentication scheme to use (RFC 9110 section 11.6.1).",
            "required": True,
            "schema": {"type": "string"},
        }
    if status == 429:
        headers["Retry-After"] = {**_RETRY_AFTER, "required": True}
    if status == 503:
        headers["Retry-After"] = _RETRY_AFTER
    if status == 415:
        headers["Accept"] = {"description": "The media type to send.", "schema": {"type": "string"}}
    if headers:
        response["headers"] = headers
    return response


_PHRASES = {
    400: "Bad request (problem+json)",
    401: "Not authenticated",
    402: "Insufficient credits",
    403: "Forbidden (scope or rule)",
    404: "Not found (also another tenant's record)",
    409: "Conflict: not possible in the record's state, a key in progress, a business rule",
    412: "The record is not at the version If-Match names",
    413: "Body too large",
    415: "Body not JSON",
    422: "Invalid input",
    428: "If-Match required",
    429: "Too many requests or quota used up",
    500: "Internal error (nothing was applied)",
    502: "An outside service failed",
    503: "Temporarily unavailable: retry",
}


def responses(
    success_status: int | None,
    success: Mapping[str, Any] | None,
    problems: Mapping[int, Iterable[str]],
    *,
    auth_scheme: str | None = "Bearer",
) -> dict[str, Any]:
    """An operation's ``responses``: the success (if any), then one problem per status."""
    out: dict[str, Any] = {}
    if success_status is not None:
        out[str(success_status)] = dict(success or {"description": "Success"})
    for status in sorted(problems):
        out[str(status)] = _problem_response(status, problems[status], auth_scheme)
    return out


def problem_responses(
    *errors: type[CharterError], auth_scheme: str | None = "Bearer"
) -> dict[int | str, Any]:
    """``responses=`` for a hand-written FastAPI route that raises these Charter errors."""
    problems: Problems = {}
    for error in errors:
        problems.setdefault(error.status, set()).add(error.code)
    return {int(k): v for k, v in responses(None, None, problems, auth_scheme=auth_scheme).items()}


def action_problems(
    spec: ActionSpec,
    *,
    has_body: bool,
    if_match: bool | str = False,
    rate_limited: bool = False,
    errors: Iterable[type[CharterError]] = (),
) -> Problems:
    """Every (status, code) a call of ``spec`` through an adapter can be answered with.

    Derived from the declaration: a target gives 404, an idempotency mode its key
    errors, a workflow transition 409 ``invalid_transition`` (and ``step_expired``
    where its states expire), a credit cost 402, a quota 429, the rate limiter 429
    and 503. ``if_match``: ``True`` where ``If-Match`` is read (412), ``"required"``
    where it must be sent (428 too). ``errors``: what the handler itself raises.
    """
    p: Problems = {
        401: {"unauthenticated"},
        403: {"forbidden"},
        400: {"reason_required", "idempotency_key_invalid", "if_match_invalid"},
        409: {"conflict"},  # a deadlock or serialization failure that persisted
        412: {"precondition_failed"},  # If-Match on a record without a version, too
    }
    mode = spec.idempotency
    if mode is IdempotencyMode.NONE:
        p[400].add("idempotency_key_unsupported")
    else:
        p[409].add("idempotency_key_in_progress")
        p.setdefault(422, set()).add("idempotency_key_reused")
        if mode is IdempotencyMode.REQUIRED:
            p[400].add("idempotency_key_missing")
    if has_body:
        p[400].add("malformed_body")
        p.setdefault(415, set()).add("unsupported_media_type")
        p.setdefault(422, set()).add("invalid_input")
    if spec.target is not None or spec.locks is not None:
        p.setdefault(404, set()).add("not_found")
    if spec.mutates:
        p[409].add("domain_error")  # a business rule of the handler (DomainError)
    workflow = spec.workflow
    if workflow is not None and workflow.transition_of(spec.name) is not None:
        p[409].add("invalid_transition")
        if workflow.expires:
            p[409].add("step_expired")
    if isinstance(spec.cost, Cost):
        p.setdefault(402, set()).add("insufficient_credits")
        p.setdefault(422, set()).add("invalid_amount")
    elif isinstance(spec.cost, Quota):
        p.setdefault(429, set()).add("quota_exceeded")
    if if_match == "required":
        p.setdefault(428, set()).add("precondition_required")
    if rate_limited:
        p.setdefault(429, set()).add("rate_limited")
        p.setdefault(503, set()).add("rate_limit_unavailable")
    for error in errors:
        p.setdefault(error.status, set()).add(error.code)
    return p


def _column_schema(spec: ActionSpec, name: str, target: str | None) -> dict[str, Any]:
    if name != target or spec.resource is None:
        return {"type": "string"}
    domain = spec.resource.domain(spec.by)
    if domain.python_type is int:  # its range, so generated ids probe both ends
        return {"type": "integer", "minimum": domain.low, "maximum": domain.high}
    column: dict[str, Any] = {"type": "string", "minLength": 1}
    if domain.max_length is not None:
        column["maxLength"] = domain.max_length
    return column


def action_parameters(
    spec: ActionSpec, path: str, target: str | None, *, if_match: bool | str = False
) -> list[dict[str, Any]]:
    """The path parameters and the request headers the adapter reads for ``spec``."""
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True,
         "schema": _column_schema(spec, name, target)}
        for name in _PATH_PARAMETER.findall(path)
    ]  # fmt: skip
    if spec.idempotency is not IdempotencyMode.NONE:
        parameters.append(
            {
                "name": IDEMPOTENCY_HEADER,
                "in": "header",
                "required": spec.idempotency is IdempotencyMode.REQUIRED,
                "description": "Makes a retry safe: the same key replays the first outcome "
                "(draft-ietf-httpapi-idempotency-key-header).",
                # printable ASCII without the sf-string's quote and backslash, which a
                # bare key cannot hold (send those quoted), without "," (two fields joined
                # look so), and without "#", reserved for the keys of a batch's items
                "schema": {"type": "string", "pattern": _BARE_KEY},
            }
        )
    if if_match:
        parameters.append(
            {
                "name": "If-Match",
                "in": "header",
                "required": if_match == "required",
                "description": "The ETag of the record as last seen; another version is 412.",
                "schema": {"type": "string", "pattern": IF_MATCH_PATTERN},
            }
        )
    reason: dict[str, Any] = {"type": "string", "maxLength": MAX_REASON}
    if spec.reason_required:
        reason["pattern"] = r"^\S"  # a reason of spaces is no reason
    parameters.append(
        {
            "name": REASON_HEADER,
            "in": "header",
            "required": spec.reason_required,
            "description": "Why the call is made; recorded in the audit trail. Required when "
            "acting on behalf of another user.",
            "schema": reason,
        }
    )
    parameters.append(
        {
            "name": ON_BEHALF_HEADER,
            "in": "header",
            "required": False,
            "description": "The user a support actor acts for (needs a grant and a reason).",
            "schema": {"type": "string", "minLength": 1, "maxLength": 128},
        }
    )
    return parameters


def _success_headers(spec: ActionSpec, *, location: bool, rate_limited: bool) -> dict[str, Any]:
    headers: dict[str, Any] = {}
    if (
        spec.resource is not None
        and spec.resource.version is not None
        and (spec.target is not None or spec.creates)
    ):
        headers["ETag"] = {
            "description": "The record's version, for If-Match.",
            "schema": {"type": "string", "pattern": '^"[0-9]+"$'},
        }
    if location:
        headers["Location"] = {
            "description": "The created record's URL.",
            "required": True,
            "schema": {"type": "string"},
        }
    if spec.idempotency is not IdempotencyMode.NONE:
        headers["Idempotent-Replayed"] = {
            "description": "Present on a replay of a stored outcome.",
            "schema": {"type": "string", "enum": ["true"]},
        }
    if rate_limited:
        headers.update(_RATELIMIT)
    return headers


def _x_charter(spec: ActionSpec, rate_limited: bool) -> dict[str, Any]:
    info: dict[str, Any] = {
        "action": spec.name,
        "scope": spec.scope,
        "tags": sorted(spec.tags),
        "idempotency": str(spec.idempotency),
        "sensitive_read": spec.sensitive_read,
        "reason_required": spec.reason_required,
        "impersonation": spec.impersonation,
    }
    if rate_limited:
        info["rate_class"] = spec.rate or default_class_of(spec)
    if isinstance(spec.cost, Cost):
        amount = None if callable(spec.cost.amount) else spec.cost.amount  # None: per call
        info["cost"] = {"account": spec.cost.account, "amount": amount}
    elif isinstance(spec.cost, Quota):
        info["quota"] = {"name": spec.cost.name, "limit": spec.cost.limit, "per": spec.cost.per}
    transition = spec.workflow.transition_of(spec.name) if spec.workflow is not None else None
    if transition is not None:
        info["transition"] = {"from": sorted(transition.sources), "to": transition.target}
    return info


def action_operation(
    spec: ActionSpec,
    *,
    method: str,
    path: str,
    target: str | None,
    rate_limited: bool = False,
    if_match: bool | str | None = None,
    location: bool = False,
    errors: Iterable[type[CharterError]] = (),
    auth_scheme: str | None = "Bearer",
    success: Mapping[str, Any] | None = None,
    extra_problems: Mapping[int, Iterable[str]] | None = None,
    extra_parameters: Iterable[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The whole OpenAPI operation of ``spec`` served at ``method path`` (see the module doc).

    ``if_match`` defaults to whether the action's record has a version. ``success``
    replaces the success response (a list's page, an export's stream);
    ``extra_problems`` adds an adapter's own codes (a list's ``invalid_page``).
    """
    has_body = method.upper() in ("POST", "PUT", "PATCH")
    if if_match is None:
        if_match = versioned(spec)
    problems = action_problems(
        spec, has_body=has_body, if_match=if_match, rate_limited=rate_limited, errors=errors
    )
    for status, codes in (extra_problems or {}).items():
        problems.setdefault(status, set()).update(codes)
    if success is None:
        headers = _success_headers(spec, location=location, rate_limited=rate_limited)
        success = {
            "description": (spec.handler.__doc__ or spec.name).strip().splitlines()[0],
            "content": {"application/json": {"schema": {"type": "object"}}},
            **({"headers": headers} if headers else {}),
        }
    doc: dict[str, Any] = {
        "operationId": spec.name if method.upper() != "GET" or spec.sensitive_read
        else f"{method.lower()}:{spec.name}",
        "parameters": [*action_parameters(spec, path, target, if_match=if_match),
                       *extra_parameters],
        "responses": responses(spec.status, success, problems, auth_scheme=auth_scheme),
        "security": [{BEARER: []}],
        "x-charter": _x_charter(spec, rate_limited),
    }  # fmt: skip
    if has_body and spec.input is not NoInput:
        schema = spec.input.model_json_schema(ref_template="#/components/schemas/{model}")
        defs = schema.pop("$defs", None)
        doc["requestBody"] = {
            "required": bool(schema.get("required")),
            "content": {"application/json": {"schema": schema}},
        }
        if defs:
            doc["x-charter-schemas"] = defs  # moved to components.schemas by install()
    return doc


def install(app: Any, *, rate_limited: bool = False, auth_scheme: str | None = "Bearer") -> None:
    """Finish ``app``'s OpenAPI document whenever it is built (FastAPI's ``app.openapi``).

    Adds the bearer security scheme, what the adapter's middleware may answer any
    request with (400 for an unsound header field, 413, 429 from the per-address
    limit, 500, 503), ``X-Request-ID`` on every response, and rewrites FastAPI's
    own 422 (``HTTPValidationError``) as the problem+json it is rendered as.
    """
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return dict(app.openapi_schema)
        document = build()
        finish(document, rate_limited=rate_limited, auth_scheme=auth_scheme)
        app.openapi_schema = document
        return document

    app.openapi = openapi


def finish(
    document: dict[str, Any], *, rate_limited: bool = False, auth_scheme: str | None = "Bearer"
) -> dict[str, Any]:
    """Apply :func:`install`'s additions to a built document (in place; returned)."""
    components = document.setdefault("components", {})
    components.setdefault("securitySchemes", {})[BEARER] = {
        "type": "http",
        "scheme": "bearer",
        "description": "A token from the service's signer; its scopes bound every action.",
    }
    schemas = components.setdefault("schemas", {})
    every: Problems = {status: set(codes) for status, codes in FRAMEWORK_PROBLEMS.items()}
    if rate_limited:
        every.setdefault(429, set()).add("rate_limited")
    request_id = {
        "description": "The request's id (the client's, if well-formed); also in the audit.",
        "required": True,
        "schema": {"type": "string"},
    }
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            schemas.update(operation.pop("x-charter-schemas", {}))
            answers = operation["responses"]
            _rewrite_validation_error(answers, auth_scheme)
            for status, codes in every.items():
                _merge_problem(answers, status, codes, auth_scheme)
            for answer in answers.values():
                answer.setdefault("headers", {})[REQUEST_ID_HEADER] = request_id
    for unused in ("HTTPValidationError", "ValidationError"):
        if not _mentions(document, f"#/components/schemas/{unused}"):
            schemas.pop(unused, None)
    return document


def _rewrite_validation_error(answers: dict[str, Any], auth_scheme: str | None) -> None:
    answer = answers.get("422")
    if answer is None or PROBLEM_JSON in answer.get("content", {}):
        return
    answers["422"] = _problem_response(422, ("invalid_input",), auth_scheme)


def _merge_problem(
    answers: dict[str, Any], status: int, codes: Iterable[str], auth_scheme: str | None
) -> None:
    key = str(status)
    answer = answers.get(key)
    if answer is None:
        answers[key] = _problem_response(status, codes, auth_scheme)
        return
    content = answer.setdefault("content", {})
    problem = content.get(PROBLEM_JSON)
    if problem is None:
        content[PROBLEM_JSON] = {"schema": problem_schema(status, codes)}
        fresh = _problem_response(status, codes, auth_scheme)
        for name, header in fresh.get("headers", {}).items():
            answer.setdefault("headers", {}).setdefault(name, {**header, "required": False})
        return
    enum = problem["schema"]["properties"]["code"]["enum"]
    problem["schema"]["properties"]["code"]["enum"] = sorted({*enum, *codes})


def _mentions(node: Any, ref: str) -> bool:
    if isinstance(node, dict):
        return node.get("$ref") == ref or any(_mentions(v, ref) for v in node.values())
    if isinstance(node, list):
        return any(_mentions(v, ref) for v in node)
    return False


def list_operation(
    spec: ActionSpec,
    *,
    parameters: Iterable[Mapping[str, Any]],
    rate_limited: bool = False,
    auth_scheme: str | None = "Bearer",
    item: Mapping[str, Any] | None = None,
    success: Mapping[str, Any] | None = None,
    extra_problems: Mapping[int, Iterable[str]] | None = None,
) -> dict[str, Any]:
    """``GET`` of the records the caller may ``spec``: a page of items, filtered in SQL.

    ``success`` replaces the page (an export's stream); ``extra_problems`` adds codes.
    """
    problems: Problems = {
        400: {"invalid_page", "invalid_cursor"},
        401: {"unauthenticated"},
        403: {"forbidden"},  # the credential lacks the action's scope
    }
    if rate_limited:
        problems[429] = {"rate_limited"}
        problems[503] = {"rate_limit_unavailable"}
    if isinstance(spec.cost, Quota):
        problems.setdefault(429, set()).add("quota_exceeded")
    for status, codes in (extra_problems or {}).items():
        problems.setdefault(status, set()).update(codes)
    page = {
        "type": "object",
        "required": ["items", "next", "limit"],
        "properties": {
            "items": {"type": "array", "items": dict(item or {"type": "object"})},
            "next": {
                "type": ["string", "null"],
                "description": "The cursor of the next page (pass as ?after=), null at the end.",
            },
            "limit": {"type": "integer", "minimum": 1},
        },
    }
    success = success or {
        "description": f"A page of the records the caller may {spec.name}.",
        "content": {"application/json": {"schema": page}},
        **({"headers": dict(_RATELIMIT)} if rate_limited else {}),
    }
    return {
        "operationId": f"list:{spec.name}",
        "parameters": [dict(p) for p in parameters],
        "responses": responses(200, success, problems, auth_scheme=auth_scheme),
        "security": [{BEARER: []}],
        "x-charter": {**_x_charter(spec, rate_limited), "list": True},
    }


def webhook_operation(header_names: Iterable[str], *, max_header_length: int) -> dict[str, Any]:
    """``POST`` of a partner's signed callback: its signature headers, its answers.

    A refusal of the mapped action is a 200 (``refused``: resending changes
    nothing); a transient failure is its own 429/5xx or 503 with ``Retry-After``.
    """
    parameters = [
        {
            "name": name,
            "in": "header",
            "required": True,
            "schema": _WEBHOOK_HEADERS.get(
                name, {"type": "string", "minLength": 1, "maxLength": max_header_length}
            ),
        }
        for name in header_names
    ]
    problems: Problems = {
        400: {"webhook_headers_missing", "webhook_malformed"},
        401: {"webhook_timestamp_stale", "webhook_signature_invalid"},
        409: {"webhook_replayed"},
        429: {"rate_limited"},
        503: {"webhook_retry_later", "rate_limit_unavailable", "storage_unavailable"},
    }
    result = {
        "type": "object",
        "required": ["status"],
        "properties": {
            "status": {"type": "string", "enum": ["applied", "refused", "duplicate", "ignored"]}
        },
        "additionalProperties": True,
    }
    success = {
        "description": "Processed: applied, refused for good, a duplicate, or ignored.",
        "content": {"application/json": {"schema": result}},
    }
    return {
        "parameters": parameters,
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
        "responses": responses(200, success, problems, auth_scheme=None),
    }
