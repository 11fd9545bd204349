"""HTTP: requests without an accepted credential are limited per client address, before any
authentication work.

Pure ASGI middleware, so the check runs before the route, the body, the
authenticator. A request that carries no credential field (``Authorization``,
or a signed webhook's ``webhook-signature`` / ``Stripe-Signature``) counts
against the ``anonymous`` class of its client address at once; one that
carries a credential is checked against the same count *without* adding to it
(an address that has used up its allowance is refused before its token is even
verified), and counts only if it is answered 401. So a flood of missing or
forged credentials from one address is refused with 429 ``rate_limited``
without costing a signature check, while authenticated users behind the same
address are not counted against it.

The client address is the ASGI ``client`` (the peer); behind a proxy, give
``client_address`` a function that reads the header the proxy sets.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import datetime

from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..audit.entry import AuditEntry
from ..errors import CharterError
from ..ratelimit import ANONYMOUS, RateLimiter

__all__ = ["AddressLimitMiddleware", "peer_address"]

PROBLEM_JSON = "application/problem+json"
#: Header fields that carry a credential the app verifies (a bearer token, a webhook signature).
CREDENTIAL_FIELDS = frozenset({b"authorization", b"webhook-signature", b"stripe-signature"})


def peer_address(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


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
        self.limiter = limiter
        self.clock = clock
        self.client_address = client_address
        self.rate_class = limiter.rate_class(ANONYMOUS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        address = self.client_address(scope)[:64]
        who = RateLimiter.who(None, f"address:{address}")
        credential = any(name.lower() in CREDENTIAL_FIELDS for name, _ in scope["headers"])
        try:
            await run_in_threadpool(self._check, who, address, counted=not credential)
        except CharterError as error:
            await self._refuse(scope, send, error)
            return
        if not credential:
            await self.app(scope, receive, send)
            return
        status: list[int] = []

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
            await send(message)

        await self.app(scope, receive, watch)
        if status and status[0] == 401:  # the credential was refused: it counts
            with contextlib.suppress(CharterError):  # answered already; the next is refused
                await run_in_threadpool(self._check, who, address, counted=True)

    def _check(self, who: str, address: str, *, counted: bool) -> None:
        now = self.clock()

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
