"""Charter's errors: one root, a stable code, an HTTP status, a message a person can act on.

Every error a caller of Charter can see derives from :class:`CharterError`. The
``code`` is stable (clients and dashboards key on it; it is the RFC 9457
problem's ``code`` member, and the last segment of its ``type`` where the
deployment configures a base URI: see :meth:`CharterError.problem`),
``status`` is the HTTP status an adapter should answer with, and ``attrs``
carries structured, non-secret details. Foreign exceptions (SQLAlchemy,
drivers, Pydantic) are translated at the boundary with ``raise ... from exc``
and never reach a caller raw.

Hierarchy — every public error, and the module that defines it (``errors``
unless named); ``tests/test_layout.py`` checks that this drawing is complete::

    CharterError                          500 charter_error
    ├── ConfigurationError                500 configuration_error   (at start-up)
    ├── Unauthenticated                   401 unauthenticated
    │   └── UnknownOperator               401 unknown_operator      integrations.operator
    ├── InvalidInput                      422 invalid_input         (unknown fields, wrong types)
    │   ├── ReasonRequired                400 reason_required
    │   ├── InvalidPage                   400 invalid_page          (a list's cursor or limit)
    │   │   ├── InvalidCursor             400 invalid_cursor        (tampered, borrowed, expired)
    │   │   └── QueryParameterRepeated    400 invalid_page          (a query parameter sent twice)
    │   ├── PayloadTooLarge               413 payload_too_large
    │   │   ├── WebhookPayloadTooLarge    413 payload_too_large     webhooks
    │   │   └── BatchTooLarge             413 batch_too_large       data.batch
    │   ├── BatchEmpty                    400 batch_empty           data.batch
    │   ├── BulkUnsupported               400 bulk_unsupported      data.batch (no bulk= declared)
    │   ├── IdempotencyKeyMissing         400 idempotency_key_missing   idempotency.keys
    │   ├── IdempotencyKeyInvalid         400 idempotency_key_invalid   idempotency.keys
    │   ├── IdempotencyKeyUnsupported     400 idempotency_key_unsupported   idempotency.keys
    │   ├── MalformedBody                 400 malformed_body        integrations.strictjson
    │   ├── IfMatchInvalid                400 if_match_invalid      integrations.http
    │   ├── UnsupportedMediaType          415 unsupported_media_type    integrations.http
    │   ├── ImportFileInvalid             400 import_file_invalid   integrations.batch
    │   └── InvalidAmount                 422 invalid_amount        (credits: not a positive int)
    ├── UnknownAction                     404 unknown_action
    ├── NotFound                          404 not_found             (also: another tenant's record)
    ├── Forbidden                         403 forbidden             (carries the Decision)
    │   └── ConfirmationForbidden         403 confirmation_forbidden    confirmations
    ├── PreconditionFailed                412 precondition_failed   (If-Match / version)
    ├── PreconditionRequired              428 precondition_required integrations.http
    ├── Conflict                          409 conflict              (also: a deadlock that persists)
    │   ├── IdempotencyKeyInProgress      409 idempotency_key_in_progress   idempotency.keys
    │   ├── ConfirmationNotPending        409 confirmation_not_pending  confirmations
    │   │   └── ConfirmationExpired       410 confirmation_expired  confirmations (too late)
    │   └── InvalidTransition             409 invalid_transition    (not possible in this state)
    │       └── StepExpired               409 step_expired          (a flow's step came too late)
    ├── IdempotencyKeyReused              422 idempotency_key_reused    idempotency.keys
    ├── BatchFailed                       422 batch_failed          data.batch (all-or-nothing)
    ├── ReplayedError                     (the stored error's code and status)  idempotency.keys
    ├── DomainError                       409 domain_error          (handlers raise subclasses)
    │   └── SenderNotConfigured           409 sender_not_configured demo.sender
    ├── InsufficientCredits               402 insufficient_credits  (credits: balance too low)
    ├── QuotaExceeded                     429 quota_exceeded        (credits: used up this period)
    ├── HoldExpired                       409 hold_expired          (credits: capture after expiry)
    ├── HandlerFailed                     500 internal_error        (a handler crashed; rolled back)
    ├── WebhookError                      400 webhook_error         webhooks
    │   ├── WebhookHeadersMissing         400 webhook_headers_missing
    │   ├── WebhookMalformed              400 webhook_malformed
    │   ├── WebhookTimestampStale         401 webhook_timestamp_stale
    │   ├── WebhookSignatureInvalid       401 webhook_signature_invalid
    │   ├── WebhookReplayed               409 webhook_replayed
    │   └── WebhookRetryLater             503 webhook_retry_later   (transient; retry)
    ├── PaymentProviderError              502 payment_provider_error    demo.payment_client
    │   └── PaymentProviderUnavailable    503 payment_provider_unavailable
    ├── SenderFailed                      502 sender_failed         demo.sender
    ├── RateLimited                       429 rate_limited          (Retry-After, RateLimit fields)
    ├── StorageUnavailable                503 storage_unavailable   (retryable)
    │   └── RateLimitUnavailable          503 rate_limit_unavailable    (fail-closed, store down)
    ├── StorageError                      500 storage_error
    └── AuditIntegrityError               500 audit_integrity_error
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any, ClassVar

__all__ = [
    "AuditIntegrityError",
    "CharterError",
    "ConfigurationError",
    "Conflict",
    "DomainError",
    "Forbidden",
    "HandlerFailed",
    "HoldExpired",
    "InsufficientCredits",
    "InvalidAmount",
    "InvalidCursor",
    "InvalidInput",
    "InvalidPage",
    "InvalidTransition",
    "NotFound",
    "PayloadTooLarge",
    "PreconditionFailed",
    "QuotaExceeded",
    "RateLimitUnavailable",
    "RateLimited",
    "ReasonRequired",
    "StepExpired",
    "StorageError",
    "StorageUnavailable",
    "Unauthenticated",
    "UnknownAction",
]


class CharterError(Exception):
    """Root of every error Charter raises.

    ``message`` is meant for a person (an operator or an API client) and must
    never contain secrets. ``attrs`` are structured details that adapters may
    expose (they end up as RFC 9457 extension members).
    """

    code: ClassVar[str] = "charter_error"
    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal error"
    #: Set on a class whose errors are transient (see :attr:`transient`).
    retryable: ClassVar[bool] = False

    def __init__(self, message: str | None = None, **attrs: Any) -> None:
        self.message = message or self.title
        self.attrs: dict[str, Any] = attrs
        self.headers: dict[str, str] = {}
        super().__init__(self.message)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"

    # Transient or permanent: the one place that tells them apart. A channel whose
    # sender retries on its own (a partner's webhook) acts on it.

    @property
    def transient(self) -> bool:
        """Whether the same request, sent again later, may succeed: the sender should retry.

        True for a class marked ``retryable`` (storage unavailable, a provider that
        did not answer) and for any error that tells the caller when to come back:
        429 or 503, or a ``Retry-After`` header (RFC 9110 section 10.2.3), as on a key
        still in progress, a deadlock or serialization conflict that persisted, a rate
        limit.
        """
        return self.retryable or self.status in (429, 503) or "Retry-After" in self.headers

    @property
    def permanent(self) -> bool:
        """Whether this is a refusal: the same request would get the same answer again.

        A 4xx that is not :attr:`transient`: denied, not found, invalid input, an
        invalid state or precondition, a business rule, a key reused for another
        request. A 5xx that is not transient (a crashed handler, a broken store) is a
        failure, neither: nothing was decided.
        """
        return 400 <= self.status < 500 and not self.transient

    def problem(
        self, *, instance: str | None = None, type_base: str | None = None
    ) -> dict[str, Any]:
        """Render as an RFC 9457 problem details object; ``code`` always says which problem.

        ``type_base``: a URI prefix the deployment controls and documents; the
        ``type`` is then it plus the code (``https://errors.example.com/`` gives
        ``https://errors.example.com/not-found``). Without one, ``type`` is
        ``about:blank`` and, as RFC 9457 section 4.2.1 asks, the title is the HTTP
        status phrase. Charter never names a domain it does not control.
        """
        if type_base:
            problem_type, title = f"{type_base}{self.code.replace('_', '-')}", self.title
        else:
            problem_type, title = "about:blank", _status_phrase(self.status, self.title)
        body: dict[str, Any] = {
            "type": problem_type,
            "title": title,
            "status": self.status,
            "detail": self.message,
            "code": self.code,
        }
        if instance is not None:
            body["instance"] = instance
        for name, value in self.attrs.items():
            body.setdefault(name, value)
        return body


def _status_phrase(status: int, default: str) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:  # not a registered status code
        return default


class ConfigurationError(CharterError):
    """A declaration or setting is wrong; raised at start-up, not at the first request."""

    code = "configuration_error"
    title = "Configuration error"


class Unauthenticated(CharterError):
    code = "unauthenticated"
    status = 401
    title = "Authentication required"


class InvalidInput(CharterError):
    """The input does not match the action's model (unknown fields are errors)."""

    code = "invalid_input"
    status = 422
    title = "Invalid input"

    def __init__(
        self,
        message: str | None = None,
        *,
        errors: Sequence[Mapping[str, Any]] | None = None,
        **attrs: Any,
    ) -> None:
        if errors is not None:
            attrs["errors"] = [dict(e) for e in errors]
        super().__init__(message, **attrs)


class ReasonRequired(InvalidInput):
    code = "reason_required"
    status = 400
    title = "A reason is required"


class InvalidPage(InvalidInput):
    """A list's page cursor (``after``) or size (``limit``) is malformed or names no record."""

    code = "invalid_page"
    status = 400
    title = "Invalid page request"


class InvalidCursor(InvalidPage):
    """A page cursor this list did not issue to this actor: tampered, borrowed, expired or
    issued for another action, filter or sort (:mod:`charter.data.cursors`). Start again
    from the first page; ``reason`` is ``expired`` or ``invalid``."""

    code = "invalid_cursor"


class PayloadTooLarge(InvalidInput):
    code = "payload_too_large"
    status = 413
    title = "Payload too large"


class UnknownAction(CharterError):
    code = "unknown_action"
    status = 404
    title = "Unknown action"


class NotFound(CharterError):
    """The record does not exist *for this actor* (another tenant's record is not found)."""

    code = "not_found"
    status = 404
    title = "Not found"


class Forbidden(CharterError):
    """The policy denied the action. ``decision`` holds the internal explanation."""

    code = "forbidden"
    status = 403
    title = "Forbidden"

    def __init__(self, message: str | None = None, *, decision: Any = None, **attrs: Any) -> None:
        self.decision = decision
        super().__init__(message, **attrs)


class PreconditionFailed(CharterError):
    code = "precondition_failed"
    status = 412
    title = "Precondition failed"


class Conflict(CharterError):
    code = "conflict"
    status = 409
    title = "Conflict"


class InvalidTransition(Conflict):
    """The action is not possible in the record's current state (its workflow says so).

    ``state`` is the record's current state and ``allowed`` the actions its
    workflow allows next from there (both also in the problem details).
    """

    code = "invalid_transition"
    title = "Not possible in the current state"


class StepExpired(InvalidTransition):
    """A flow's step came after its deadline; the flow must be started again."""

    code = "step_expired"
    title = "This step has expired"


class HandlerFailed(CharterError):
    """A handler crashed; its effect was rolled back. Details are in the server log only."""

    code = "internal_error"
    status = 500
    title = "Internal error"


class DomainError(CharterError):
    """A business rule refused the change; raise subclasses of it from handlers.

    Unlike a crash in a handler, a domain error is an *outcome*: it is audited
    and, for idempotent actions, stored and replayed.
    """

    code = "domain_error"
    status = 409
    title = "The request cannot be carried out"


class InvalidAmount(InvalidInput):
    """An amount is not a positive whole number of minor units within the bound."""

    code = "invalid_amount"
    status = 422
    title = "Invalid amount"


class InsufficientCredits(CharterError):
    """The account's balance does not cover the action's cost; nothing was charged or done."""

    code = "insufficient_credits"
    status = 402
    title = "Insufficient credits"


class QuotaExceeded(CharterError):
    """The period's quota is used up; ``Retry-After`` says when the next period starts."""

    code = "quota_exceeded"
    status = 429
    title = "Quota exceeded"

    def __init__(self, message: str | None = None, *, retry_after: int, **attrs: Any) -> None:
        super().__init__(message, **attrs)
        self.headers["Retry-After"] = str(max(1, retry_after))


class HoldExpired(CharterError):
    """A hold is no longer pending (expired, released): nothing was captured."""

    code = "hold_expired"
    status = 409
    title = "The hold has expired"


class StorageUnavailable(CharterError):
    """The database (or another store) cannot be reached; safe to retry later."""

    code = "storage_unavailable"
    status = 503
    title = "Service temporarily unavailable"
    retryable = True

    def __init__(self, message: str | None = None, *, retry_after: int = 1, **attrs: Any) -> None:
        super().__init__(message, **attrs)
        self.headers["Retry-After"] = str(retry_after)


class RateLimitUnavailable(StorageUnavailable):
    """A fail-closed rate class's store (Redis) cannot be reached: refused, retry shortly."""

    code = "rate_limit_unavailable"


class RateLimited(CharterError):
    """Over a rate class's limit (429); ``headers`` carry ``Retry-After`` and the RateLimit fields.

    ``rate_class`` names the class, ``retry_after`` the seconds until a call may
    pass again (see :mod:`charter.ratelimit`).
    """

    code = "rate_limited"
    status = 429
    title = "Too many requests"


class StorageError(CharterError):
    code = "storage_error"
    title = "Storage error"


class AuditIntegrityError(CharterError):
    code = "audit_integrity_error"
    title = "The audit trail failed verification"
