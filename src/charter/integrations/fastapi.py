"""FastAPI adapter: routes bound to actions, RFC 9457 problems, request ids, body limits.

Everything decided about a request is decided by the gate; this module only
translates HTTP into ``Charter.execute`` and its outcome (or error) back:

* ``Idempotency-Key``-style headers, ``If-Match`` (the version as an ETag, RFC
  9110 §13.1.1) and a reason header (``X-Charter-Reason``) become arguments;
* every :class:`~charter.errors.CharterError` becomes
  ``application/problem+json`` (RFC 9457) with its stable ``code``; anything
  else becomes a 500 problem with no stack trace (it is logged server-side);
* every response carries ``X-Request-ID`` (the client's, if well-formed);
* bodies larger than ``max_body_bytes`` are refused with 413 before parsing.
"""

from __future__ import annotations

import functools
import logging
import re
import string
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..actions import ActionSpec
from ..actor import Actor, Channel
from ..data import FORMATS as EXPORT_FORMATS
from ..data import check_max_page
from ..errors import (
    CharterError,
    ConfigurationError,
    InvalidInput,
    InvalidPage,
    PayloadTooLarge,
    PreconditionFailed,
    Unauthenticated,
)
from ..gate import Charter, Outcome
from ..idempotency.keys import IdempotencyKeyInvalid, IdempotencyMode
from ..pipeline.stages import MAX_REASON
from ..ratelimit import rate_headers
from . import strictjson
from .paging import LIST_PARAMETERS, list_query, stream_body
from .ratelimit import AddressLimitMiddleware, peer_address
from .strictjson import MalformedBody
from .webhooks import WebhookReceiver

__all__ = ["CharterRoutes", "install_problem_handlers", "problem_response"]

log = logging.getLogger("charter.http")

PROBLEM_JSON = "application/problem+json"
REQUEST_ID_HEADER = "X-Request-ID"
REASON_HEADER = "X-Charter-Reason"
IDEMPOTENCY_HEADER = "Idempotency-Key"  # draft-ietf-httpapi-idempotency-key-header
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_ETAG = re.compile(r'^(?:W/)?"(\d{1,18})"$')
_UNSOUND_FIELD = re.compile(rb"[\x00\r\n]")

Authenticator = Callable[[Request], Actor | Awaitable[Actor]]


def problem_response(error: CharterError, request: Request | None = None) -> JSONResponse:
    """``error`` as RFC 9457 problem+json, with the headers its status calls for.

    The problem ``type`` and the 401 challenge follow the app's settings
    (:func:`install_problem_handlers`). A 401 carries ``WWW-Authenticate`` (RFC
    9110 section 11.6.1); for Bearer (RFC 6750 section 3) it says
    ``error="invalid_token"`` when the request sent a token that was refused,
    and no error code when it sent none (section 3.1).
    """
    state = request.app.state if request is not None else None
    body = error.problem(
        instance=str(request.url.path) if request is not None else None,
        type_base=getattr(state, "charter_problem_type_base", None),
    )
    request_id = getattr(request.state, "request_id", None) if request is not None else None
    if request_id:
        body["request_id"] = request_id
    headers = dict(error.headers)
    scheme = getattr(state, "charter_auth_scheme", "Bearer")
    if isinstance(error, Unauthenticated) and scheme:
        headers.setdefault("WWW-Authenticate", _challenge(scheme, request))
    return JSONResponse(body, status_code=error.status, media_type=PROBLEM_JSON, headers=headers)


def _challenge(scheme: str, request: Request | None) -> str:
    sent, _, credentials = (
        request.headers.get("authorization", "") if request is not None else ""
    ).partition(" ")
    if scheme.lower() == "bearer" and sent.lower() == "bearer" and credentials.strip():
        return 'Bearer error="invalid_token"'
    return scheme


class _HTTPProblem(CharterError):
    """A framework-level HTTP error (unknown route, wrong method) as a problem."""

    def __init__(self, status: int, detail: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status  # type: ignore[misc]
        self.code = {  # type: ignore[misc]
            400: "bad_request",
            404: "route_not_found",
            405: "method_not_allowed",
        }.get(status, "http_error")
        self.title = detail  # type: ignore[misc]
        self.headers.update(headers or {})


def _allowed_methods(request: Request) -> str:
    """Every method some route of the app serves at this path (RFC 9110 section 15.5.6)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        route_methods = getattr(route, "methods", None)
        if route_methods and route.matches(request.scope)[0] is not Match.NONE:
            methods |= set(route_methods)
    return ", ".join(sorted(methods))


def install_problem_handlers(
    app: FastAPI, *, problem_type_base: str | None = None, auth_scheme: str | None = "Bearer"
) -> None:
    """Render every error as RFC 9457 problem+json; never leak a stack trace.

    ``problem_type_base``: a URI prefix the deployment controls, for each
    problem's ``type`` (``about:blank`` without one: see
    :meth:`~charter.errors.CharterError.problem`). ``auth_scheme``: the scheme a
    401's ``WWW-Authenticate`` challenge names (``None``: the app sets its own).
    """
    app.state.charter_problem_type_base = problem_type_base
    app.state.charter_auth_scheme = auth_scheme

    async def charter_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, CharterError)
        return problem_response(exc, request)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = [
            {"loc": list(e.get("loc", ())), "type": e.get("type"), "msg": e.get("msg")}
            for e in exc.errors()
        ]
        return problem_response(InvalidInput("The request is invalid.", errors=errors), request)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # starlette's Allow names only the first route's methods
            headers["Allow"] = _allowed_methods(request)
        return problem_response(_HTTPProblem(exc.status_code, str(exc.detail), headers), request)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(CharterError("An unexpected error occurred."), request)

    app.add_exception_handler(CharterError, charter_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


class RequestContextMiddleware:
    """Pure ASGI middleware: request id on every response, body size limit, sound fields.

    Written as raw ASGI (not ``BaseHTTPMiddleware``) so the limit applies while
    the body streams in, before anything buffers it whole. A header field whose
    value holds NUL, CR or LF is refused with 400 (RFC 9110 section 5.5: such a
    value is invalid and dangerous), so none reaches the gate or the database.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        unsound = any(_UNSOUND_FIELD.search(v) for _, v in scope["headers"])
        given = headers.get(REQUEST_ID_HEADER.lower(), "")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        raw_id = request_id.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", raw_id)]
            await send(message)

        if unsound:
            error: CharterError = _HTTPProblem(400, "A header field holds NUL, CR or LF.")
            await self._refuse(scope, send_with_id, error)
            return
        declared = headers.get("content-length")
        if declared is not None and (
            not (declared.isascii() and declared.isdigit()) or int(declared) > self.max_body_bytes
        ):
            error = PayloadTooLarge(f"The body exceeds {self.max_body_bytes} bytes.")
            await self._refuse(scope, send_with_id, error)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise PayloadTooLarge(f"The body exceeds {self.max_body_bytes} bytes.")
            return message

        await self.app(scope, limited_receive, send_with_id)

    async def _refuse(self, scope: Scope, send: Send, error: CharterError) -> None:
        state = getattr(scope.get("app"), "state", None)
        body = error.problem(
            instance=scope.get("path"),
            type_base=getattr(state, "charter_problem_type_base", None),
        )
        body["request_id"] = scope["state"]["request_id"]
        response = JSONResponse(body, status_code=error.status, media_type=PROBLEM_JSON)
        await response(scope, _empty_receive, send)


async def _empty_receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


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


def _parse_if_match(value: str | None) -> int | None:
    if value is None:
        return None
    match = _ETAG.match(value.strip())
    if not match:
        raise PreconditionFailed('If-Match must be an ETag such as "3" (from a previous response)')
    return int(match.group(1))


class CharterRoutes:
    """Bind HTTP routes of a FastAPI app to Charter actions.

    >>> routes = CharterRoutes(app, charter, authenticate=my_authenticator)
    >>> routes.bind("POST", "/invoices/{id}/approve", "invoice.approve")

    ``problem_type_base`` and ``auth_scheme``: see :func:`install_problem_handlers`.
    ``client_address``: how a request's client address is read, for the per-address
    limit of unauthenticated requests when the Charter has rate limits (default: the
    ASGI peer; behind a proxy, read the header it sets).
    """

    def __init__(
        self,
        app: FastAPI,
        charter: Charter,
        *,
        authenticate: Authenticator,
        max_body_bytes: int = 1 << 20,
        channel: Channel = Channel.HTTP,
        problem_type_base: str | None = None,
        auth_scheme: str | None = "Bearer",
        client_address: Callable[[Scope], str] = peer_address,
    ) -> None:
        self.app = app
        self.charter = charter
        self.authenticate = authenticate
        self.channel = channel
        install_problem_handlers(app, problem_type_base=problem_type_base, auth_scheme=auth_scheme)
        if charter.rate_limiter is not None:  # inside the request context: ids, body limit first
            app.add_middleware(
                AddressLimitMiddleware, limiter=charter.rate_limiter, clock=charter.clock,
                client_address=client_address,
            )  # fmt: skip
        app.add_middleware(RequestContextMiddleware, max_body_bytes=max_body_bytes)

    async def actor(self, request: Request) -> Actor:
        """The request's actor, from ``authenticate``: always a credential (a scope set)."""
        result = self.authenticate(request)
        actor = result if isinstance(result, Actor) else await result
        if actor.scopes is None:
            # scopes=None is "built in code, not narrowed": never an HTTP caller.
            log.error("the authenticator of %s returned an actor without scopes", request.url.path)
            raise ConfigurationError(
                "The service's authenticator returned an actor without a scope set."
            )
        return actor

    def bind(
        self,
        method: str,
        path: str,
        action: str,
        *,
        target: str | None = "id",
        location: str | None = None,
    ) -> None:
        """Route ``method path`` to ``action``; ``target`` names the path parameter with the id.

        ``location`` is the created record's URL template for the 201's ``Location``
        (``{id}`` and the path's own parameters); a creating action defaults to
        ``<path>/{id}``. A replay answers the original ``Location`` and ``ETag``.
        """
        spec = self.charter.spec(action)  # fails at start-up for an unknown action
        if location is None and spec.creates:
            location = path.rstrip("/") + "/{id}"
        if location is not None:
            named = {field for _, field, _, _ in string.Formatter().parse(location) if field}
            unknown = named - {"id"} - set(re.findall(r"{(\w+)}", path))
            if unknown:
                raise ConfigurationError(
                    f"route {path}: location {location!r} names {', '.join(sorted(unknown))}, "
                    "which is neither {id} nor a parameter of the path"
                )
        has_body = method.upper() in ("POST", "PUT", "PATCH")
        schema = spec.input.model_json_schema() if has_body else None

        async def endpoint(request: Request) -> Response:
            actor = await self.actor(request)
            body = await _json_body(request) if has_body else None
            outcome: Outcome = await run_in_threadpool(
                self.charter.execute,
                actor,
                action,
                body,
                target=request.path_params.get(target) if target else None,
                key=idempotency_key(request.headers.getlist(IDEMPOTENCY_HEADER)),
                reason=request.headers.get(REASON_HEADER),
                channel=self.channel,
                request_id=request.state.request_id,
                expected_version=_parse_if_match(request.headers.get("if-match")),
            )
            return outcome_response(outcome, location, request.path_params)

        endpoint.__name__ = action.replace(".", "_")
        # What `charter check` reads to tell Charter's adapters from other endpoints.
        endpoint.__charter__ = {"kind": "action", "action": action, "charter": self.charter}  # type: ignore[attr-defined]
        extra = _operation_doc(spec, path, target, schema)
        self.app.add_api_route(
            path,
            endpoint,
            methods=[method.upper()],
            name=action,
            summary=(spec.handler.__doc__ or action).strip().splitlines()[0],
            openapi_extra=extra,
        )

    def list(
        self,
        path: str,
        action: str,
        *,
        render: Callable[[Any], Any],
        max_page: int | None = None,
    ) -> None:
        """``GET path?limit=&after=&sort=&filter.<field>=``: the records the caller may ``action``.

        Filtered in SQL; ``limit`` is clamped to ``max_page`` (at most the Charter's)
        and the response's ``limit`` says the size used; ``next`` is the opaque
        cursor of the next page (``after=``), for this caller and this query only.
        """
        self.charter.spec(action)
        cap = self.charter.max_page
        if max_page is not None:
            cap = min(check_max_page(max_page, f"route {path}"), cap)

        async def endpoint(request: Request) -> Response:
            actor = await self.actor(request)
            query = list_query(request.query_params)
            page = await run_in_threadpool(
                functools.partial(
                    self.charter.list_records, actor, action, **query, max_page=cap,
                    channel=self.channel, request_id=request.state.request_id,
                )
            )  # fmt: skip
            body = {"items": page.items(render), "next": page.next, "limit": page.limit}
            return JSONResponse(body)

        endpoint.__name__ = f"list_{action.replace('.', '_')}"
        endpoint.__charter__ = {  # type: ignore[attr-defined]
            "kind": "list", "action": action, "charter": self.charter, "page_cap": cap,
        }  # fmt: skip
        self.app.add_api_route(
            path,
            endpoint,
            methods=["GET"],
            name=f"list:{action}",
            openapi_extra={"parameters": LIST_PARAMETERS},
        )

    def export(self, path: str, action: str, *, formats: Sequence[str] = ("csv", "jsonl")) -> None:
        """``GET path?format=&sort=&filter.<field>=``: stream what the caller may ``action``.

        Counted, charged and audited before the first byte (a refusal is a
        problem as usual); then the rows stream. A client that disconnects ends
        the query, and the export is audited as aborted (:mod:`charter.data.export`).
        """
        self.charter.spec(action)
        allowed = tuple(formats)
        if not allowed or any(f not in EXPORT_FORMATS for f in allowed):
            raise ConfigurationError(f"route {path}: formats are among {', '.join(EXPORT_FORMATS)}")

        async def endpoint(request: Request) -> Response:
            actor = await self.actor(request)
            query = list_query(request.query_params, page=False)
            format = request.query_params.get("format", allowed[0])
            if format not in allowed:
                raise InvalidPage(f"format is one of {', '.join(allowed)}", parameter="format")
            stream = await run_in_threadpool(
                functools.partial(
                    self.charter.export, actor, action, format=format, **query,
                    channel=self.channel, request_id=request.state.request_id,
                )
            )  # fmt: skip
            name = f"{path.strip('/').replace('/', '-')}.{format}"
            headers = {"Content-Disposition": f'attachment; filename="{name}"'}
            headers.update(rate_headers(stream.rate_limit))
            return StreamingResponse(
                stream_body(stream), media_type=stream.media_type, headers=headers,
                background=BackgroundTask(run_in_threadpool, stream.close),
            )  # fmt: skip

        endpoint.__name__ = f"export_{action.replace('.', '_')}"
        endpoint.__charter__ = {"kind": "export", "action": action, "charter": self.charter}  # type: ignore[attr-defined]
        formats_doc = {"name": "format", "in": "query", "schema": {"enum": list(allowed)}}
        self.app.add_api_route(
            path, endpoint, methods=["GET"], name=f"export:{action}",
            openapi_extra={"parameters": [formats_doc, *LIST_PARAMETERS[2:]]},
        )  # fmt: skip

    def webhook(self, path: str, receiver: WebhookReceiver) -> None:
        """``POST path``: a partner's signed callback, verified on the raw body bytes."""

        async def endpoint(request: Request) -> Response:
            body = await request.body()
            result = await run_in_threadpool(
                receiver.handle, dict(request.headers), body, request_id=request.state.request_id
            )
            return JSONResponse(result.body(), status_code=200)

        endpoint.__name__ = "webhook_" + path.strip("/").replace("/", "_")
        endpoint.__charter__ = {"kind": "webhook", "receiver": receiver, "charter": self.charter}  # type: ignore[attr-defined]
        self.app.add_api_route(path, endpoint, methods=["POST"], name=f"webhook:{path}")


def _operation_doc(
    spec: ActionSpec, path: str, target: str | None, schema: dict[str, Any] | None
) -> dict[str, Any]:
    """What FastAPI cannot see of a bound route, for its OpenAPI operation.

    The endpoint reads the request itself, so its path parameters (the target as
    its column's type), the headers the gate reads and the body's schema are
    declared here; without them a schema-driven client (or Schemathesis) cannot
    call the route at all.
    """
    parameters: list[dict[str, Any]] = []
    for name in re.findall(r"{(\w+)}", path):
        column: dict[str, Any] = {"type": "string"}
        if name == target and spec.resource is not None:
            domain = spec.resource.domain(spec.by)
            if domain.python_type is int:  # its range, so generated ids probe both ends
                column = {"type": "integer", "minimum": domain.low, "maximum": domain.high}
            elif domain.max_length is not None:
                column = {"type": "string", "maxLength": domain.max_length}
        parameters.append({"name": name, "in": "path", "required": True, "schema": column})
    if spec.idempotency is not IdempotencyMode.NONE:
        parameters.append(
            {
                "name": IDEMPOTENCY_HEADER,
                "in": "header",
                "required": spec.idempotency is IdempotencyMode.REQUIRED,
                "schema": {"type": "string", "minLength": 1, "maxLength": 255},
            }
        )
    if target is not None and spec.resource is not None and spec.resource.version is not None:
        parameters.append({"name": "If-Match", "in": "header", "schema": {"type": "string"}})
    parameters.append(
        {
            "name": REASON_HEADER,
            "in": "header",
            "required": spec.reason_required,
            "schema": {"type": "string", "maxLength": MAX_REASON},
        }
    )
    doc: dict[str, Any] = {"parameters": parameters}
    if schema:
        doc["requestBody"] = {"content": {"application/json": {"schema": schema}}}
    return doc


def outcome_response(
    outcome: Outcome, location: str | None = None, params: Mapping[str, Any] | None = None
) -> JSONResponse:
    """The outcome as JSON: ``ETag`` (the record's version), ``Location`` (a 201's record)."""
    headers = {}
    if outcome.version is not None:
        headers["ETag"] = f'"{outcome.version}"'
    if location is not None and outcome.status == 201 and outcome.resource_id is not None:
        values = {name: quote(str(value), safe="") for name, value in (params or {}).items()}
        values["id"] = quote(outcome.resource_id, safe="")
        headers["Location"] = location.format_map(values)
    if outcome.replayed:
        headers["Idempotent-Replayed"] = "true"
    headers.update(rate_headers(outcome.rate_limit))  # draft-ietf-httpapi-ratelimit-headers
    return JSONResponse(outcome.body, status_code=outcome.status, headers=headers)


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        return {}
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if content_type not in ("application/json", "") and not content_type.endswith("+json"):
        raise MalformedBody("Send the body as application/json.")
    return strictjson.loads(raw)
