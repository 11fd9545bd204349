"""HTTP semantics every web adapter shares: one reading of each header, one answer per outcome.

The FastAPI and Flask adapters differ only in how they receive a request; what
its headers mean is decided here, once, so the two channels cannot drift:

* ``Idempotency-Key`` (draft-ietf-httpapi-idempotency-key-header): one field, an
  RFC 8941 sf-string or a bare token (:func:`idempotency_key`);
* ``If-Match`` (RFC 9110 section 13.1.1): ``*`` or one strong entity tag, the
  record's version as the service's ETags spell it (``"3"``); a stale tag is 412,
  a tag sent to an action whose record has no version is 412 too (the condition
  cannot be true: RFC 9110 section 13.1.1 says to evaluate it, not to ignore
  it), a missing one where the route requires it is 428 (RFC 6585 section 3),
  anything else is 400 (:func:`expected_version`);
* a query (a list's or an export's ``?filter.<field>=&sort=&limit=&after=&format=``):
  each parameter once; a repeated one is refused with 400 ``invalid_page``
  naming it (:func:`query_parameters`), as Starlette would read its last value
  and Werkzeug its first;
* the body: JSON only (415 otherwise, RFC 9110 section 15.5.16), parsed strictly
  (:mod:`charter.integrations.strictjson`);
* the answer: ``ETag``, ``Location`` of a created record, ``Idempotent-Replayed``
  and the ``RateLimit`` fields (:func:`outcome_headers`).

Deliberately narrower than RFC 9110's syntax: ``If-Match`` takes one entity tag,
not a list, and no weak tag (``W/"3"``): an If-Match comparison is strong, so a
weak tag could never match; both are refused with a 400 that says what to send,
rather than run or silently not run.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote

from ..actions import ActionSpec
from ..errors import (
    CharterError,
    InvalidInput,
    InvalidPage,
    PreconditionFailed,
    Unauthenticated,
)
from ..idempotency.keys import IdempotencyKeyInvalid
from ..outcome import Outcome
from ..ratelimit import rate_headers
from . import strictjson

__all__ = [
    "IDEMPOTENCY_HEADER",
    "IF_MATCH_PATTERN",
    "ON_BEHALF_HEADER",
    "PROBLEM_JSON",
    "REASON_HEADER",
    "REQUEST_ID_HEADER",
    "IfMatchInvalid",
    "PreconditionRequired",
    "QueryParameterRepeated",
    "UnsupportedMediaType",
    "expected_version",
    "idempotency_key",
    "json_body",
    "on_behalf_claim",
    "outcome_headers",
    "query_parameters",
    "request_id",
    "versioned",
]

PROBLEM_JSON = "application/problem+json"
REQUEST_ID_HEADER = "X-Request-ID"
REASON_HEADER = "X-Charter-Reason"
ON_BEHALF_HEADER = "X-On-Behalf-Of"
IDEMPOTENCY_HEADER = "Idempotency-Key"  # draft-ietf-httpapi-idempotency-key-header
#: What an ``If-Match`` field may hold (the OpenAPI document says the same): ``*`` or one
#: strong ETag of a version, spelled as the service spells it (no leading zeros); the
#: version bare (``3``, from a client that dropped the quotes) is read as ``"3"``.
IF_MATCH_PATTERN = r'^(\*|"(0|[1-9][0-9]{0,17})"|(0|[1-9][0-9]{0,17}))$'
_IF_MATCH = re.compile(IF_MATCH_PATTERN)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class IfMatchInvalid(InvalidInput):
    """An ``If-Match`` field that is not ``*`` or one strong ETag such as ``"3"``."""

    code = "if_match_invalid"
    status = 400
    title = "Invalid If-Match"


class PreconditionRequired(CharterError):
    """The route changes a record only under ``If-Match`` and the request sent none (428)."""

    code = "precondition_required"
    status = 428
    title = "Precondition required"


class UnsupportedMediaType(InvalidInput):
    """A request body that is not JSON (``Content-Type`` other than ``application/json``)."""

    code = "unsupported_media_type"
    status = 415
    title = "Unsupported media type"

    def __init__(self, message: str | None = None, **attrs: Any) -> None:
        super().__init__(message, **attrs)
        self.headers["Accept"] = "application/json"  # what to send instead (RFC 9110 15.5.16)


class QueryParameterRepeated(InvalidPage):
    """A query parameter sent more than once (``?sort=id&sort=-id``): 400 ``invalid_page``.

    Its ``parameter`` is the repeated name and its ``reason`` is ``repeated``.
    """

    def __init__(self, name: str) -> None:
        super().__init__(
            f"the query parameter {name!r} is sent more than once; send it once",
            parameter=name,
            reason="repeated",
        )


def query_parameters(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    """A request's query as one value per name; a name sent twice is refused (400).

    ``items`` are the query's (name, value) pairs in order, repeats included
    (Starlette: ``request.query_params.multi_items()``; Werkzeug:
    ``request.args.items(multi=True)``). Which of two values a framework's
    mapping answers differs (Starlette the last, Werkzeug the first), so the same
    request would get two answers; and neither is what a client that repeats a
    filter may mean (either value). One reading for every adapter: refuse it.
    """
    query: dict[str, str] = {}
    for name, value in items:
        if name in query:
            raise QueryParameterRepeated(name)
        query[name] = value
    return query


def request_id(given: str | None, new: str) -> str:
    """The client's ``X-Request-ID`` if well-formed (1-128 of ``A-Za-z0-9._:-``), else ``new``."""
    return given if given is not None and _REQUEST_ID.match(given) else new


def idempotency_key(fields: list[str]) -> str | None:
    """The request's key: one ``Idempotency-Key`` field, an RFC 8941 sf-string or a bare token.

    draft-ietf-httpapi-idempotency-key-header defines the field as an sf-string, so
    ``"abc"`` and ``abc`` are one key (two executions otherwise). Two fields are
    refused: a retry that sent only the second one would be a new request.
    """
    if not fields:
        return None
    if len(fields) > 1:
        raise IdempotencyKeyInvalid("Send one Idempotency-Key field, not several.")
    value = fields[0].strip()
    if len(value) < 2 or not (value.startswith('"') and value.endswith('"')):
        if "," in value:  # WSGI joins repeated fields with ", ": two keys would pass as one
            raise IdempotencyKeyInvalid(
                "Send one Idempotency-Key field, not several (a key holding a comma is sent "
                'as a quoted string: "a,b").'
            )
        return value
    inner, key, escaped = value[1:-1], [], False
    for char in inner:  # RFC 8941 §4.2.5: only \" and \\ are escapes
        if escaped:
            if char not in '"\\':
                raise IdempotencyKeyInvalid("The Idempotency-Key string has an invalid escape.")
            key.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            raise IdempotencyKeyInvalid("The Idempotency-Key string has an unescaped quote.")
        else:
            key.append(char)
    if escaped:
        raise IdempotencyKeyInvalid("The Idempotency-Key string ends inside an escape.")
    return "".join(key)


def on_behalf_claim(claimed: str | None, *, accepted: bool) -> str | None:
    """A plain token's ``X-On-Behalf-Of`` claim: returned where the service accepts such
    claims (the gate checks them against the grants), refused (401) where acting for someone
    happens inside an impersonation session only — unbounded, unrevocable and unlisted to the
    user otherwise. Both reference services refuse it by default."""
    if claimed is not None and not accepted:
        raise Unauthenticated(
            "Acting for another user needs an impersonation session; this service does not "
            "accept X-On-Behalf-Of."
        )
    return claimed


def versioned(spec: ActionSpec) -> bool:
    """Whether the action acts on one record that has a version: what ``If-Match`` compares."""
    resource = spec.resource
    return spec.target is not None and resource is not None and resource.version is not None


def expected_version(spec: ActionSpec, fields: list[str], *, required: bool = False) -> int | None:
    """The version ``If-Match`` names, for the gate's precondition stage (see the module doc).

    ``None`` when no field was sent or it is ``*`` (any current record: a missing
    one is 404 from the gate). Raises :class:`PreconditionRequired` (428) when
    ``required`` and none was sent, :class:`IfMatchInvalid` (400) for anything but
    ``*`` or one strong ETag, and :class:`~charter.errors.PreconditionFailed` (412)
    when the action's record has no version to compare with.
    """
    if not fields:
        if required:
            raise PreconditionRequired(
                f"{spec.name} changes the record only under If-Match: send the ETag of "
                "the last response that showed it"
            )
        return None
    if len(fields) > 1:
        raise IfMatchInvalid("Send one If-Match field, not several.")
    value = fields[0].strip()
    if not _IF_MATCH.match(value):
        raise IfMatchInvalid(
            'If-Match must be "*" or one strong ETag such as "3" (from a previous response); '
            "weak tags and lists are not accepted"
        )
    if not versioned(spec):
        # The record has no ETag, so no tag can match it (a "*" asks only that it exists,
        # and the gate answers 404 for one that does not).
        if value == "*" and spec.target is not None:
            return None
        raise PreconditionFailed(f"{spec.name} acts on no versioned record: If-Match cannot hold")
    return None if value == "*" else int(value.strip('"'))


def json_body(raw: bytes, content_type: str | None) -> Any:
    """The body as strict JSON (``{}`` when empty); 415 when it is not declared JSON."""
    if not raw:
        return {}
    media = (content_type or "application/json").split(";")[0].strip().lower()
    if media not in ("application/json", "") and not media.endswith("+json"):
        raise UnsupportedMediaType("Send the body as application/json.")
    return strictjson.loads(raw)


def outcome_headers(
    outcome: Outcome, location: str | None = None, params: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """``ETag`` (the record's version), ``Location`` (a 201's record), replay marker, RateLimit.

    Every answer of the gate is ``Cache-Control: no-store``: it is one actor's view of
    records (and an impersonation session's answer holds a credential), which no shared
    or browser cache may keep (RFC 9111 section 5.2.2.5).
    """
    headers = {"Cache-Control": "no-store"}
    if outcome.version is not None:
        headers["ETag"] = f'"{outcome.version}"'
    if location is not None and outcome.status == 201 and outcome.resource_id is not None:
        values = {name: quote(str(value), safe="") for name, value in (params or {}).items()}
        values["id"] = quote(outcome.resource_id, safe="")
        headers["Location"] = location.format_map(values)
    if outcome.replayed:
        headers["Idempotent-Replayed"] = "true"
    headers.update(rate_headers(outcome.rate_limit))  # draft-ietf-httpapi-ratelimit-headers
    return headers
