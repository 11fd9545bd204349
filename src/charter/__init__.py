"""Charter: one gate for every state-changing business action of an API."""

from .actions import ActionSpec, NoInput
from .actor import Actor, ActorKind, Channel
from .audit_verify import AuditProblem, VerificationReport
from .context import ActionContext
from .decision import Decision, DecisionKind
from .errors import (
    CharterError,
    ConfigurationError,
    Conflict,
    DomainError,
    Forbidden,
    InvalidInput,
    NotFound,
    PreconditionFailed,
    ReasonRequired,
    StorageUnavailable,
    Unauthenticated,
)
from .gate import Charter, Outcome
from .resources import ResourceSpec

__all__ = [
    "ActionContext",
    "ActionSpec",
    "Actor",
    "ActorKind",
    "AuditProblem",
    "Channel",
    "Charter",
    "CharterError",
    "ConfigurationError",
    "Conflict",
    "Decision",
    "DecisionKind",
    "DomainError",
    "Forbidden",
    "InvalidInput",
    "NoInput",
    "NotFound",
    "Outcome",
    "PreconditionFailed",
    "ReasonRequired",
    "ResourceSpec",
    "StorageUnavailable",
    "Unauthenticated",
    "VerificationReport",
]
