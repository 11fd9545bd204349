"""HTTP routes where a person confirms (or refuses) an agent's pending call (issue 12, item 6).

``confirmation_routes(routes, agents)`` adds, on a :class:`CharterRoutes` app:

* ``GET /agent/confirmations`` — the requests waiting for the caller's confirmation;
* ``GET /agent/confirmations/{id}`` — one of them (404 for anyone who may not decide it);
* ``POST /agent/confirmations/{id}/approve`` — run it, as the agent for the user,
  through the whole gate (the action's own answer, or 403/409/410);
* ``POST /agent/confirmations/{id}/reject`` — it never runs.

The caller is the route's authenticated actor (an ordinary user token): the
rules of :meth:`AgentChannel.approve` decide who may confirm. The endpoints
carry Charter's marker, so ``charter check`` counts them as Charter's.
"""

from __future__ import annotations

import functools
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ..confirmations import ConfirmationExpired, ConfirmationForbidden, ConfirmationNotPending
from ..errors import CharterError, NotFound, RateLimited, Unauthenticated
from . import openapi
from .agent import AgentChannel
from .fastapi import CharterRoutes, outcome_response

__all__ = ["confirmation_routes"]


def confirmation_routes(
    routes: CharterRoutes, agents: AgentChannel, *, prefix: str = "/agent/confirmations"
) -> None:
    """Add the confirmation routes under ``prefix`` (see the module docstring)."""
    confirmed = sorted(n for n, s in agents.charter.actions.items() if s.agent and s.agent.confirm)

    async def pending(request: Request) -> JSONResponse:
        """The agents' requests waiting for your confirmation, oldest first."""
        actor = await routes.actor(request)
        found = await run_in_threadpool(agents.pending, actor)
        return JSONResponse({"items": [p.as_json() for p in found]})

    async def one(id: str, request: Request) -> JSONResponse:
        """One pending request, as its approver sees it."""
        actor = await routes.actor(request)
        return JSONResponse((await run_in_threadpool(agents.get, actor, id)).as_json())

    async def approve(id: str, request: Request) -> JSONResponse:
        """Approve the request: the action runs now, decided again by the gate."""
        actor = await routes.actor(request)
        outcome = await run_in_threadpool(
            functools.partial(agents.approve, actor, id, channel=routes.channel)
        )
        return outcome_response(outcome)  # the action's own answer: ETag, no-store, RateLimit

    async def reject(id: str, request: Request) -> JSONResponse:
        """Refuse the request: it never runs."""
        actor = await routes.actor(request)
        done = await run_in_threadpool(
            functools.partial(agents.reject, actor, id, channel=routes.channel)
        )
        return JSONResponse(done.as_json())

    mark: dict[str, Any] = {"kind": "confirmation", "actions": confirmed,
                            "charter": agents.charter}  # fmt: skip
    table: tuple[tuple[str, Any, str], ...] = (
        (prefix, pending, "GET"),
        (f"{prefix}/{{id}}", one, "GET"),
        (f"{prefix}/{{id}}/approve", approve, "POST"),
        (f"{prefix}/{{id}}/reject", reject, "POST"),
    )
    auth = routes.auth_scheme
    # What each route answers, documented (the OpenAPI document says what the service does).
    asked: tuple[type[CharterError], ...] = (Unauthenticated, RateLimited)
    decided = (*asked, NotFound, ConfirmationForbidden, ConfirmationNotPending, ConfirmationExpired)
    # Approving runs the confirmed action: its own answers too, from its declaration.
    ran: dict[int, set[str]] = {}
    for name in confirmed:
        found = openapi.action_problems(
            agents.charter.spec(name), has_body=True, rate_limited=True, errors=decided
        )
        for status, codes in found.items():
            ran.setdefault(status, set()).update(codes)
    documented: dict[str, dict[int | str, Any]] = {
        "pending": openapi.problem_responses(*asked, auth_scheme=auth),
        "one": openapi.problem_responses(*decided, auth_scheme=auth),
        "approve": {k: v for k, v in openapi.responses(None, None, ran, auth_scheme=auth).items()},
        "reject": openapi.problem_responses(*decided, auth_scheme=auth),
    }
    for path, endpoint, method in table:
        endpoint.__charter__ = mark
        routes.app.add_api_route(
            path, endpoint, methods=[method], name=f"agent:{endpoint.__name__}",
            responses=documented[endpoint.__name__],
        )  # fmt: skip
