"""Flask adapter: a Flask extension that routes requests to Charter actions, like the FastAPI one.

>>> charter_ext = CharterFlask(authenticate=my_authenticator)
>>> charter_ext.bind("POST", "/invoices/{id}/approve", "invoice.approve")
>>> def create_app():
...     app = Flask(__name__)
...     charter_ext.init_app(app, charter=Charter(engine=db.engine))
...     return app

The extension keeps no application state of its own: each application's
Charter, authenticator and settings live in ``app.extensions["charter"]``, so
one extension object serves several applications in one process, each with its
own Charter (and database). Declarations made on the extension (``bind``,
``action``, ``generate``, ``list``, ``export``, ``webhook``) are applied to every
application it is initialized on, before or after.

The same HTTP semantics as the FastAPI adapter, from the same module
(:mod:`charter.integrations.http`): ``Idempotency-Key``, ``If-Match`` / ``ETag``,
``X-Charter-Reason``, RFC 9457 problem+json with the same stable codes,
``WWW-Authenticate`` on 401, ``Allow`` on 405, ``X-Request-ID`` on every answer,
a body size limit (413 before the body is read), the ``RateLimit`` fields and 429,
and the per-address limit of requests without an accepted credential
(:class:`~charter.integrations.ratelimit.AddressLimit`, before any authentication).

The gate owns each call's transaction: it opens its own session per call, so
the decision, the effect, the idempotency record, the ledger and the audit entry
commit together. A handler writes through ``ctx.session``. Writes a view makes
through Flask-SQLAlchemy's ``db.session`` in the same request are outside the
gate: not audited, not rolled back with a refusal, not replayed.

``flask charter ...`` (``app.cli``): ``pipeline ACTION``, ``policy matrix`` and
``audit verify``, the commands of :mod:`charter.cli`, on the application's Charter.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

from flask import Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

from ..actor import Actor, Channel
from ..errors import CharterError, ConfigurationError, PayloadTooLarge, Unauthenticated
from ..gate import Charter
from ..ratelimit import rate_headers
from .flask_cli import charter_commands, current_charter
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
    request_id,
)
from .paging import export_format, export_formats, export_headers, list_query
from .ratelimit import ACCEPTED, AddressLimit, accept_credential
from .routing import RouteTable, action_route, route_order
from .webhooks import WebhookReceiver

__all__ = ["CharterFlask", "current_charter"]

log = logging.getLogger("charter.http")

FlaskAuthenticator = Callable[[Any], Actor]
_PARAMETER = re.compile(r"{(\w+)}")


def remote_address(request: Any) -> str:
    """The client address of a Flask request: the WSGI peer (``REMOTE_ADDR``)."""
    return str(request.remote_addr or "unknown")


class _State:
    """One application's Charter and settings (``app.extensions["charter"]``)."""

    def __init__(
        self, charter: Charter, authenticate: FlaskAuthenticator, *, channel: Channel,
        max_body_bytes: int, problem_type_base: str | None, auth_scheme: str | None,
        client_address: Callable[[Any], str],
    ) -> None:  # fmt: skip
        self.charter = charter
        self.authenticate = authenticate
        self.channel = channel
        self.max_body_bytes = max_body_bytes
        self.problem_type_base = problem_type_base
        self.auth_scheme = auth_scheme
        self.routes = RouteTable()
        self.client_address = client_address
        #: Requests without an accepted credential, limited per address (with rate limits).
        self.address_limit = (
            None if charter.rate_limiter is None
            else AddressLimit(charter.rate_limiter, charter.clock)
        )  # fmt: skip


class CharterFlask:
    """The Flask extension (see the module docstring).

    ``client_address``: how a request's client address is read, for the per-address
    limit of unauthenticated requests when the Charter has rate limits (default: the
    WSGI peer; behind a proxy, read the header it sets, e.g. after werkzeug's ProxyFix).
    """

    def __init__(
        self,
        charter: Charter | None = None,
        app: Flask | None = None,
        *,
        authenticate: FlaskAuthenticator | None = None,
        max_body_bytes: int = 1 << 20,
        channel: Channel = Channel.HTTP,
        problem_type_base: str | None = None,
        auth_scheme: str | None = "Bearer",
        client_address: Callable[[Any], str] = remote_address,
    ) -> None:
        self.charter = charter
        self.authenticate = authenticate
        self.options = {
            "channel": channel, "max_body_bytes": max_body_bytes,
            "problem_type_base": problem_type_base, "auth_scheme": auth_scheme,
            "client_address": client_address,
        }  # fmt: skip
        self._declared: list[Callable[[Flask], None]] = []
        self._apps: list[Flask] = []
        if app is not None:
            self.init_app(app)

    # -- applications -------------------------------------------------------------------

    def init_app(
        self,
        app: Flask,
        *,
        charter: Charter | None = None,
        authenticate: FlaskAuthenticator | None = None,
    ) -> None:
        """Serve this extension's routes on ``app`` with ``charter`` (default: the extension's)."""
        charter = charter or self.charter
        authenticate = authenticate or self.authenticate
        if charter is None or authenticate is None:
            raise ConfigurationError("CharterFlask.init_app needs a charter and an authenticate")
        if "charter" in app.extensions:
            raise ConfigurationError(f"Flask app {app.name!r} already has a CharterFlask")
        state = _State(charter, authenticate, **self.options)  # type: ignore[arg-type]
        app.extensions["charter"] = state
        app.before_request(_before)
        app.after_request(_after)
        app.register_error_handler(CharterError, _charter_error)
        app.register_error_handler(HTTPException, _http_error)
        app.register_error_handler(Exception, _unexpected)
        app.cli.add_command(charter_commands)
        self._apps.append(app)
        for declare in self._declared:
            declare(app)

    def _declare(self, declare: Callable[[Flask], None]) -> None:
        self._declared.append(declare)
        for app in self._apps:
            declare(app)

    # -- routes -------------------------------------------------------------------------

    def bind(
        self,
        method: str,
        path: str,
        action: str,
        *,
        target: str | None = "id",
        location: str | None = None,
        if_match: bool | Literal["required"] | None = None,
    ) -> None:
        """Route ``method path`` (``{id}`` parameters, as for FastAPI) to ``action`` on each app."""
        method = method.upper()

        def declare(app: Flask) -> None:
            state: _State = app.extensions["charter"]
            spec = state.charter.spec(action)  # an unknown action fails at start-up
            where = location if location is not None or not spec.creates else (
                path.rstrip("/") + "/{id}"
            )  # fmt: skip
            state.routes.claim(method, path, action)
            has_body = method in ("POST", "PUT", "PATCH")

            def view(**params: Any) -> Response:
                state = _state()
                actor = _actor(state)
                body = (
                    json_body(request.get_data(cache=False), request.headers.get("content-type"))
                    if has_body
                    else None
                )
                outcome = state.charter.execute(
                    actor, action, body,
                    target=params.get(target) if target else None,
                    key=idempotency_key(request.headers.getlist(IDEMPOTENCY_HEADER)),
                    reason=request.headers.get(REASON_HEADER),
                    channel=state.channel, request_id=g.charter_request_id,
                    expected_version=expected_version(
                        spec, request.headers.getlist("If-Match"),
                        required=if_match == "required",
                    ),
                )  # fmt: skip
                response = jsonify(outcome.body)
                response.status_code = outcome.status
                response.headers.update(outcome_headers(outcome, where, params))
                return response

            view.__charter__ = {"kind": "action", "action": action, "charter": state.charter}  # type: ignore[attr-defined]
            app.add_url_rule(_rule(path), f"charter:{action}", view, methods=[method])

        self._declare(declare)

    def action(self, action: str, *, if_match: bool | Literal["required"] | None = None) -> None:
        """Route ``action`` where the naming rule puts it (:mod:`charter.integrations.routing`)."""

        def declare(app: Flask) -> None:
            route = action_route(app.extensions["charter"].charter.spec(action))
            _bind_one(self, app, route.method, route.path, action, route.target, if_match)

        self._declare(declare)

    def generate(self, *, only: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> None:
        """Route every declared action (or ``only`` these) of each app's Charter by the rule."""
        skip = set(exclude)

        def declare(app: Flask) -> None:
            state: _State = app.extensions["charter"]
            names = list(only) if only is not None else sorted(state.charter.actions)
            routes = {n: action_route(state.charter.spec(n)) for n in names if n not in skip}
            for name in sorted(routes, key=lambda n: route_order(routes[n].path)):
                route = routes[name]
                _bind_one(self, app, route.method, route.path, name, route.target)

        self._declare(declare)

    def list(self, path: str, action: str, *, render: Callable[[Any], Any]) -> None:
        """``GET path?limit=&after=&sort=``: the records the caller may ``action``, in SQL."""

        def declare(app: Flask) -> None:
            state: _State = app.extensions["charter"]
            state.charter.spec(action)
            state.routes.claim("GET", path, f"list:{action}")

            def view() -> Response:
                state = _state()
                actor = _actor(state)
                query = list_query(query_parameters(request.args.items(multi=True)))
                page = state.charter.list_records(
                    actor, action, **query, channel=state.channel,
                    request_id=g.charter_request_id, reason=request.headers.get(REASON_HEADER),
                )  # fmt: skip
                response = jsonify({"items": page.items(render), "next": page.next,
                                    "limit": page.limit})  # fmt: skip
                response.headers.update(rate_headers(page.rate_limit))
                return response

            view.__charter__ = {"kind": "list", "action": action, "charter": state.charter}  # type: ignore[attr-defined]
            app.add_url_rule(_rule(path), f"charter:list:{action}", view, methods=["GET"])

        self._declare(declare)

    def export(self, path: str, action: str, *, formats: Sequence[str] = ("csv", "jsonl")) -> None:
        """``GET path?format=&sort=&filter.<field>=``: stream what the caller may ``action``.

        As the FastAPI adapter's: counted, charged and audited before the first byte,
        then streamed; the WSGI server's close of the response (the end, or a client
        gone) closes the stream, which audits the export completed or aborted.
        """
        allowed = export_formats(formats, path)

        def declare(app: Flask) -> None:
            state: _State = app.extensions["charter"]
            state.charter.spec(action)
            state.routes.claim("GET", path, f"export:{action}")

            def view() -> Response:
                state = _state()
                actor = _actor(state)
                params = query_parameters(request.args.items(multi=True))
                query = list_query(params, page=False)
                format = export_format(params, allowed)
                stream = state.charter.export(
                    actor, action, format=format, **query, channel=state.channel,
                    request_id=g.charter_request_id, reason=request.headers.get(REASON_HEADER),
                )  # fmt: skip
                response = Response(stream, content_type=stream.media_type)
                response.call_on_close(stream.close)
                response.headers.update(export_headers(path, stream, format))
                return response

            view.__charter__ = {"kind": "export", "action": action, "charter": state.charter}  # type: ignore[attr-defined]
            app.add_url_rule(_rule(path), f"charter:export:{action}", view, methods=["GET"])

        self._declare(declare)

    def webhook(self, path: str, receiver: Callable[[Charter], WebhookReceiver]) -> None:
        """``POST path``: a partner's signed callback; ``receiver(charter)`` builds each app's."""

        def declare(app: Flask) -> None:
            state: _State = app.extensions["charter"]
            built = receiver(state.charter)
            state.routes.claim("POST", path, f"webhook:{path}")

            def view() -> Response:
                body = request.get_data(cache=False)
                result = built.handle(
                    dict(request.headers), body, request_id=g.charter_request_id,
                    on_verified=lambda: accept_credential(g),
                )  # fmt: skip
                return jsonify(result.body())

            view.__charter__ = {"kind": "webhook", "receiver": built, "charter": state.charter}  # type: ignore[attr-defined]
            app.add_url_rule(_rule(path), f"charter:webhook:{path}", view, methods=["POST"])

        self._declare(declare)


def _bind_one(
    ext: CharterFlask, app: Flask, method: str, path: str, action: str, target: str | None,
    if_match: bool | Literal["required"] | None = None,
) -> None:  # fmt: skip
    """Bind on ``app`` only (a route derived from that app's own Charter)."""
    apps, declared = ext._apps, ext._declared
    ext._apps, ext._declared = [app], []
    try:
        ext.bind(method, path, action, target=target, if_match=if_match)
    finally:
        ext._apps, ext._declared = apps, declared


def _rule(path: str) -> str:
    """``/invoices/{id}`` as a Flask rule, ``/invoices/<id>``."""
    return _PARAMETER.sub(r"<\1>", path)


def _state() -> _State:
    return current_app.extensions["charter"]  # type: ignore[no-any-return]


def _actor(state: _State) -> Actor:
    actor = state.authenticate(request)
    if actor.scopes is None:  # "built in code, not narrowed": never an HTTP caller
        log.error("the authenticator of %s returned an actor without scopes", request.path)
        raise ConfigurationError("The service's authenticator returned an actor without scopes.")
    accept_credential(g)  # not counted per address (integrations.ratelimit)
    return actor


def _before() -> Response | None:
    """Request id first (every answer carries it), then the body limit, before any read;
    then the per-address limit of unauthenticated requests, before any authentication."""
    state = _state()
    g.charter_request_id = request_id(request.headers.get(REQUEST_ID_HEADER), uuid.uuid4().hex)
    if any(_UNSOUND_FIELD.search(value) for _, value in request.headers.items()):
        raise _HTTPProblem(400, "A header field holds NUL, CR or LF.")  # as the ASGI adapter
    declared = request.content_length
    if declared is not None and declared > state.max_body_bytes:
        raise PayloadTooLarge(f"The body exceeds {state.max_body_bytes} bytes.")
    request.max_content_length = state.max_body_bytes  # a body streamed without a length
    rule = state.address_limit
    if rule is not None:
        address = state.client_address(request)
        credential = rule.credential(name.encode("latin-1") for name, _ in request.headers)
        g.charter_address = address if credential else None  # counted unless accepted
        rule.before(address, credential=credential)
    return None


def _after(response: Response) -> Response:
    rid = getattr(g, "charter_request_id", None)
    if rid:
        response.headers[REQUEST_ID_HEADER] = rid
    address = getattr(g, "charter_address", None)
    rule = getattr(current_app.extensions.get("charter"), "address_limit", None)
    if address is not None and rule is not None:
        rule.answered(address, accepted=bool(getattr(g, ACCEPTED, False)))
    return response


def problem(error: CharterError) -> Response:
    """``error`` as RFC 9457 problem+json, as the FastAPI adapter renders it."""
    state = current_app.extensions.get("charter")
    body = error.problem(instance=request.path, type_base=getattr(state, "problem_type_base", None))
    rid = getattr(g, "charter_request_id", None)
    if rid:
        body["request_id"] = rid
    response = jsonify(body)
    response.status_code = error.status
    response.mimetype = PROBLEM_JSON
    response.headers.update(error.headers)
    scheme = getattr(state, "auth_scheme", "Bearer")
    if isinstance(error, Unauthenticated) and scheme:
        sent, _, credentials = request.headers.get("Authorization", "").partition(" ")
        invalid = scheme.lower() == "bearer" and sent.lower() == "bearer" and credentials.strip()
        response.headers.setdefault(
            "WWW-Authenticate", 'Bearer error="invalid_token"' if invalid else scheme
        )
    return response


#: A header value no sound client sends: refused before anything reads it.
_UNSOUND_FIELD = re.compile(r"[\x00\r\n]")


class _HTTPProblem(CharterError):
    """A framework-level HTTP error (unknown route, wrong method), as the FastAPI adapter's."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status  # type: ignore[misc]
        self.code = {  # type: ignore[misc]
            400: "bad_request", 404: "route_not_found", 405: "method_not_allowed",
            413: "payload_too_large",
        }.get(status, "http_error")  # fmt: skip
        self.title = detail  # type: ignore[misc]


def _charter_error(error: CharterError) -> Response:
    return problem(error)


def _http_error(error: HTTPException) -> Response:
    status = error.code or 500
    detail = {404: "Not Found", 405: "Method Not Allowed", 413: "Payload Too Large"}.get(
        status, error.name
    )
    response = problem(_HTTPProblem(status, detail))
    allow = error.get_response().headers.get("Allow")
    if status == 405 and allow:
        response.headers["Allow"] = ", ".join(
            sorted(m.strip() for m in allow.split(",") if m.strip() not in ("HEAD", "OPTIONS"))
        )
    return response


def _unexpected(error: Exception) -> Response:
    if isinstance(error, HTTPException):
        return _http_error(error)
    log.exception("unhandled error on %s %s", request.method, request.path)
    return problem(CharterError("An unexpected error occurred."))
