"""The audit trail: append-only, written in the effect's transaction, tamper-evident.

Design (issue 2). Each entry is chained into a **writer stream**, not into one
global chain: a stream is checked out from a pool for the duration of one gate
transaction (like a database connection), so two concurrent actions never
share a stream and never wait on each other for the audit. Each entry stores
``(stream, seq, prev_hash, hash)`` where ``hash`` is an HMAC-SHA256, keyed with
an audit key that lives *outside* the database, over the entry's canonical
content, its stream position and the previous entry's hash. So:

* an attacker with write access to the database but not the key cannot forge
  or alter an entry (its MAC fails), cannot delete one in the middle of a
  stream (the next entry's ``prev_hash`` and ``seq`` no longer line up), and
  cannot reorder entries (the MAC covers the position);
* deleting the *tail* of a stream leaves a shorter but valid chain, which is
  why :func:`charter.audit_verify.checkpoint` periodically signs every stream's
  head (seq and hash), chaining checkpoints to each other; verification then
  reports any checkpointed entry that has gone. Entries written since the last
  checkpoint are protected against everything but tail truncation.

Why not a chain per record, serialized by the record's row lock? It would need
a read of the previous entry's hash in every transaction (a round trip), and
entries without a locked record (denials, creations, sensitive reads) would
need another lock. Streams cost one INSERT and no read: the head lives in the
writer's memory. When a commit's fate is unknown (the connection died during
COMMIT) the stream is abandoned, never reused, so memory and database never
disagree; an abandoned stream is simply a chain that ends.

The per-record history (``charter audit show``) is an indexed query on
``(resource_type, resource_id)``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import threading
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    insert,
    select,
)
from sqlalchemy.orm import Session
from sqlalchemy.types import JSON

from .errors import ConfigurationError
from .storage import metadata

__all__ = [
    "AuditEntry",
    "AuditKeyring",
    "AuditTrail",
    "audit_table",
    "checkpoint_table",
    "digest_input",
]

audit_table = Table(
    "charter_audit",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("stream", String(32), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Column("key_id", String(32), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("tenant", String(128), nullable=True),
    Column("subject", String(128), nullable=False),
    Column("subject_kind", String(16), nullable=False),
    Column("real_actor", String(128), nullable=True),
    Column("scopes", JSON, nullable=False),
    Column("channel", String(16), nullable=False),
    Column("action", String(128), nullable=False),
    Column("resource_type", String(64), nullable=True),
    Column("resource_id", String(128), nullable=True),
    Column("reason", Text, nullable=True),
    Column("decision", String(16), nullable=False),
    Column("rule", String(200), nullable=True),
    Column("outcome", String(64), nullable=False),
    Column("request_id", String(128), nullable=True),
    Column("idempotency_key", String(255), nullable=True),
    Column("replayed", Boolean, nullable=False, default=False),
    Column("state_before", String(64), nullable=True),
    Column("state_after", String(64), nullable=True),
    Column("input_digest", String(64), nullable=True),
    Column("detail", JSON, nullable=True),
    UniqueConstraint("stream", "seq", name="uq_charter_audit_stream_seq"),
    # The one query on the hot table is a record's history; every further index
    # would cost each audited call a little (gate_overhead measures it).
    Index("ix_charter_audit_resource", "resource_type", "resource_id", "id"),
)

checkpoint_table = Table(
    "charter_audit_checkpoints",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("heads", JSON, nullable=False),
    Column("prev_signature", String(64), nullable=False),
    Column("key_id", String(32), nullable=False),
    Column("signature", String(64), nullable=False),
)

#: The entry INSERT, built once: no RETURNING (nobody needs the new ids), and a
#: statement reused as is skips SQLAlchemy's cache-key walk on every call.
ENTRY_INSERT = insert(audit_table).inline()

# Content fields covered by each entry's MAC, in a fixed order (a format version
# prefixes them, so the format can evolve without invalidating old entries).
CONTENT_FIELDS: tuple[str, ...] = (
    "at",
    "tenant",
    "subject",
    "subject_kind",
    "real_actor",
    "scopes",
    "channel",
    "action",
    "resource_type",
    "resource_id",
    "reason",
    "decision",
    "rule",
    "outcome",
    "request_id",
    "idempotency_key",
    "replayed",
    "state_before",
    "state_after",
    "input_digest",
    "detail",
)
FORMAT = "charter-audit-v1"

_SECRET_NAME = re.compile(
    r"(pass(word|phrase)?|secret|token|api[_-]?key|private[_-]?key|card[_-]?number|cvc|cvv|pin|"
    r"authorization|credential)",
    re.IGNORECASE,
)
REDACTED = "[redacted]"


class AuditKeyring:
    """HMAC keys for the audit trail, by id; the newest signs, all verify.

    Rotation: add the new key first in ``keys`` (an ordered mapping of id to
    secret); entries keep the ``key_id`` they were written with. The keys must
    be kept outside the database (environment, secret manager): whoever holds
    them can forge history.
    """

    __slots__ = ("_current", "_keys")

    def __init__(self, keys: Mapping[str, str | bytes]) -> None:
        if not keys:
            raise ConfigurationError("the audit keyring needs at least one key")
        self._keys: dict[str, bytes] = {}
        for key_id, secret in keys.items():
            raw = secret.encode() if isinstance(secret, str) else bytes(secret)
            if len(raw) < 16:
                raise ConfigurationError(
                    f"audit key {key_id!r} is too short: use at least 16 random bytes"
                )
            if not key_id or len(key_id) > 32:
                raise ConfigurationError("audit key ids are 1-32 characters")
            self._keys[key_id] = raw
        self._current = next(iter(self._keys))

    def __repr__(self) -> str:
        return f"AuditKeyring(keys=[{', '.join(self._keys)}], secrets=<redacted>)"

    @property
    def current_id(self) -> str:
        return self._current

    def mac(self, message: bytes, key_id: str | None = None) -> str:
        key = self._keys[key_id or self._current]
        return hmac.new(key, message, hashlib.sha256).hexdigest()

    def check(self, message: bytes, key_id: str, mac: str) -> bool:
        key = self._keys.get(key_id)
        if key is None:
            return False
        expected = hmac.new(key, message, hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, mac)


def _redact(value: Any, name: str = "") -> Any:
    if name and _SECRET_NAME.search(name):
        return REDACTED
    if isinstance(value, Mapping):
        return {str(k): _redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v) for v in value]
    return value


_EMPTY_DIGEST = hashlib.sha256(b"{}").hexdigest()


def digest_input(data: BaseModel | Mapping[str, Any] | None) -> str | None:
    """SHA-256 of the canonical JSON of the input, with secret fields redacted.

    Fields typed ``SecretStr``/``SecretBytes`` are masked by Pydantic; fields
    whose *name* looks secret (password, token, api_key, card_number...) are
    replaced by ``[redacted]`` before hashing, so the digest cannot be used to
    confirm a guessed secret.
    """
    if data is None:
        return None
    if isinstance(data, BaseModel) and not type(data).model_fields:
        return _EMPTY_DIGEST  # actions without input: the same digest every time
    raw = data.model_dump(mode="json") if isinstance(data, BaseModel) else dict(data)
    canonical = json.dumps(_redact(raw), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _iso(at: datetime) -> str:
    if at.tzinfo is not None:
        at = at.astimezone(UTC).replace(tzinfo=None)
    return at.isoformat(timespec="microseconds")


def canonical_message(row: Mapping[str, Any]) -> bytes:
    """The bytes an entry's MAC covers: format, position, previous hash, content."""
    parts: list[Any] = [FORMAT, row["stream"], int(row["seq"]), row["prev_hash"]]
    for name in CONTENT_FIELDS:
        value = row.get(name)
        if name == "at":
            value = _iso(row["at"])
        elif name == "scopes":
            value = sorted(value or [])
        elif name == "replayed":
            value = bool(value)
        parts.append(value)
    return json.dumps(parts, separators=(",", ":"), sort_keys=True, default=str).encode()


@dataclass(slots=True)
class AuditEntry:
    """The content of one audit entry (what the gate knows about a call)."""

    at: datetime
    subject: str
    subject_kind: str
    channel: str
    action: str
    decision: str
    outcome: str
    tenant: str | None = None
    real_actor: str | None = None
    scopes: Sequence[str] = ()
    resource_type: str | None = None
    resource_id: str | None = None
    reason: str | None = None
    rule: str | None = None
    request_id: str | None = None
    idempotency_key: str | None = None
    replayed: bool = False
    state_before: str | None = None
    state_after: str | None = None
    input_digest: str | None = None
    detail: dict[str, Any] | None = None

    def as_row(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "tenant": self.tenant,
            "subject": self.subject,
            "subject_kind": self.subject_kind,
            "real_actor": self.real_actor,
            "scopes": sorted(self.scopes),
            "channel": self.channel,
            "action": self.action,
            "resource_type": self.resource_type,
            "resource_id": self.resource_id,
            "reason": self.reason,
            "decision": self.decision,
            "rule": self.rule,
            "outcome": self.outcome,
            "request_id": self.request_id,
            "idempotency_key": self.idempotency_key,
            "replayed": self.replayed,
            "state_before": self.state_before,
            "state_after": self.state_after,
            "input_digest": self.input_digest,
            "detail": self.detail,
        }


@dataclass(slots=True)
class _Stream:
    id: str
    seq: int = 0
    head: str = ""


@dataclass(slots=True)
class AuditLease:
    """One stream, checked out for one transaction.

    Call :meth:`write` inside the transaction, then exactly one of
    :meth:`committed` (the COMMIT succeeded), :meth:`rolled_back` (nothing was
    committed: the stream is reused as it was) or :meth:`abandon` (the COMMIT's
    fate is unknown: the stream is never used again).
    """

    trail: AuditTrail
    stream: _Stream
    pending: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False

    def seal(self, entries: Iterable[AuditEntry]) -> list[dict[str, Any]]:
        """Seal entries after the stream's head and count them as written by this lease.

        For callers that insert the rows themselves (e.g. folded into another
        statement); :meth:`write` seals and inserts.
        """
        rows: list[dict[str, Any]] = []
        for entry in entries:
            rows.append(self.trail.seal(self.stream, entry, [*self.pending, *rows]))
        self.pending.extend(rows)
        return rows

    def write(self, session: Session, entries: Iterable[AuditEntry]) -> None:
        rows: list[dict[str, Any]] = []
        for entry in entries:
            rows.append(self.trail.seal(self.stream, entry, [*self.pending, *rows]))
        if rows:
            # Core INSERT without RETURNING: the gate never needs the new ids, and
            # skipping them saves work on every audited call (see gate_overhead).
            session.connection().execute(ENTRY_INSERT, rows[0] if len(rows) == 1 else rows)
            self.pending.extend(rows)

    def committed(self) -> None:
        if self.pending:
            last = self.pending[-1]
            self.stream.seq, self.stream.head = last["seq"], last["hash"]
        self._finish(reuse=True)

    def rolled_back(self) -> None:
        self._finish(reuse=True)

    def abandon(self) -> None:
        self._finish(reuse=False)

    def _finish(self, *, reuse: bool) -> None:
        if self.done:
            return
        self.done = True
        self.pending = []
        if reuse:
            self.trail._release(self.stream)


class AuditTrail:
    """Writes and reads Charter's audit trail."""

    def __init__(self, keyring: AuditKeyring) -> None:
        self.keyring = keyring
        self._free: list[_Stream] = []
        self._lock = threading.Lock()

    def lease(self) -> AuditLease:
        with self._lock:
            stream = self._free.pop() if self._free else _Stream(uuid.uuid4().hex)
        return AuditLease(self, stream)

    def _release(self, stream: _Stream) -> None:
        with self._lock:
            self._free.append(stream)

    def seal(
        self, stream: _Stream, entry: AuditEntry, pending: Sequence[Mapping[str, Any]] = ()
    ) -> dict[str, Any]:
        """Place ``entry`` after the stream's head (or the lease's pending rows) and MAC it."""
        if pending:
            seq, prev = pending[-1]["seq"] + 1, pending[-1]["hash"]
        else:
            seq, prev = stream.seq + 1, stream.head
        row = entry.as_row()
        row.update(stream=stream.id, seq=seq, prev_hash=prev, key_id=self.keyring.current_id)
        row["hash"] = self.keyring.mac(canonical_message(row))
        return row

    def write_alone(self, session_factory: Any, entries: Sequence[AuditEntry]) -> None:
        """Append entries in their own short transaction (used for denials)."""
        lease = self.lease()
        with session_factory() as session:
            try:
                lease.write(session, entries)
            except BaseException:
                lease.rolled_back()
                raise
            try:
                session.commit()
            except BaseException:
                lease.abandon()
                raise
        lease.committed()

    @staticmethod
    def history(session: Session, resource_type: str, resource_id: str) -> list[dict[str, Any]]:
        """Every entry about one record, oldest first."""
        stmt = (
            select(audit_table)
            .where(audit_table.c.resource_type == resource_type)
            .where(audit_table.c.resource_id == str(resource_id))
            .order_by(audit_table.c.at, audit_table.c.id)
        )
        return [dict(r._mapping) for r in session.execute(stmt)]
