"""Support impersonation sessions over HTTP (FastAPI): open, list, end, and "who acted for me".

Every route runs an action of :mod:`charter.sessions` through the gate
(``CharterRoutes.bind`` and ``list``), so each is authenticated, scoped,
rate limited and audited like the rest of the API::

    POST /support/sessions                {"user": "alice", "minutes": 30} + X-Charter-Reason
    GET  /support/sessions                the caller's sessions (a manager: the tenant's)
    GET  /support/sessions/{id}           one session
    POST /support/sessions/{id}/close     its support user ends it
    POST /support/sessions/{id}/revoke    with a reason; its token is refused from now on
    GET  /me/impersonations               the caller's sessions and the actions under each

The token of an opened session is in the 201's body (``token``); the app's
``authenticate=`` must pass the sessions to ``TokenSigner.authenticate(...,
sessions=sessions)`` for it to be accepted (:func:`session_authenticator`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ..actor import Actor
from ..errors import InvalidPage
from ..ratelimit import rate_headers
from ..sessions import SESSION_ACTIONS, ImpersonationSession, ImpersonationSessions, session_view
from ..tokens import Directory, TokenSigner
from .fastapi import CharterRoutes
from .http import ON_BEHALF_HEADER, on_behalf_claim, query_parameters
from .openapi import list_operation
from .paging import LIST_PARAMETERS, list_query

__all__ = ["session_authenticator", "support_routes"]


def session_authenticator(
    signer: TokenSigner,
    directory: Directory,
    sessions: ImpersonationSessions,
    *,
    claims: bool = False,
) -> Callable[[Request], Actor]:
    """An ``authenticate=`` for :class:`CharterRoutes` that accepts session tokens too.

    A session token's session is looked up on every request (never cached). In
    a service with sessions, acting for someone happens inside one: a plain
    token's ``X-On-Behalf-Of`` claim is refused (401), because an action taken
    that way has no time limit, cannot be revoked, and is not listed to the
    user in ``GET /me/impersonations`` (an attack run on the reference service
    kept acting for alice that way after her session was revoked).
    ``claims=True`` accepts such claims as well (the gate checks them against
    the grants, as without sessions).
    """

    def authenticate(request: Request) -> Actor:
        claimed = on_behalf_claim(request.headers.get(ON_BEHALF_HEADER.lower()), accepted=claims)
        return signer.authenticate(
            request.headers.get("authorization"),
            directory,
            on_behalf_of=claimed,
            sessions=sessions,
        )

    return authenticate


def support_routes(
    routes: CharterRoutes,
    sessions: ImpersonationSessions,
    *,
    prefix: str = "/support/sessions",
    me: str = "/me/impersonations",
) -> None:
    """Bind the session routes (see the module docstring) on ``routes``' app."""
    now = sessions.charter.clock

    def render(record: ImpersonationSession) -> dict[str, Any]:
        return session_view(record, now())

    routes.bind("POST", prefix, SESSION_ACTIONS["open"], target=None)
    routes.list(prefix, SESSION_ACTIONS["get"], render=render)
    routes.bind("GET", f"{prefix}/{{id}}", SESSION_ACTIONS["get"])
    routes.bind("POST", f"{prefix}/{{id}}/close", SESSION_ACTIONS["close"])
    routes.bind("POST", f"{prefix}/{{id}}/revoke", SESSION_ACTIONS["revoke"])

    async def my_impersonations(request: Request) -> JSONResponse:
        """Who acted on my behalf, and when: my sessions, newest first, with their actions."""
        actor = await routes.actor(request)
        query = list_query(query_parameters(request.query_params.multi_items()))
        if query["sort"] is not None or query["where"]:
            raise InvalidPage("this list takes only limit and after", parameter="sort")
        page = await run_in_threadpool(
            functools.partial(
                sessions.my_impersonations, actor, limit=query["limit"], after=query["after"],
                channel=routes.channel, request_id=request.state.request_id,
            )
        )  # fmt: skip
        body = {"items": page.items, "next": page.next, "limit": page.limit}
        return JSONResponse(body, headers=rate_headers(page.rate_limit))  # as routes.list does

    # What charter check reads (charter.tools): this route lists support.session.mine.
    my_impersonations.__charter__ = {  # type: ignore[attr-defined]
        "kind": "list", "action": SESSION_ACTIONS["mine"], "charter": sessions.charter,
        "page_cap": sessions.charter.max_page,
    }  # fmt: skip
    routes.app.add_api_route(
        me,
        my_impersonations,
        methods=["GET"],
        name="me:impersonations",
        openapi_extra=list_operation(
            sessions.charter.spec(SESSION_ACTIONS["mine"]), parameters=LIST_PARAMETERS,
            rate_limited=sessions.charter.rate_limiter is not None,
            auth_scheme=routes.auth_scheme,
        ),
    )  # fmt: skip
