"""Idempotency keys: the same request runs once, however often and however concurrently it arrives.

Semantics follow draft-ietf-httpapi-idempotency-key-header and Stripe's behaviour:

* a key is 1-255 printable ASCII characters, scoped to (tenant, subject, key):
  another user's identical key is an unrelated request, and rotating an access
  token does not change the scope;
* the **fingerprint** is the action, the target and the canonical form of the
  *validated* input — every field's exact value, excluded fields and secrets
  included — keyed with a server-side secret (:func:`fingerprint_key`); the
  same key with another fingerprint is refused (422) and the stored record is
  left alone;
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

import functools
import hashlib
import hmac
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from enum import Enum, StrEnum
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import BaseModel, Secret, SecretBytes, SecretStr

from ..errors import CharterError, Conflict, InvalidInput

if TYPE_CHECKING:
    from ..audit.trail import AuditKeyring

__all__ = [
    "DEFAULT_RETENTION",
    "ITEM_SEPARATOR",
    "MAX_KEY_LENGTH",
    "IdempotencyKeyInProgress",
    "IdempotencyKeyInvalid",
    "IdempotencyKeyMissing",
    "IdempotencyKeyReused",
    "IdempotencyMode",
    "ReplayedError",
    "fingerprint",
    "fingerprint_key",
    "item_key",
    "validate_key",
]

DEFAULT_RETENTION = timedelta(hours=24)
MAX_KEY_LENGTH = 255
#: Reserved: the key of a batch's item *i* is ``<batch key>#<i>`` (:func:`item_key`), so a
#: client's key may not contain it, or it could name (replay, or block) another batch's item.
ITEM_SEPARATOR = "#"


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


def validate_key(key: str | None, *, derived: bool = False) -> str | None:
    """Return the key if well-formed (1-255 printable ASCII, no ``#``), ``None`` if absent; else
    raise. ``derived=True``: a key Charter derived itself (:func:`item_key`), which holds ``#``."""
    if key is None:
        return None
    if not isinstance(key, str) or not 1 <= len(key) <= MAX_KEY_LENGTH:
        raise IdempotencyKeyInvalid("An Idempotency-Key is 1 to 255 printable ASCII characters.")
    if not (key.isascii() and key.isprintable()):  # printable ASCII: " " to "~"
        raise IdempotencyKeyInvalid(
            "An Idempotency-Key may only contain printable ASCII characters (no control "
            "characters, no non-ASCII)."
        )
    if not derived and ITEM_SEPARATOR in key:
        raise IdempotencyKeyInvalid(
            f"An Idempotency-Key may not contain {ITEM_SEPARATOR!r}: it is reserved for the keys "
            f"Charter derives for the items of a batch (<key>{ITEM_SEPARATOR}<position>)."
        )
    return key


def item_key(batch_key: str, position: int) -> str:
    """The key of a per-item batch's item: a client cannot send it (``#`` is reserved)."""
    return f"{batch_key}{ITEM_SEPARATOR}{position}"


_FINGERPRINT_LABEL = b"charter idempotency fingerprint v1"


@functools.lru_cache(maxsize=16)
def fingerprint_key(keyring: AuditKeyring) -> bytes:
    """The fingerprints' HMAC key, derived from the *oldest* audit key under its own label.

    Keyed, so that a stored fingerprint of a low-entropy secret (a PIN) in the
    input cannot be brute-forced from the database. Derived as the cursor keys
    are (HKDF-SHA256, RFC 5869, under a label of its own), over the audit key's
    MAC of the label: every message the audit key otherwise signs is JSON, so
    this MAC is no entry's, checkpoint's or anchor's, and knowing the derived key
    tells nothing of the audit key.

    Rotation: the oldest key, not the newest, so that adding a key (the usual
    rotation, newest first) changes no fingerprint, and a retry that straddles
    the rotation still matches its stored request. Dropping the oldest key
    changes every fingerprint: a retry of a request stored before that, still
    within retention, is refused 422 (never run twice). Audit keys are kept
    while old entries must verify, so that is rare; drop one only after the
    retention has passed since the last restart that still had it.
    """
    # The keyring lists its ids newest first.
    oldest = keyring.key_ids[-1]
    material = bytes.fromhex(keyring.mac(_FINGERPRINT_LABEL, oldest))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_FINGERPRINT_LABEL).derive(
        material
    )


def fingerprint(action: str, target: Any, data: BaseModel, *, key: bytes) -> str:
    """What makes a request *this* request, as HMAC-SHA256 under ``key``: the action, the
    target and every validated field's exact value (:func:`_canonical`), secrets included."""
    canonical = repr((action, None if target is None else str(target), _canonical(data)))
    message = canonical.encode("utf-8", "backslashreplace")
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def _canonical(value: Any) -> Any:
    """Equal values, equal forms; distinct values, distinct forms (compared by ``repr``).

    The validated model's attributes, not ``model_dump()``: a field declared
    ``exclude=True`` and a serializer that rounds would make two requests one.
    A secret counts by its value. ``Decimal("5")`` and ``Decimal("5.00")`` are
    one amount; two aware datetimes at the same instant are one time.
    """
    if value is None or type(value) in _PLAIN:
        return value  # repr tells 1 from True from "1", and is exact for floats
    if isinstance(value, Enum):
        return _canonical(value.value)
    if isinstance(value, BaseModel):
        fields = [(name, _canonical(getattr(value, name))) for name in type(value).model_fields]
        extra = value.model_extra or {}
        fields += sorted(((str(k), _canonical(v)) for k, v in extra.items()), key=repr)
        return ("model", tuple(fields))
    if isinstance(value, Decimal):
        return ("decimal", _decimal(value))
    if isinstance(value, SecretStr | SecretBytes | Secret):
        return ("secret", _canonical(value.get_secret_value()))
    if isinstance(value, dict):
        pairs = ((_canonical(k), _canonical(v)) for k, v in value.items())
        return ("dict", tuple(sorted(pairs, key=repr)))
    if isinstance(value, list | tuple):
        return ("list", tuple(_canonical(v) for v in value))
    if isinstance(value, set | frozenset):
        return ("set", tuple(sorted((_canonical(v) for v in value), key=repr)))
    if isinstance(value, datetime):
        return ("datetime", (value.astimezone(UTC) if value.tzinfo else value).isoformat())
    if isinstance(value, date | time):
        return (type(value).__name__, value.isoformat())
    if isinstance(value, bool | int | float | str | bytes):  # a subclass: as its base type
        return ("plain", type(value).__mro__[-2].__name__, repr(value))
    return (type(value).__qualname__, str(value))


_PLAIN = frozenset({bool, int, float, str, bytes})


def _decimal(value: Decimal) -> str:
    """A Decimal's exact canonical form, without a context: it never rounds nor raises.

    ``normalize()`` rounds to the context's 28 digits (two amounts became one)
    and overflows on a large exponent (``1E+1000000``); the digits themselves,
    trailing zeros stripped into the exponent, do neither.
    """
    if not value.is_finite():
        return str(value)  # NaN, sNaN, Infinity, -Infinity
    sign, digits, exponent = value.as_tuple()
    text = "".join(map(str, digits))
    significant = text.rstrip("0")
    if not significant:
        return "0"  # 0, 0.00 and -0 are one amount
    exponent = int(exponent) + len(text) - len(significant)  # an int: the value is finite
    return f"{'-' if sign else ''}{significant}e{exponent}"
