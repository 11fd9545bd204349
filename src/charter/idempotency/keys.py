"""Idempotency keys: the same request runs once, however often and however concurrently it arrives.

Semantics follow draft-ietf-httpapi-idempotency-key-header and Stripe's behaviour:

* a key is 1-255 printable ASCII characters, scoped to (tenant, subject, key):
  another user's identical key is an unrelated request, and rotating an access
  token does not change the scope;
* the **fingerprint** is the action, the target and the canonical form of the
  *validated* input; the same key with another fingerprint is refused (422)
  and the stored record is left alone;
* the same key and fingerprint after completion replays the stored outcome
  (status and body, or the stored domain error) without running anything;
* only outcomes of a handler that ran are stored (success and domain errors).
  Validation errors, denials, rate limiting and infrastructure failures store
  nothing: the claim rolls back with the transaction and a corrected retry runs.

Why it holds under concurrency: the claim is an ``INSERT`` on the unique
(tenant, subject, key) index, *inside the effect's transaction* and before the
handler runs. On PostgreSQL a concurrent duplicate's insert waits on the
uncommitted index entry until the first transaction ends (bounded by
``lock_timeout``, after which it answers 409 ``idempotency_key_in_progress``
with ``Retry-After``); if the first committed, the duplicate's insert fails
with a unique violation, its transaction (which ran nothing) rolls back and it
replays; if the first rolled back, the duplicate's insert goes through and it
runs. On SQLite writers are serialized by ``BEGIN IMMEDIATE``, with the same
outcome. Because the effect, the audit entry and the stored outcome commit
together, a crash at any point leaves either nothing (a retry runs once) or
everything (a retry replays).
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import Enum, StrEnum
from typing import Any

from pydantic import BaseModel

from ..errors import CharterError, Conflict, InvalidInput

__all__ = [
    "DEFAULT_RETENTION",
    "MAX_KEY_LENGTH",
    "IdempotencyKeyInProgress",
    "IdempotencyKeyInvalid",
    "IdempotencyKeyMissing",
    "IdempotencyKeyReused",
    "IdempotencyMode",
    "ReplayedError",
    "fingerprint",
    "validate_key",
]

DEFAULT_RETENTION = timedelta(hours=24)
MAX_KEY_LENGTH = 255


class IdempotencyMode(StrEnum):
    REQUIRED = "required"
    OPTIONAL = "optional"
    NONE = "none"


class IdempotencyKeyMissing(InvalidInput):
    code = "idempotency_key_missing"
    status = 400
    title = "Idempotency-Key required"


class IdempotencyKeyInvalid(InvalidInput):
    code = "idempotency_key_invalid"
    status = 400
    title = "Invalid Idempotency-Key"


class IdempotencyKeyUnsupported(InvalidInput):
    """A key sent to an action declared ``idempotency="none"``: a retry would run it again."""

    code = "idempotency_key_unsupported"
    status = 400
    title = "This action takes no Idempotency-Key"


class IdempotencyKeyReused(CharterError):
    code = "idempotency_key_reused"
    status = 422
    title = "Idempotency-Key reused with a different request"


class IdempotencyKeyInProgress(Conflict):
    code = "idempotency_key_in_progress"
    status = 409
    title = "A request with this Idempotency-Key is in progress"

    def __init__(self, message: str | None = None, *, retry_after: int = 1, **attrs: Any) -> None:
        super().__init__(message, **attrs)
        self.headers["Retry-After"] = str(retry_after)


class ReplayedError(CharterError):
    """A stored domain error, replayed: same code, status and message as the original."""

    replayed = True

    def __init__(self, stored: dict[str, Any]) -> None:
        super().__init__(str(stored.get("message", "")), **dict(stored.get("attrs") or {}))
        self.code = str(stored.get("code", "domain_error"))  # type: ignore[misc]
        self.status = int(stored.get("status", 409))  # type: ignore[misc]
        self.title = str(stored.get("title", "The request cannot be carried out"))  # type: ignore[misc]
        self.headers["Idempotent-Replayed"] = "true"


def validate_key(key: str | None) -> str | None:
    """Return the key if well-formed (1-255 printable ASCII), ``None`` if absent; else raise."""
    if key is None:
        return None
    if not isinstance(key, str) or not 1 <= len(key) <= MAX_KEY_LENGTH:
        raise IdempotencyKeyInvalid("An Idempotency-Key is 1 to 255 printable ASCII characters.")
    if not (key.isascii() and key.isprintable()):  # printable ASCII: " " to "~"
        raise IdempotencyKeyInvalid(
            "An Idempotency-Key may only contain printable ASCII characters (no control "
            "characters, no non-ASCII)."
        )
    return key


def fingerprint(action: str, target: Any, data: BaseModel) -> str:
    """Hash of what makes a request *this* request: action, target, canonical validated input."""
    canonical = json.dumps(
        [action, None if target is None else str(target), _canonical(data.model_dump())],
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _canonical(value: Any) -> Any:
    """Equal values, equal forms: ``Decimal("5")`` and ``Decimal("5.00")`` are one request."""
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [_canonical(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, set | frozenset) else items
    if isinstance(value, Decimal):
        return format(value.normalize(), "f") if value.is_finite() else str(value)
    if isinstance(value, datetime):
        return (value.astimezone(UTC) if value.tzinfo else value).isoformat()
    if isinstance(value, Enum):
        return _canonical(value.value)
    return value
