"""What an executed action produced (the value every channel renders)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Outcome"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of :meth:`Charter.execute`.

    ``status`` is the HTTP status a channel should answer with; ``version`` the
    record's new version (the ETag); ``replayed`` is true when the outcome was
    stored by an earlier request with the same idempotency key. ``balance`` is,
    for an action with a cost, what its account holds after the charge (minor
    units), or the uses of its period quota left (``None`` otherwise, and on a
    replay).
    """

    action: str
    status: int
    body: Any
    request_id: str
    resource_id: str | None = None
    version: int | None = None
    replayed: bool = False
    balance: int | None = None
    #: The rate limit policies the call was counted against, for the ``RateLimit`` fields.
    rate_limit: tuple[Any, ...] = ()
