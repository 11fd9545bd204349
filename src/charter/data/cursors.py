"""Opaque keyset cursors: encrypted, authenticated, bound to who asked what, and short-lived.

A list page's ``next`` is the position after its last row — the sort value
and the id of that row (AIP-158's keyset ``page_token``) — sealed with
AES-256-GCM (an AEAD: NIST SP 800-38D), so a client can neither read it (it
is not base64 JSON) nor change it (a flipped bit fails the tag). The
*associated data* the tag covers, and which the cursor itself does not carry,
is what the cursor is for: the tenant, the subject and the real actor, the
action, the filter and the sort. A cursor presented by anyone else, for
another list, or with another filter fails exactly as a forged one does:
**400** ``invalid_cursor``. It expires (:data:`DEFAULT_TTL`, three days), and
it grants nothing: the page it opens is selected by the action's policy,
compiled to SQL, for the actor presenting it, as every page is.

Keys rotate like the audit keys: an ordered mapping of key id to secret,
newest first. New cursors are sealed with the newest; a cursor names its key
by a 4-byte tag, so older keys still open the cursors they sealed until they
are dropped. Each secret is stretched with HKDF-SHA256 (RFC 5869) under a
label of its own, so a cursor key derived from an audit key is not the audit
key (see :meth:`CursorSealer.derived`).

Token layout (base64url, no padding)::

    version (1) | key tag (4) | nonce (12) | ciphertext + GCM tag (16)

The plaintext is compact UTF-8 JSON ``{"k": [<sort value>, <id>], "e": <expiry, unix s>}``
with each value tagged by its type (``["i", 7]``, ``["d", "12.50"]``,
``["t", "2026-01-01T00:00:00+00:00"]``, an enum member by its name ``["e", "RED"]``,
which is what SQLAlchemy stores), so a Decimal stays a Decimal. Text is not
escaped beyond what JSON requires, so a sort value of
:data:`MAX_SORT_TEXT` characters of any kind — an emoji is 4 bytes, a control
character 6 — always fits :data:`MAX_CURSOR`, which is computed from that
worst case.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import ConfigurationError, InvalidCursor, InvalidPage

__all__ = [
    "DEFAULT_TTL",
    "DEVELOPMENT_CURSOR_KEY",
    "MAX_CURSOR",
    "MAX_SORT_TEXT",
    "CursorBinding",
    "CursorSealer",
]

#: How long a cursor opens its next page (AIP-158 leaves it to the service; three days).
DEFAULT_TTL: Final = timedelta(days=3)
#: Used only when ``development=True`` and no cursor keys are given.
DEVELOPMENT_CURSOR_KEY: Final = "charter-development-cursor-key-not-secret"
#: The longest text a position may hold (characters), a sort value or an id: a
#: longer text column is not a sort key (``lists``).
MAX_SORT_TEXT: Final = 256

_VERSION: Final = b"\x01"
_TAG_BYTES: Final = 4
_NONCE_BYTES: Final = 12
_HEADER: Final = 1 + _TAG_BYTES + _NONCE_BYTES
_GCM_TAG: Final = 16
_LABEL: Final = b"charter page cursor v1"


def _dumps(doc: Any) -> bytes:
    """Compact JSON in UTF-8: a character takes 1 to 4 bytes, or 6 where JSON escapes it."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8", "surrogatepass"
    )


#: JSON's longest encoding of one character: a control character as ``\u001f``.
_WORST_CHAR: Final = 6
#: The longest plaintext: two texts of MAX_SORT_TEXT worst-case characters, the longest expiry.
_MAX_PLAIN: Final = len(_dumps({"k": [["s", ""], ["s", ""]], "e": 10**12})) + (
    2 * MAX_SORT_TEXT * _WORST_CHAR
)
#: The longest cursor accepted (characters): anything longer is refused unread. Every
#: position of a sort value and an id of at most MAX_SORT_TEXT characters fits.
MAX_CURSOR: Final = math.ceil((_HEADER + _MAX_PLAIN + _GCM_TAG) / 3) * 4


@dataclass(frozen=True, slots=True)
class CursorBinding:
    """What a cursor is for: sealed as AES-GCM associated data, never carried in the token."""

    tenant: str | None
    subject: str
    real_actor: str
    action: str
    filter: tuple[tuple[str, Any], ...]
    sort: str

    def associated_data(self) -> bytes:
        filters = [[name, _tagged(value)] for name, value in self.filter]
        doc = [self.tenant, self.subject, self.real_actor, self.action, filters, self.sort]
        return _dumps(doc)


class CursorSealer:
    """Seals and opens page cursors with an ordered key ring (newest first).

    ``keys``: key id → secret (at least 16 bytes of it); ``ttl``: how long a
    cursor is good for; ``clock``: an aware-UTC ``datetime`` source (tests
    inject a fake one).
    """

    def __init__(
        self,
        keys: Mapping[str, str | bytes],
        *,
        ttl: timedelta = DEFAULT_TTL,
        clock: Any = None,
    ) -> None:
        if not keys:
            raise ConfigurationError("cursor keys: give at least one key (newest first)")
        if ttl <= timedelta(0):
            raise ConfigurationError("cursor ttl must be positive")
        ring: list[tuple[bytes, AESGCM]] = []
        for key_id, secret in keys.items():
            raw = secret.encode() if isinstance(secret, str) else bytes(secret)
            if len(raw) < 16:
                raise ConfigurationError(f"cursor key {key_id!r} must be at least 16 bytes")
            key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_LABEL).derive(raw)
            tag = hmac.new(key, b"key tag", hashlib.sha256).digest()[:_TAG_BYTES]
            ring.append((tag, AESGCM(key)))
        self._ring = ring
        self.ttl = ttl
        self._clock = clock or (lambda: datetime.now(UTC))

    @classmethod
    def derived(
        cls, secrets: Mapping[str, str | bytes], *, ttl: timedelta = DEFAULT_TTL, clock: Any = None
    ) -> CursorSealer:
        """Cursor keys derived from other secrets (the audit keys), in their order.

        HKDF under the cursor label: knowing a cursor key tells nothing of the
        secret it came from, and rotating those secrets rotates the cursor keys.
        """
        labelled = {
            key_id: b"charter-cursor:" + (s.encode() if isinstance(s, str) else bytes(s))
            for key_id, s in secrets.items()
        }
        return cls(labelled, ttl=ttl, clock=clock)

    def __repr__(self) -> str:
        return f"<CursorSealer {len(self._ring)} keys, ttl={self.ttl}>"  # never the keys

    def seal(self, binding: CursorBinding, position: Sequence[Any]) -> str:
        """The cursor of ``position`` (the last row's sort value and id) for ``binding``."""
        expires = int((self._clock() + self.ttl).timestamp())
        body = {"k": [_tagged(v) for v in position], "e": expires}
        plain = _dumps(body)
        if len(plain) > _MAX_PLAIN:  # a Decimal of hundreds of digits, a very long text id
            raise InvalidPage(
                "sort: the records' values are too long to page by; sort by another field",
                parameter="sort",
            )
        tag, aead = self._ring[0]
        nonce = os.urandom(_NONCE_BYTES)
        sealed = aead.encrypt(nonce, plain, binding.associated_data())
        return base64.urlsafe_b64encode(_VERSION + tag + nonce + sealed).rstrip(b"=").decode()

    def open(self, token: object, binding: CursorBinding) -> list[Any]:
        """The position sealed in ``token``, if it was issued for ``binding`` and is not expired.

        Anything else — not a string, too long, not base64url, another version,
        an unknown key, a flipped bit, another actor, action, filter or sort —
        raises :class:`~charter.errors.InvalidCursor` (``reason="invalid"``);
        an authentic cursor past its expiry, ``reason="expired"``.
        """
        raw = _decode(token)
        tag, nonce, sealed = raw[1 : 1 + _TAG_BYTES], raw[1 + _TAG_BYTES : _HEADER], raw[_HEADER:]
        for key_tag, aead in self._ring:
            if hmac.compare_digest(key_tag, tag):
                try:
                    plain = aead.decrypt(nonce, sealed, binding.associated_data())
                except InvalidTag:
                    break
                return self._position(plain)
        raise _invalid()

    def _position(self, plain: bytes) -> list[Any]:
        try:
            body = json.loads(plain.decode("utf-8", "surrogatepass"))
            expires, position = body["e"], [_untagged(v) for v in body["k"]]
        except (ValueError, KeyError, TypeError) as exc:  # pragma: no cover - we sealed it
            raise _invalid() from exc
        if not isinstance(expires, int) or self._clock().timestamp() >= expires:
            raise InvalidCursor(
                "the page cursor has expired: start again from the first page",
                parameter="after",
                reason="expired",
            )
        return position


def _decode(token: object) -> bytes:
    if not isinstance(token, str) or not token or len(token) > MAX_CURSOR or not token.isascii():
        raise _invalid()
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError) as exc:
        raise _invalid() from exc
    if len(raw) < _HEADER + _GCM_TAG or raw[:1] != _VERSION:
        raise _invalid()
    return raw


def _invalid() -> InvalidCursor:
    return InvalidCursor(
        "the page cursor is not valid for this list: pass the 'next' value of the "
        "previous page of the same list, as the same user",
        parameter="after",
        reason="invalid",
    )


def _tagged(value: Any) -> list[Any]:
    """``value`` as ``[type tag, JSON value]``: the type survives the round trip."""
    if isinstance(value, bool):
        return ["b", value]
    if isinstance(value, int):
        return ["i", value]
    if isinstance(value, str):
        return ["s", value]
    if isinstance(value, Decimal):
        return ["d", str(value)]
    if isinstance(value, float):
        return ["f", repr(value)]
    if isinstance(value, datetime):
        return ["t", value.isoformat()]
    if isinstance(value, date):
        return ["D", value.isoformat()]
    if value is None:
        return ["n", None]
    if isinstance(value, enum.Enum):
        return ["e", value.name]  # what SQLAlchemy's Enum stores, and binds back
    raise InvalidPage(f"cannot page by a value of type {type(value).__name__}", parameter="sort")


def _untagged(item: Any) -> Any:
    kind, value = item
    try:
        if kind in ("b", "i", "s", "n", "e"):
            return value
        if kind == "d":
            return Decimal(value)
        if kind == "f":
            return float(value)
        if kind == "t":
            return datetime.fromisoformat(value)
        if kind == "D":
            return date.fromisoformat(value)
    except (ValueError, InvalidOperation) as exc:  # pragma: no cover - we sealed it
        raise _invalid() from exc
    raise _invalid()  # pragma: no cover - we sealed it
