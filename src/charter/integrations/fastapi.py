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

import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..actor import Actor, Channel
from ..data import DEFAULT_PAGE, MAX_PAGE
from ..errors import CharterError, InvalidInput, PayloadTooLarge, PreconditionFailed
from ..gate import Charter, Outcome
from ..idempotency.keys import IdempotencyKeyInvalid
from . import strictjson
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

Authenticator = Callable[[Request], Actor | Awaitable[Actor]]


def problem_response(error: CharterError, request: Request | None = None) -> JSONResponse:
    body = error.problem(instance=str(request.url.path) if request is not None else None)
    request_id = getattr(request.state, "request_id", None) if request is not None else None
    if request_id:
        body["request_id"] = request_id
    headers = dict(error.headers)
    return JSONResponse(body, status_code=error.status, media_type=PROBLEM_JSON, headers=headers)


class _HTTPProblem(CharterError):
    """A framework-level HTTP error (unknown route, wrong method) as a problem."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status  # type: ignore[misc]
        self.code = {404: "route_not_found", 405: "method_not_allowed"}.get(  # type: ignore[misc]
            status, "http_error"
        )
        self.title = detail  # type: ignore[misc]


def install_problem_handlers(app: FastAPI) -> None:
    """Render every error as RFC 9457 problem+json; never leak a stack trace."""

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
        return problem_response(_HTTPProblem(exc.status_code, str(exc.detail)), request)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(CharterError("An unexpected error occurred."), request)

    app.add_exception_handler(CharterError, charter_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


class RequestContextMiddleware:
    """Pure ASGI middleware: request id on every response, body size limit.

    Written as raw ASGI (not ``BaseHTTPMiddleware``) so the limit applies while
    the body streams in, before anything buffers it whole.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get(REQUEST_ID_HEADER.lower(), "")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        raw_id = request_id.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", raw_id)]
            await send(message)

        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            await self._too_large(scope, send_with_id)
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

    async def _too_large(self, scope: Scope, send: Send) -> None:
        error = PayloadTooLarge(f"The body exceeds {self.max_body_bytes} bytes.")
        response = JSONResponse(
            error.problem(instance=scope.get("path")), status_code=413, media_type=PROBLEM_JSON
        )
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
    """

    def __init__(
        self,
        app: FastAPI,
        charter: Charter,
        *,
        authenticate: Authenticator,
        max_body_bytes: int = 1 << 20,
        channel: Channel = Channel.HTTP,
    ) -> None:
        self.app = app
        self.charter = charter
        self.authenticate = authenticate
        self.channel = channel
        install_problem_handlers(app)
        app.add_middleware(RequestContextMiddleware, max_body_bytes=max_body_bytes)

    async def actor(self, request: Request) -> Actor:
        result = self.authenticate(request)
        if isinstance(result, Actor):
            return result
        return await result

    def bind(self, method: str, path: str, action: str, *, target: str | None = "id") -> None:
        """Route ``method path`` to ``action``; ``target`` names the path parameter with the id."""
        spec = self.charter.spec(action)  # fails at start-up for an unknown action
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
            return outcome_response(outcome)

        endpoint.__name__ = action.replace(".", "_")
        extra = (
            {"requestBody": {"content": {"application/json": {"schema": schema}}}}
            if schema
            else None
        )
        self.app.add_api_route(
            path,
            endpoint,
            methods=[method.upper()],
            name=action,
            summary=(spec.handler.__doc__ or action).strip().splitlines()[0],
            openapi_extra=extra,
        )

    def list(self, path: str, action: str, *, render: Callable[[Any], Any]) -> None:
        """``GET path?limit=&after=``: the records the caller may ``action``, filtered in SQL."""
        self.charter.spec(action)

        async def endpoint(request: Request) -> Response:
            actor = await self.actor(request)
            try:
                limit = int(request.query_params.get("limit", DEFAULT_PAGE))
            except ValueError:
                raise InvalidInput("limit must be an integer") from None
            after = request.query_params.get("after")
            if after is not None and len(after) > 64:
                raise InvalidInput("the page cursor is invalid")
            rows, cursor = await run_in_threadpool(
                self.charter.list_records,
                actor,
                action,
                limit=limit,
                after=after,
                channel=self.channel,
                request_id=request.state.request_id,
            )
            return JSONResponse(
                {
                    "items": [render(r) for r in rows],
                    "next": cursor,
                    "limit": min(max(limit, 1), MAX_PAGE),
                }
            )

        endpoint.__name__ = f"list_{action.replace('.', '_')}"
        self.app.add_api_route(path, endpoint, methods=["GET"], name=f"list:{action}")

    def webhook(self, path: str, receiver: WebhookReceiver) -> None:
        """``POST path``: a partner's signed callback, verified on the raw body bytes."""

        async def endpoint(request: Request) -> Response:
            body = await request.body()
            result = await run_in_threadpool(
                receiver.handle, dict(request.headers), body, request_id=request.state.request_id
            )
            return JSONResponse(result.body(), status_code=200)

        endpoint.__name__ = "webhook_" + path.strip("/").replace("/", "_")
        self.app.add_api_route(path, endpoint, methods=["POST"], name=f"webhook:{path}")


def outcome_response(outcome: Outcome) -> JSONResponse:
    headers = {}
    if outcome.version is not None:
        headers["ETag"] = f'"{outcome.version}"'
    if outcome.replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(outcome.body, status_code=outcome.status, headers=headers)


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        return {}
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if content_type not in ("application/json", "") and not content_type.endswith("+json"):
        raise MalformedBody("Send the body as application/json.")
    return strictjson.loads(raw)
