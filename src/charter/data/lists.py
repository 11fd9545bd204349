"""Lists filtered by the same rules that decide: one page of the records an actor may act on."""

from __future__ import annotations

from typing import Any

from ..actions import ActionSpec
from ..context import ActionContext
from ..decision import Decision
from ..errors import ConfigurationError, Forbidden, InvalidPage
from ..pipeline.call import entry_for
from ..pipeline.writes import Committer
from ..policy import ActionPolicy
from ..resources import coerce_id

__all__ = ["DEFAULT_PAGE", "MAX_PAGE", "list_records"]

DEFAULT_PAGE = 50
MAX_PAGE = 200  # server-enforced page cap: a caller cannot raise it


def list_records(
    committer: Committer,
    spec: ActionSpec,
    policy: ActionPolicy,
    ctx: ActionContext,
    *,
    limit: int,
    after: Any,
) -> tuple[list[Any], Any]:
    """One page of the records ``ctx.actor`` may ``spec``, in id order (keyset paging).

    The page size is capped by the server at :data:`MAX_PAGE` whatever the
    caller asks; the read is audited (one entry per page). Returns the rows and
    the cursor of the next page (``None`` on the last page). A cursor that no
    record's id can be (not an id of the primary key's column: ``ColumnDomain``)
    or a limit that is not an integer is a 400 :class:`InvalidPage`, on every
    database alike, before any query.
    """
    resource = spec.resource
    if resource is None or not spec.listable:
        raise ConfigurationError(f"{spec.name} is not declared listable=True")
    if not isinstance(limit, int) or isinstance(limit, bool):
        raise InvalidPage("the page limit must be an integer", parameter="limit")
    limit = max(1, min(limit, MAX_PAGE))
    key = None
    if after is not None:
        key = coerce_id(resource, after)
        if key is None:
            raise InvalidPage(
                "the page cursor is invalid: pass the 'next' value of the previous page",
                parameter="after",
            )
    denial = policy.credential_denial(ctx.actor)
    if denial is not None:
        committer.alone(entry_for(spec, ctx, None, None, denial, "forbidden", None,
                                  detail={"explanation": denial.reason}))  # fmt: skip
        raise Forbidden(denial.public_reason, decision=denial)
    # Built once per (actor shape, has cursor): values are parameters (ActionPolicy doc).
    # Loaded by the ORM: adopting Core rows one by one (pipeline.loading.Adopter) pays
    # for a single record but cost twice the ORM's bulk row loading on a 50-row page.
    stmt, params = policy.page_statement(ctx.actor, ctx, limit=limit + 1, after=key)
    with committer.transaction() as (session, lease):
        rows = list(session.execute(stmt, params).scalars())
        page, more = rows[:limit], len(rows) > limit
        entry = entry_for(
            spec, ctx, None, None, Decision.allow("filter"), "ok", None,
            detail={"listed": len(page), "after": None if after is None else str(after)[:64]},
        )  # fmt: skip
        committer.write(session, lease, [entry], None)
    return page, (resource.identity(page[-1]) if more and page else None)
