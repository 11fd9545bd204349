"""Verify, and produce, signed webhooks: Standard Webhooks and Stripe-style signatures.

Only the raw body bytes are verified, never a re-serialized JSON document. The
checks run cheapest first, so that a flood of junk costs no HMAC work:

1. the body size (``max_body_bytes``) and header sizes (``max_header_length``);
2. the headers are present and well formed (the timestamp is an integer);
3. the timestamp is within ``tolerance`` of the injected clock, in *both*
   directions (a stale timestamp is refused even with a never-seen id);
4. one of the header's signatures matches one of the active secrets
   (ordered key rotation; every comparison uses :func:`hmac.compare_digest`).

Replay protection is the caller's last step, inside the transaction that acts
on the event: :func:`claim_once` asks a :class:`ReplayStore` to claim the id.

Standard Webhooks (https://www.standardwebhooks.com, spec 1.0.0)::

    webhook-id: msg_p5jXN8AQM9LWM0D4loKWxJek
    webhook-timestamp: 1614265330
    webhook-signature: v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")> [v1,<...> ...]

where ``key`` is the base64 part of a ``whsec_`` secret. Stripe-style::

    Stripe-Signature: t=1614265330,v1=<hex HMAC-SHA256(secret, "{t}.{body}")>[,v1=...]

where the key is the whole secret string, prefix included, as UTF-8.

Errors (all :class:`WebhookError`, a :class:`~charter.errors.CharterError`)::

    WebhookError                   400 webhook_error
    ├── WebhookHeadersMissing      400 webhook_headers_missing
    ├── WebhookMalformed           400 webhook_malformed         (bad timestamp/id, header too long)
    ├── WebhookPayloadTooLarge     413 payload_too_large         (also a PayloadTooLarge)
    ├── WebhookTimestampStale      401 webhook_timestamp_stale   (too old *or* too far ahead)
    ├── WebhookSignatureInvalid    401 webhook_signature_invalid (no match, bad base64, no v1)
    ├── WebhookReplayed            409 webhook_replayed          (raised by claim_once)
    └── WebhookRetryLater          503 webhook_retry_later       (authentic; a transient failure)

A bad secret given at construction is a :class:`~charter.errors.ConfigurationError`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets as _secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal, Protocol

from .errors import CharterError, ConfigurationError, PayloadTooLarge

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_HEADER_LENGTH",
    "DEFAULT_TOLERANCE",
    "Clock",
    "ReplayStore",
    "StandardWebhookSigner",
    "StandardWebhookVerifier",
    "StripeSignatureSigner",
    "StripeSignatureVerifier",
    "VerifiedWebhook",
    "WebhookError",
    "WebhookHeadersMissing",
    "WebhookMalformed",
    "WebhookPayloadTooLarge",
    "WebhookReplayed",
    "WebhookRetryLater",
    "WebhookSignatureInvalid",
    "WebhookTimestampStale",
    "WebhookVerifier",
    "claim_once",
    "generate_secret",
    "utc_now",
]

DEFAULT_TOLERANCE = timedelta(minutes=5)
DEFAULT_MAX_BODY_BYTES = 256 * 1024
DEFAULT_MAX_HEADER_LENGTH = 4096
MAX_ID_LENGTH = 256

SECRET_PREFIX = "whsec_"  # noqa: S105 (a prefix, not a secret)

Clock = Callable[[], datetime]
"""Returns the current time as an aware datetime (any zone; compared as UTC)."""

# Digits only: int() would also take "+1", " 1", "1_000" and non-ASCII digits.
# 16 digits bounds the work and keeps datetime conversion far from overflow.
_TIMESTAMP = re.compile(r"[0-9]{1,16}")
# Printable ASCII without spaces: the id is part of the signed content.
_MSG_ID = re.compile(rf"[\x21-\x7e]{{1,{MAX_ID_LENGTH}}}")
_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")


def utc_now() -> datetime:
    """The default clock: the current time in UTC."""
    return datetime.now(UTC)


def generate_secret(nbytes: int = 32) -> str:
    """A fresh Standard Webhooks secret, ``whsec_`` + base64 of ``nbytes`` random bytes."""
    return SECRET_PREFIX + base64.b64encode(_secrets.token_bytes(nbytes)).decode("ascii")


# --------------------------------------------------------------------------- errors


class WebhookError(CharterError):
    """A webhook was refused; nothing in it should be acted upon."""

    code = "webhook_error"
    status = 400
    title = "Invalid webhook"


class WebhookHeadersMissing(WebhookError):
    code = "webhook_headers_missing"
    status = 400
    title = "Webhook signature headers are missing"


class WebhookMalformed(WebhookError):
    code = "webhook_malformed"
    status = 400
    title = "Webhook headers are malformed"


class WebhookPayloadTooLarge(WebhookError, PayloadTooLarge):
    """The body exceeds ``max_body_bytes``; refused before any hashing."""

    code = "payload_too_large"
    status = 413
    title = "Webhook payload too large"


class WebhookTimestampStale(WebhookError):
    """The timestamp is outside the tolerance, in the past or in the future."""

    code = "webhook_timestamp_stale"
    status = 401
    title = "Webhook timestamp outside the tolerance"


class WebhookSignatureInvalid(WebhookError):
    code = "webhook_signature_invalid"
    status = 401
    title = "Webhook signature does not match"


class WebhookReplayed(WebhookError):
    """This webhook id was already processed.

    Senders retry on any non-2xx answer, so an HTTP adapter usually answers a
    replay with 200 (the event *was* handled) rather than with this status.
    """

    code = "webhook_replayed"
    status = 409
    title = "Webhook already processed"


class WebhookRetryLater(WebhookError):
    """An authentic webhook met a transient failure; nothing was recorded, so send it again.

    The webhook channel answers it for a cause the same delivery may not meet
    later (a key still in progress, a conflict that persisted): ``cause`` is that
    error's code, and ``Retry-After`` says when. Senders retry on a 5xx.
    """

    code = "webhook_retry_later"
    status = 503
    title = "Webhook not processed yet; retry later"
    retryable = True

    @classmethod
    def of(cls, error: CharterError) -> WebhookRetryLater:
        """Wrap a transient ``error`` (its message, its code as ``cause``, its ``Retry-After``)."""
        wrapped = cls(error.message, cause=error.code)
        wrapped.headers["Retry-After"] = error.headers.get("Retry-After", "1")
        return wrapped


# --------------------------------------------------------------------------- keys


class _Key:
    """An HMAC-SHA256 key whose ``repr`` never shows the secret."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        self._key = key

    def digest(self, content: bytes) -> bytes:
        return hmac.new(self._key, content, hashlib.sha256).digest()

    def hexdigest(self, content: bytes) -> bytes:
        return hmac.new(self._key, content, hashlib.sha256).hexdigest().encode("ascii")

    def __repr__(self) -> str:
        return "<redacted>"

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("webhook secrets cannot be pickled")


def _standard_key(secret: str) -> _Key:
    """Decode a ``whsec_`` secret (prefix optional, padding optional) into a key."""
    if not isinstance(secret, str):
        raise ConfigurationError("a webhook secret must be a str")
    encoded = secret.removeprefix(SECRET_PREFIX)
    if not encoded:
        raise ConfigurationError("the webhook secret is empty")
    # Secrets are often shared without their base64 padding; add it back.
    padded = encoded + "=" * (-len(encoded) % 4)
    try:
        key = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        # `from None`: the decoder's message is harmless, but keep secrets out of tracebacks.
        raise ConfigurationError("the webhook secret is not valid base64") from None
    if not key:
        raise ConfigurationError("the webhook secret is empty")
    return _Key(key)


def _stripe_key(secret: str) -> _Key:
    if not isinstance(secret, str):
        raise ConfigurationError("a webhook secret must be a str")
    if not secret.removeprefix(SECRET_PREFIX):
        raise ConfigurationError("the webhook secret is empty")
    return _Key(secret.encode("utf-8"))


def _keys(secrets: str | Sequence[str], decode: Callable[[str], _Key]) -> tuple[_Key, ...]:
    # A lone str is a Sequence[str] too: accept it as one secret, not as its characters.
    listed = [secrets] if isinstance(secrets, str) else list(secrets)
    if not listed:
        raise ConfigurationError("at least one webhook secret is required")
    return tuple(decode(s) for s in listed)


def _epoch(timestamp: int | datetime) -> int:
    if isinstance(timestamp, datetime):
        if timestamp.tzinfo is None:
            raise ValueError("timestamp must be an aware datetime")
        return int(timestamp.timestamp())
    if isinstance(timestamp, bool) or not isinstance(timestamp, int) or timestamp < 0:
        raise ValueError("timestamp must be a non-negative int of epoch seconds")
    return timestamp


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class VerifiedWebhook:
    """A webhook whose signature and timestamp were checked.

    ``id`` is the ``webhook-id`` header (``None`` for Stripe-style webhooks,
    whose event id is inside the body). ``expires_at`` is when the timestamp
    check starts refusing this message on its own: a :class:`ReplayStore` need
    not remember the id after it.
    """

    id: str | None
    timestamp: datetime
    body: bytes = field(repr=False)
    scheme: Literal["standard-webhooks", "stripe"]
    expires_at: datetime


class ReplayStore(Protocol):
    """Remembers which webhook ids were processed (implemented over the database)."""

    def claim(self, scope: str, webhook_id: str, *, expires_at: datetime) -> bool:
        """Atomically record ``webhook_id`` for ``scope``; ``False`` if it was already recorded.

        ``scope`` separates senders (one partner's ids cannot shadow another's).
        The claim should live in the same transaction as the effect, so that a
        failed handler releases it and the sender's retry is processed. Entries
        may be purged after ``expires_at``.
        """
        ...


def claim_once(
    store: ReplayStore,
    webhook: VerifiedWebhook,
    *,
    scope: str,
    webhook_id: str | None = None,
) -> None:
    """Claim a verified webhook's id in ``store``; raise :class:`WebhookReplayed` if seen before.

    ``webhook_id`` overrides ``webhook.id`` (Stripe-style: pass the event id
    from the body). Call it only after verification: a stale or forged message
    must never reach the store.
    """
    msg_id = webhook_id if webhook_id is not None else webhook.id
    if not msg_id:
        raise WebhookMalformed("the webhook has no id to protect against replay")
    if not store.claim(scope, msg_id, expires_at=webhook.expires_at):
        raise WebhookReplayed(f"webhook {msg_id!r} was already processed", webhook_id=msg_id)


# --------------------------------------------------------------------------- verifiers


class WebhookVerifier:
    """What both verifiers share: limits, clock, header lookup, and the ``is_valid`` twin."""

    _names: tuple[str, ...] = ()
    _decode: Callable[[str], _Key]  # how a secret string becomes a key (per scheme)

    def __init__(
        self,
        secrets: str | Sequence[str],
        *,
        tolerance: timedelta = DEFAULT_TOLERANCE,
        clock: Clock = utc_now,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_header_length: int = DEFAULT_MAX_HEADER_LENGTH,
    ) -> None:
        keys = _keys(secrets, type(self)._decode)
        if not isinstance(tolerance, timedelta) or tolerance <= timedelta(0):
            raise ConfigurationError("tolerance must be a positive timedelta")
        if max_body_bytes <= 0 or max_header_length <= 0:
            raise ConfigurationError("size limits must be positive")
        self._keys = keys
        self.tolerance = tolerance
        self._clock = clock
        self.max_body_bytes = max_body_bytes
        self.max_header_length = max_header_length

    @property
    def header_names(self) -> tuple[str, ...]:
        """The header fields this scheme reads (lowercase), all required: for API documents."""
        return tuple(self._names)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(secrets=<{len(self._keys)} redacted>, "
            f"tolerance={self.tolerance!r}, max_body_bytes={self.max_body_bytes})"
        )

    def verify(self, headers: Mapping[str, str], body: bytes) -> VerifiedWebhook:
        """Return the verified webhook, or raise a :class:`WebhookError` subclass."""
        raise NotImplementedError

    def is_valid(self, headers: Mapping[str, str], body: bytes) -> bool:
        """Boolean twin of :meth:`verify`."""
        try:
            self.verify(headers, body)
        except WebhookError:
            return False
        return True

    def _check_body(self, body: bytes) -> None:
        if not isinstance(body, bytes | bytearray | memoryview):
            raise TypeError("verify the raw request body as bytes, not a decoded or parsed value")
        if len(body) > self.max_body_bytes:
            raise WebhookPayloadTooLarge(
                f"the webhook body exceeds {self.max_body_bytes} bytes",
                limit=self.max_body_bytes,
            )

    def _lookup(self, headers: Mapping[str, str]) -> dict[str, str]:
        """The wanted headers, matched case-insensitively (RFC 9110 section 5.1)."""
        found: dict[str, str] = {}
        for name, value in headers.items():
            key = name.lower() if isinstance(name, str) else None
            if key not in self._names:
                continue
            if not isinstance(value, str):
                raise WebhookMalformed(f"header {key} is not text", header=key)
            if len(value) > self.max_header_length:
                raise WebhookMalformed(f"header {key} is too long", header=key)
            if found.setdefault(key, value) != value:
                raise WebhookMalformed(f"header {key} appears more than once", header=key)
        missing = [n for n in self._names if not found.get(n)]
        if missing:
            raise WebhookHeadersMissing(
                f"missing webhook header(s): {', '.join(missing)}",
                missing=missing,
            )
        return found

    def _check_timestamp(self, raw: str) -> tuple[int, datetime, datetime]:
        if not _TIMESTAMP.fullmatch(raw):
            raise WebhookMalformed("the webhook timestamp is not an integer")
        timestamp = int(raw)
        now = self._clock()
        if not isinstance(now, datetime) or now.tzinfo is None:
            raise ConfigurationError("the webhook clock must return an aware datetime")
        # Both directions: an old message is a replay, one from the future
        # would stay valid (and replayable) for longer than the tolerance.
        if abs(now.timestamp() - timestamp) > self.tolerance.total_seconds():
            raise WebhookTimestampStale(
                "the webhook timestamp is outside the tolerance",
                tolerance_seconds=int(self.tolerance.total_seconds()),
            )
        at = datetime.fromtimestamp(timestamp, UTC)
        return timestamp, at, at + self.tolerance

    @staticmethod
    def _any_match(expected: Iterable[bytes], provided: Sequence[bytes]) -> bool:
        # Compare against everything (no early exit) so timing does not reveal
        # which secret or which signature matched.
        matched = False
        for digest in expected:
            for candidate in provided:
                matched |= hmac.compare_digest(digest, candidate)
        return matched


class StandardWebhookVerifier(WebhookVerifier):
    """Verify Standard Webhooks signatures (``webhook-id/-timestamp/-signature``).

    ``secrets`` are ``whsec_`` secrets (prefix and base64 padding optional),
    ordered newest first for rotation: a message signed with any of them passes.
    ``clock`` returns an aware datetime.
    """

    _names = ("webhook-id", "webhook-timestamp", "webhook-signature")

    _decode = staticmethod(_standard_key)

    def verify(self, headers: Mapping[str, str], body: bytes) -> VerifiedWebhook:
        """Return the verified webhook, or raise a :class:`WebhookError` subclass."""
        self._check_body(body)
        found = self._lookup(headers)
        msg_id = found["webhook-id"]
        if not _MSG_ID.fullmatch(msg_id):
            raise WebhookMalformed("the webhook id must be 1-256 printable ASCII characters")
        timestamp, at, expires_at = self._check_timestamp(found["webhook-timestamp"])

        provided: list[bytes] = []
        # Space-delimited "version,signature" pairs; versions other than v1
        # (v1a is asymmetric) and undecodable entries are simply not matches.
        for entry in found["webhook-signature"].split():
            version, comma, value = entry.partition(",")
            if version != "v1" or not comma or not value:
                continue
            try:
                provided.append(base64.b64decode(value, validate=True))
            except (binascii.Error, ValueError):
                continue
        if not provided:
            raise WebhookSignatureInvalid("the webhook carries no v1 signature")
        content = _standard_content(msg_id, timestamp, body)
        if not self._any_match((k.digest(content) for k in self._keys), provided):
            raise WebhookSignatureInvalid("no webhook signature matches")
        return VerifiedWebhook(
            id=msg_id,
            timestamp=at,
            body=bytes(body),
            scheme="standard-webhooks",
            expires_at=expires_at,
        )


class StripeSignatureVerifier(WebhookVerifier):
    """Verify ``Stripe-Signature: t=...,v1=...`` headers.

    The HMAC key is the whole secret string (``whsec_...`` included) as UTF-8.
    Several secrets may be active (rotation). The tolerance applies in both
    directions (Stripe's own library only refuses old timestamps).
    """

    _names = ("stripe-signature",)

    _decode = staticmethod(_stripe_key)

    def verify(self, headers: Mapping[str, str], body: bytes) -> VerifiedWebhook:
        """Return the verified webhook (``id`` is ``None``), or raise a :class:`WebhookError`."""
        self._check_body(body)
        header = self._lookup(headers)["stripe-signature"]
        timestamps: list[str] = []
        provided: list[bytes] = []
        for item in header.split(","):
            key, equals, value = item.strip().partition("=")
            if not equals:
                continue
            if key == "t":
                timestamps.append(value)
            elif key == "v1" and _HEX_SHA256.fullmatch(value):
                provided.append(value.encode("ascii"))
        if len(timestamps) != 1:
            raise WebhookMalformed("the Stripe-Signature header needs exactly one t=")
        timestamp, at, expires_at = self._check_timestamp(timestamps[0])
        if not provided:
            raise WebhookSignatureInvalid("the webhook carries no v1 signature")
        content = f"{timestamp}.".encode("ascii") + body
        if not self._any_match((k.hexdigest(content) for k in self._keys), provided):
            raise WebhookSignatureInvalid("no webhook signature matches")
        return VerifiedWebhook(
            id=None,
            timestamp=at,
            body=bytes(body),
            scheme="stripe",
            expires_at=expires_at,
        )


# --------------------------------------------------------------------------- signers


def _standard_content(msg_id: str, timestamp: int, body: bytes) -> bytes:
    return f"{msg_id}.{timestamp}.".encode("ascii") + bytes(body)


class StandardWebhookSigner:
    """Produce Standard Webhooks headers (for senders, tests and the demo provider)."""

    __slots__ = ("_key",)

    def __init__(self, secret: str) -> None:
        self._key = _standard_key(secret)

    def __repr__(self) -> str:
        return "StandardWebhookSigner(secret=<redacted>)"

    def signature(self, msg_id: str, timestamp: int | datetime, body: bytes) -> str:
        """The ``v1,<base64>`` signature of one message."""
        if not isinstance(msg_id, str) or not _MSG_ID.fullmatch(msg_id):
            raise ValueError("msg_id must be 1-256 printable ASCII characters")
        digest = self._key.digest(_standard_content(msg_id, _epoch(timestamp), body))
        return "v1," + base64.b64encode(digest).decode("ascii")

    def sign(self, msg_id: str, timestamp: int | datetime, body: bytes) -> dict[str, str]:
        """The three ``webhook-*`` headers for ``body``."""
        return {
            "webhook-id": msg_id,
            "webhook-timestamp": str(_epoch(timestamp)),
            "webhook-signature": self.signature(msg_id, timestamp, body),
        }


class StripeSignatureSigner:
    """Produce a ``Stripe-Signature`` header (for tests)."""

    __slots__ = ("_key",)

    def __init__(self, secret: str) -> None:
        self._key = _stripe_key(secret)

    def __repr__(self) -> str:
        return "StripeSignatureSigner(secret=<redacted>)"

    def sign(self, timestamp: int | datetime, body: bytes) -> dict[str, str]:
        """The ``Stripe-Signature`` header for ``body``."""
        epoch = _epoch(timestamp)
        digest = self._key.hexdigest(f"{epoch}.".encode("ascii") + bytes(body)).decode("ascii")
        return {"Stripe-Signature": f"t={epoch},v1={digest}"}
