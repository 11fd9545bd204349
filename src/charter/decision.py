"""The outcome of a policy evaluation: allowed or not, which rule decided, and why."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = ["Decision", "DecisionKind"]


class DecisionKind(StrEnum):
    ALLOWED = "allowed"
    DENIED_BY_RULE = "denied_by_rule"  # an explicit deny rule matched
    NO_RULE = "no_rule"  # deny by default: no allow rule matched
    ERROR = "error"  # evaluation failed; fails closed
    NOT_FOUND = "not_found"  # the record does not exist for this actor
    # Not possible in the record's current state (its workflow), whoever asks: not a
    # matter of permission. ``allowed_actions`` tells it apart from the denials above.
    INVALID_TRANSITION = "invalid_transition"


@dataclass(frozen=True, slots=True)
class Decision:
    """Allowed or not, the deciding rule, and explanations.

    ``reason`` is internal (may name values of the record and actor: fit for the
    audit trail and for operators); ``public_reason`` is safe to show to the
    caller. ``failed`` lists each failed condition, e.g.
    ``"R.amount 12000 <= A.approval_limit 5000 is false"``.
    """

    allowed: bool
    kind: DecisionKind
    rule: str | None = None
    reason: str = ""
    public_reason: str = ""
    failed: tuple[str, ...] = ()

    @classmethod
    def allow(cls, rule: str | None, reason: str = "") -> Decision:
        return cls(True, DecisionKind.ALLOWED, rule, reason or f"allowed by {rule}", "allowed")

    @classmethod
    def deny(
        cls,
        kind: DecisionKind,
        *,
        rule: str | None = None,
        reason: str,
        public_reason: str = "You are not allowed to do this.",
        failed: tuple[str, ...] = (),
    ) -> Decision:
        return cls(False, kind, rule, reason, public_reason, failed)

    @property
    def possible(self) -> bool:
        """False when the action is not possible in the record's state (whoever asks)."""
        return self.kind is not DecisionKind.INVALID_TRANSITION

    def __bool__(self) -> bool:
        return self.allowed
