"""The per-call context a handler and a policy see (``C`` in rules)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .actor import Actor, Channel

if TYPE_CHECKING:
    from pydantic import BaseModel
    from sqlalchemy.orm import Session

__all__ = ["ActionContext"]


@dataclass(slots=True)
class ActionContext:
    """What is known about one call of one action.

    Rules read it as ``C`` (``C.now``, ``C.channel``, ``C.input.amount``);
    handlers use ``session`` for their change and ``actor`` for who acts.
    ``session`` is ``None`` when a policy is evaluated outside the gate (for
    example by :meth:`Charter.allowed_actions`).
    """

    action: str
    actor: Actor
    channel: Channel
    now: datetime
    request_id: str
    reason: str | None = None
    input: BaseModel | None = None
    session: Session | None = None
    idempotency_key: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
