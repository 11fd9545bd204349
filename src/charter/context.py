"""The per-call context a handler and a policy see (``C`` in rules)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from .actor import Actor, Channel
from .errors import ConfigurationError

if TYPE_CHECKING:
    from pydantic import BaseModel
    from sqlalchemy.orm import Session

    from .idempotency.recovery import StepRunner

T = TypeVar("T")
M = TypeVar("M")

__all__ = ["ActionContext"]


@dataclass(slots=True)
class ActionContext:
    """What is known about one call of one action.

    Rules read it as ``C`` (``C.now``, ``C.channel``, ``C.input.amount``);
    handlers use ``session`` for their change, ``actor`` for who acts,
    ``locked`` for the further records the action declared (``locks=``, in the
    declared order) and :meth:`lock` for records known only inside the handler.
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
    steps: StepRunner | Callable[[], StepRunner] | None = None
    locked: tuple[Any, ...] = ()
    locker: Callable[[type[Any], Any], Any] | None = None

    @property
    def idempotency_scope(self) -> tuple[str, str, str]:
        """(tenant, subject, key): where a keyed call's record lives (see charter.idempotency)."""
        if self.idempotency_key is None:
            raise ConfigurationError("only keyed calls have an idempotency scope")
        return (self.actor.tenant_id, self.actor.subject.id, self.idempotency_key)

    def lock(self, model: type[M], id: Any) -> M | None:
        """Load and lock one more record of a declared resource, in the actor's tenant.

        ``None`` if there is no such record in the tenant. Records locked here
        come after the declared ones (``locks=``), so declare what you can: the
        declared records are locked in one deterministic order, which is what
        keeps two opposite calls from deadlocking.
        """
        if self.locker is None:
            raise ConfigurationError("ctx.lock() works inside the gate's transaction only")
        return self.locker(model, id)  # type: ignore[no-any-return]

    def external(self, name: str, call: Callable[[str], T]) -> T:
        """Call an outside service as a recovered step (see :mod:`charter.idempotency.recovery`).

        ``call`` receives an idempotency key derived from this request, stable
        across retries: pass it to the outside service so it can deduplicate.
        Returns the step's result (from the store if a retry resumes after it).
        """
        if self.steps is None:
            raise ConfigurationError(
                f"{self.action}: ctx.external() needs an idempotent action "
                "(idempotency='required') called with a key"
            )
        if callable(self.steps):  # built lazily, on the first step
            self.steps = self.steps()
        return self.steps.external(name, call)
