"""HTTP: requests without an accepted credential are limited per client address, before any
authentication work.

Pure ASGI middleware, so the check runs before the route, the body, the
authenticator. A request that carries no credential field (``Authorization``,
or a signed webhook's ``webhook-signature`` / ``Stripe-Signature``) counts
against the ``anonymous`` class of its client address at once; one that
carries a credential is checked against the same count *without* adding to it
(an address that has used up its allowance is refused before its token is even
verified), and counts once answered unless its credential was **accepted**:
the adapter's authentication succeeded (``CharterRoutes.actor``, the Flask
adapter's) or a webhook's signature verified (:func:`accept_credential`). So
a flood of missing or forged credentials from one address is refused with 429
``rate_limited`` without costing a signature check, authenticated users behind
the same address are not counted against it, and a junk ``Authorization``
sent to a route that never reads it (a health check, the OpenAPI document, an
unknown path) counts like no credential: counting only the 401s let such a
flood through unlimited.

The client address is the ASGI ``client`` (the peer); behind a proxy, give
``client_address`` a function that reads the header the proxy sets. An IPv6
address is counted by its /64 network (:func:`address_key`): one subscriber
line is given at least a /64, so a client could otherwise send each request
from a new address of its own and never be counted twice.

:class:`AddressLimit` is the rule, framework-free; :class:`AddressLimitMiddleware`
applies it to an ASGI app (FastAPI), and the Flask adapter applies it in its
``before_request`` / ``after_request`` hooks.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..audit.entry import AuditEntry
from ..errors import CharterError
from ..ratelimit import ANONYMOUS, RateLimiter

__all__ = [
    "AddressLimit",
    "AddressLimitMiddleware",
    "accept_credential",
    "address_key",
    "peer_address",
]

PROBLEM_JSON = "application/problem+json"
#: Header fields that carry a credential the app verifies (a bearer token, a webhook signature).
CREDENTIAL_FIELDS = frozenset({b"authorization", b"webhook-signature", b"stripe-signature"})
#: The longest client address counted (a longer one, from a proxy's header, is cut).
MAX_ADDRESS = 64
#: Where an ASGI request's state records that its credential was accepted.
ACCEPTED = "charter_credential_accepted"


def accept_credential(state: Any) -> None:
    """Record on a request's ``state`` (Starlette's ``request.state``, Flask's ``g``) that its
    credential was accepted: the per-address limit does not count it (module docstring)."""
    setattr(state, ACCEPTED, True)


def peer_address(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def address_key(address: str) -> str:
    """What one client is counted as: an IPv4 address, an IPv6 /64, or the text as given.

    IPv6 is counted per /64 (RFC 6177: a site, down to one subscriber, is given
    at least a /64, every address of which it may use); an IPv4-mapped IPv6
    address (``::ffff:192.0.2.1``, a dual-stack socket's form) is its IPv4
    address. Anything else (``unknown``, a proxy's label) is kept as it is, cut
    to :data:`MAX_ADDRESS` characters.
    """
    text = address[:MAX_ADDRESS].strip()
    try:
        parsed = ipaddress.ip_address(text.split("%", 1)[0])  # without an IPv6 zone index
    except ValueError:
        return text
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network((parsed, 64), strict=False))
    return str(parsed)


class AddressLimit:
    """The per-address rule of unauthenticated requests, for any framework (module docstring).

    Per request: :meth:`before` with the client address and whether a credential
    field was sent (raises the 429 :class:`~charter.errors.RateLimited`, or 503
    where the class fails closed); then, for a request that sent a credential,
    :meth:`answered`, which counts it unless the credential was accepted.
    """

    def __init__(self, limiter: RateLimiter, clock: Callable[[], datetime]) -> None:
        self.limiter = limiter
        self.clock = clock
        self.rate_class = limiter.rate_class(ANONYMOUS)

    @staticmethod
    def credential(names: Iterable[bytes]) -> bool:
        """Whether the request's header field ``names`` include a credential field."""
        return any(name.lower() in CREDENTIAL_FIELDS for name in names)

    def before(self, address: str, *, credential: bool) -> None:
        """Count a request without a credential; check one with a credential without counting."""
        self._check(address_key(address), counted=not credential)

    def answered(self, address: str, *, accepted: bool) -> None:
        """A request that sent a credential was answered: it counts unless it was ``accepted``
        (refused, or never read by the route it reached)."""
        if not accepted:
            with contextlib.suppress(CharterError):  # answered already; the next is refused
                self._check(address_key(address), counted=True)

    def _check(self, address: str, *, counted: bool) -> None:
        now = self.clock()
        who = RateLimiter.who(None, f"address:{address}")

        def audit(detail: dict[str, object]) -> AuditEntry:
            return AuditEntry(
                at=now, subject=f"address:{address}", subject_kind="anonymous",
                channel="http", action="http.unauthenticated", decision="deny",
                outcome="rate_limited", detail=detail,
            )  # fmt: skip

        if counted:
            self.limiter.check(self.rate_class, who, now, audit)
        else:
            self.limiter.peek(self.rate_class, who, now, audit)


class AddressLimitMiddleware:
    """Limit unauthenticated requests per client address (see the module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        limiter: RateLimiter,
        clock: Callable[[], datetime],
        client_address: Callable[[Scope], str] = peer_address,
    ) -> None:
        self.app = app
        self.rule = AddressLimit(limiter, clock)
        self.client_address = client_address

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        address = self.client_address(scope)
        credential = self.rule.credential(name for name, _ in scope["headers"])
        try:
            await run_in_threadpool(self.rule.before, address, credential=credential)
        except CharterError as error:
            await self._refuse(scope, send, error)
            return
        if not credential:
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})  # the request's state: the route marks it
        await self.app(scope, receive, send)
        if not state.get(ACCEPTED):
            await run_in_threadpool(self.rule.answered, address, accepted=False)

    async def _refuse(self, scope: Scope, send: Send, error: CharterError) -> None:
        state = getattr(scope.get("app"), "state", None)
        body = error.problem(
            instance=scope.get("path"),
            type_base=getattr(state, "charter_problem_type_base", None),
        )
        request_id = scope.get("state", {}).get("request_id")
        if request_id:
            body["request_id"] = request_id
        response = JSONResponse(
            body, status_code=error.status, media_type=PROBLEM_JSON, headers=error.headers
        )
        await response(scope, _empty_receive, send)


async def _empty_receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}
