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
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..actor import Actor, Channel
from ..data import FORMATS as EXPORT_FORMATS
from ..data import check_max_page
from ..data.batch import batch_items
from ..errors import (
    CharterError,
    ConfigurationError,
    InvalidInput,
    PayloadTooLarge,
    Unauthenticated,
)
from ..gate import Charter, Outcome
from ..ratelimit import rate_headers
from . import bulkapi, openapi
from .http import (
    IDEMPOTENCY_HEADER,
    PROBLEM_JSON,
    REASON_HEADER,
    REQUEST_ID_HEADER,
    expected_version,
    idempotency_key,
    json_body,
    outcome_headers,
    query_parameters,
)
from .paging import (
    LIST_PARAMETERS,
    export_format,
    export_formats,
    export_headers,
    list_query,
    stream_body,
)
from .ratelimit import AddressLimitMiddleware, accept_credential, peer_address
from .routing import RouteTable, action_route, route_order
from .webhooks import WebhookReceiver

__all__ = ["CharterRoutes", "idempotency_key", "install_problem_handlers", "problem_response"]

log = logging.getLogger("charter.http")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
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

    def __init__(
        self, app: ASGIApp, *, max_body_bytes: int, path_limits: Mapping[str, int] | None = None
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        #: Larger limits of single paths (a bulk route's: its batch's), read at each request.
        self.path_limits = path_limits if path_limits is not None else {}

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
        limit = self.path_limits.get(scope.get("path", ""), self.max_body_bytes)
        declared = headers.get("content-length")
        if declared is not None and (
            not (declared.isascii() and declared.isdigit())
            or len(declared.lstrip("0")) > len(str(limit))  # int() refuses 4,300+ digits
            or int(declared) > limit
        ):
            error = PayloadTooLarge(f"The body exceeds {limit} bytes.")
            await self._refuse(scope, send_with_id, error)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(f"The body exceeds {limit} bytes.")
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
        self.auth_scheme = auth_scheme
        self._routes = RouteTable()
        self._bound: set[str] = set()
        install_problem_handlers(app, problem_type_base=problem_type_base, auth_scheme=auth_scheme)
        openapi.install(app, rate_limited=charter.rate_limiter is not None, auth_scheme=auth_scheme)
        if charter.rate_limiter is not None:  # inside the request context: ids, body limit first
            app.add_middleware(
                AddressLimitMiddleware, limiter=charter.rate_limiter, clock=charter.clock,
                client_address=client_address,
            )  # fmt: skip
        self.max_body_bytes = max_body_bytes
        self._body_limits: dict[str, int] = {}  # the middleware reads it: bulk() adds to it
        app.add_middleware(
            RequestContextMiddleware, max_body_bytes=max_body_bytes, path_limits=self._body_limits
        )

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
        accept_credential(request.state)  # not counted per address (integrations.ratelimit)
        return actor

    def bind(
        self,
        method: str,
        path: str,
        action: str,
        *,
        target: str | None = "id",
        location: str | None = None,
        if_match: bool | Literal["required"] | None = None,
        errors: Iterable[type[CharterError]] = (),
    ) -> None:
        """Route ``method path`` to ``action``; ``target`` names the path parameter with the id.

        ``location`` is the created record's URL template for the 201's ``Location``
        (``{id}`` and the path's own parameters); a creating action defaults to
        ``<path>/{id}``. A replay answers the original ``Location`` and ``ETag``.
        ``if_match="required"``: a request without ``If-Match`` is refused with 428
        (``None``: read when sent, documented where the record has a version).
        ``errors``: the Charter errors the handler itself raises, for the OpenAPI
        document (the gate's own are derived from the declaration). A route whose
        method and path another route of the app already serves is refused.
        """
        spec = self.charter.spec(action)  # fails at start-up for an unknown action
        method = method.upper()
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
        if target is not None and f"{{{target}}}" not in path and spec.target is not None:
            raise ConfigurationError(f"route {path} for {action}: no path parameter {{{target}}}")
        self._claim(method, path, action)
        has_body = method in ("POST", "PUT", "PATCH")
        require_if_match = if_match == "required"

        async def endpoint(request: Request) -> Response:
            actor = await self.actor(request)
            body = (
                json_body(await request.body(), request.headers.get("content-type"))
                if has_body
                else None
            )
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
                expected_version=expected_version(
                    spec, request.headers.getlist("if-match"), required=require_if_match
                ),
            )
            return outcome_response(outcome, location, request.path_params)

        endpoint.__name__ = action.replace(".", "_")
        # What `charter check` reads to tell Charter's adapters from other endpoints.
        endpoint.__charter__ = {"kind": "action", "action": action, "charter": self.charter}  # type: ignore[attr-defined]
        extra = openapi.action_operation(
            spec,
            method=method,
            path=path,
            target=target,
            rate_limited=self.charter.rate_limiter is not None,
            if_match=if_match,
            location=location is not None,
            errors=errors,
            auth_scheme=self.auth_scheme,
        )
        self.app.add_api_route(
            path,
            endpoint,
            methods=[method],
            name=action,
            status_code=spec.status,
            summary=(spec.handler.__doc__ or action).strip().splitlines()[0],
            openapi_extra=extra,
        )

    def action(
        self,
        action: str,
        *,
        if_match: bool | Literal["required"] | None = None,
        errors: Iterable[type[CharterError]] = (),
    ) -> str:
        """Route ``action`` where the naming rule puts it (:mod:`charter.integrations.routing`).

        ``POST /invoices/{id}/approve`` for ``invoice.approve``, ``POST /invoices`` for
        a creating action, ``GET /invoices/{id}`` for ``invoice.get``. Returns the path.
        """
        route = action_route(self.charter.spec(action))
        self.bind(
            route.method, route.path, action, target=route.target, if_match=if_match,
            errors=errors,
        )  # fmt: skip
        return route.path

    def generate(
        self, *, only: Iterable[str] | None = None, exclude: Iterable[str] = ()
    ) -> dict[str, str]:
        """Route every declared action (or ``only`` these) by the naming rule; ``{action: path}``.

        Actions already bound on this app are skipped, so hand bindings made first win;
        two actions the rule puts on one route are refused at start-up.
        """
        skip = set(exclude) | self._bound
        names = list(only) if only is not None else sorted(self.charter.actions)
        routes = {name: action_route(self.charter.spec(name)) for name in names if name not in skip}
        order = sorted(routes, key=lambda name: route_order(routes[name].path))
        return {name: self.action(name) for name in order}

    def _claim(self, method: str, path: str, action: str) -> None:
        """Refuse a second route on ``method path``: the app's own, or one bound before."""
        for route in self.app.router.routes:  # the app's own routes, in the router's order
            format_ = getattr(route, "path_format", None)
            for other in getattr(route, "methods", None) or ():
                if format_ is not None and (other, format_) not in self._routes:
                    self._routes.claim(other, format_, getattr(route, "name", format_))
        self._routes.claim(method, path, action)
        self._bound.add(action)

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
        self._claim("GET", path, f"list:{action}")
        cap = self.charter.max_page
        if max_page is not None:
            cap = min(check_max_page(max_page, f"route {path}"), cap)

        async def endpoint(request: Request) -> Response:
            actor = await self.actor(request)
            query = list_query(query_parameters(request.query_params.multi_items()))
            page = await run_in_threadpool(
                functools.partial(
                    self.charter.list_records, actor, action, **query, max_page=cap,
                    channel=self.channel, request_id=request.state.request_id,
                    reason=request.headers.get(REASON_HEADER),
                )
            )  # fmt: skip
            body = {"items": page.items(render), "next": page.next, "limit": page.limit}
            return JSONResponse(body, headers=rate_headers(page.rate_limit))

        endpoint.__name__ = f"list_{action.replace('.', '_')}"
        endpoint.__charter__ = {  # type: ignore[attr-defined]
            "kind": "list", "action": action, "charter": self.charter, "page_cap": cap,
        }  # fmt: skip
        self.app.add_api_route(
            path,
            endpoint,
            methods=["GET"],
            name=f"list:{action}",
            openapi_extra=openapi.list_operation(
                self.charter.spec(action), parameters=LIST_PARAMETERS,
                rate_limited=self.charter.rate_limiter is not None, auth_scheme=self.auth_scheme,
            ),
        )  # fmt: skip

    def export(self, path: str, action: str, *, formats: Sequence[str] = ("csv", "jsonl")) -> None:
        """``GET path?format=&sort=&filter.<field>=``: stream what the caller may ``action``.

        Counted, charged and audited before the first byte (a refusal is a
        problem as usual); then the rows stream. A client that disconnects ends
        the query, and the export is audited as aborted (:mod:`charter.data.export`).
        """
        self.charter.spec(action)
        allowed = export_formats(formats, path)

        async def endpoint(request: Request) -> Response:
            actor = await self.actor(request)
            params = query_parameters(request.query_params.multi_items())
            query = list_query(params, page=False)
            format = export_format(params, allowed)
            stream = await run_in_threadpool(
                functools.partial(
                    self.charter.export, actor, action, format=format, **query,
                    channel=self.channel, request_id=request.state.request_id,
                    reason=request.headers.get(REASON_HEADER),
                )
            )  # fmt: skip
            return StreamingResponse(
                stream_body(stream), media_type=stream.media_type,
                headers=export_headers(path, stream, format),
                background=BackgroundTask(run_in_threadpool, stream.close),
            )  # fmt: skip

        endpoint.__name__ = f"export_{action.replace('.', '_')}"
        endpoint.__charter__ = {"kind": "export", "action": action, "charter": self.charter}  # type: ignore[attr-defined]
        formats_doc = {"name": "format", "in": "query", "schema": {"enum": list(allowed)}}
        streamed = {
            "description": "The rows, streamed in the format asked for.",
            "content": {EXPORT_FORMATS[f]: {"schema": {"type": "string"}} for f in allowed},
        }
        doc = openapi.list_operation(
            self.charter.spec(action), parameters=[formats_doc, *LIST_PARAMETERS[2:]],
            rate_limited=self.charter.rate_limiter is not None, auth_scheme=self.auth_scheme,
            success=streamed,
        )  # fmt: skip
        doc["operationId"] = f"export:{action}"
        self.app.add_api_route(
            path, endpoint, methods=["GET"], name=f"export:{action}", openapi_extra=doc,
        )  # fmt: skip

    def bulk(self, path: str, action: str, *, item_bytes: int = 1024) -> None:
        """``POST path`` with ``{"items": [...]}``: each item through ``action``'s pipeline.

        The body limit of ``path`` is the batch's: ``item_bytes`` per item of the
        largest batch (at least the app's own limit), so a full batch is not a 413.

        The action must be declared with ``bulk=`` (:mod:`charter.data.bulk`). One
        ``Idempotency-Key`` covers the batch. The answer is 200 with a result per item
        (per-item mode, partial success stated), or every item applied; a failed
        all-or-nothing batch is a 422 ``batch_failed`` problem listing each failure.
        """
        spec = self.charter.spec(action)
        if spec.bulk is None:
            raise ConfigurationError(f"route {path}: {action} is not declared with bulk=")
        largest = spec.max_batch or self.charter.bulk.max_batch
        if "{" in path:
            raise ConfigurationError(f"route {path}: a bulk route's path has no parameters")
        self._claim("POST", path, f"bulk:{action}")
        self._body_limits[path] = max(self.max_body_bytes, largest * item_bytes)

        async def endpoint(request: Request) -> Response:
            actor = await self.actor(request)
            body = json_body(await request.body(), request.headers.get("content-type"))
            items = batch_items(body)
            batch = await run_in_threadpool(
                functools.partial(
                    self.charter.execute_many, actor, action, items,
                    key=idempotency_key(request.headers.getlist(IDEMPOTENCY_HEADER)),
                    reason=request.headers.get(REASON_HEADER), channel=self.channel,
                    request_id=request.state.request_id,
                )
            )  # fmt: skip
            headers = dict(rate_headers(batch.rate_limit))
            if batch.replayed:
                headers["Idempotent-Replayed"] = "true"
            return JSONResponse(batch.as_json(), headers=headers)

        endpoint.__name__ = f"bulk_{action.replace('.', '_')}"
        endpoint.__charter__ = {"kind": "bulk", "action": action, "charter": self.charter}  # type: ignore[attr-defined]
        self.app.add_api_route(
            path, endpoint, methods=["POST"], name=f"bulk:{action}",
            summary=f"Many {action} in one request ({spec.bulk})",
            openapi_extra=bulkapi.bulk_operation(
                spec, path=path, max_batch=largest, auth_scheme=self.auth_scheme,
                rate_limited=self.charter.rate_limiter is not None,
            ),
        )  # fmt: skip

    def webhook(self, path: str, receiver: WebhookReceiver) -> None:
        """``POST path``: a partner's signed callback, verified on the raw body bytes."""

        async def endpoint(request: Request) -> Response:
            body = await request.body()
            result = await run_in_threadpool(
                receiver.handle, dict(request.headers), body,
                request_id=request.state.request_id,
                on_verified=lambda: accept_credential(request.state),
            )  # fmt: skip
            return JSONResponse(result.body(), status_code=200)

        endpoint.__name__ = "webhook_" + path.strip("/").replace("/", "_")
        endpoint.__charter__ = {"kind": "webhook", "receiver": receiver, "charter": self.charter}  # type: ignore[attr-defined]
        self._claim("POST", path, f"webhook:{path}")
        verifier = receiver.verifier
        doc = openapi.webhook_operation(
            verifier.header_names, max_header_length=verifier.max_header_length
        )
        self.app.add_api_route(
            path, endpoint, methods=["POST"], name=f"webhook:{path}", openapi_extra=doc
        )


def outcome_response(
    outcome: Outcome, location: str | None = None, params: Mapping[str, Any] | None = None
) -> JSONResponse:
    """The outcome as JSON: ``ETag`` (the record's version), ``Location`` (a 201's record)."""
    headers = outcome_headers(outcome, location, params)
    return JSONResponse(outcome.body, status_code=outcome.status, headers=headers)
