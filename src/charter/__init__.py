"""Charter: one gate for every state-changing business action of an API.

Declare resources and actions on a :class:`Charter`, write rules with ``A``
(the actor), ``R`` (the record) and ``C`` (the call's context), and run every
action, from every channel, through :meth:`Charter.execute`.
"""

from .actions import ActionSpec, BulkMode, NoInput
from .actor import Actor, ActorKind, Channel
from .agent_tools import ToolDefinition
from .audit import AuditProblem, VerificationReport
from .confirmations import ConfirmationExpired, ConfirmationForbidden, ConfirmationNotPending
from .context import ActionContext
from .data.batch import (
    BatchEmpty,
    BatchFailed,
    BatchItem,
    BatchOutcome,
    BatchTooLarge,
    BulkUnsupported,
)
from .data.export import ExportStream
from .data.lists import Page
from .decision import Decision, DecisionKind
from .errors import (
    CharterError,
    ConfigurationError,
    Conflict,
    DomainError,
    Forbidden,
    HoldExpired,
    InsufficientCredits,
    InvalidAmount,
    InvalidCursor,
    InvalidInput,
    InvalidTransition,
    NotFound,
    PreconditionFailed,
    QuotaExceeded,
    RateLimited,
    ReasonRequired,
    StepExpired,
    StorageUnavailable,
    Unauthenticated,
    UnknownAction,
)
from .exposure import Agent
from .gate import Charter, HandlerFailed, Outcome
from .idempotency import (
    IdempotencyKeyInProgress,
    IdempotencyKeyInvalid,
    IdempotencyKeyMissing,
    IdempotencyKeyReused,
    IdempotencyKeyUnsupported,
    IdempotencyMode,
)
from .policy import A, ActionPolicy, C, PolicySet, R, Rule
from .resources import ResourceSpec
from .sessions import ImpersonationSessions
from .workflow import Transition, Workflow

__all__ = [
    "A",
    "ActionContext",
    "ActionPolicy",
    "ActionSpec",
    "Actor",
    "ActorKind",
    "Agent",
    "AuditProblem",
    "BatchEmpty",
    "BatchFailed",
    "BatchItem",
    "BatchOutcome",
    "BatchTooLarge",
    "BulkMode",
    "BulkUnsupported",
    "C",
    "Channel",
    "Charter",
    "CharterError",
    "ConfigurationError",
    "ConfirmationExpired",
    "ConfirmationForbidden",
    "ConfirmationNotPending",
    "Conflict",
    "Decision",
    "DecisionKind",
    "DomainError",
    "ExportStream",
    "Forbidden",
    "HandlerFailed",
    "HoldExpired",
    "IdempotencyKeyInProgress",
    "IdempotencyKeyInvalid",
    "IdempotencyKeyMissing",
    "IdempotencyKeyReused",
    "IdempotencyKeyUnsupported",
    "IdempotencyMode",
    "ImpersonationSessions",
    "InsufficientCredits",
    "InvalidAmount",
    "InvalidCursor",
    "InvalidInput",
    "InvalidTransition",
    "NoInput",
    "NotFound",
    "Outcome",
    "Page",
    "PolicySet",
    "PreconditionFailed",
    "QuotaExceeded",
    "R",
    "RateLimited",
    "ReasonRequired",
    "ResourceSpec",
    "Rule",
    "StepExpired",
    "StorageUnavailable",
    "ToolDefinition",
    "Transition",
    "Unauthenticated",
    "UnknownAction",
    "VerificationReport",
    "Workflow",
]
