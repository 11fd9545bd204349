"""What an audit entry is: its tables, its content, the bytes its MAC covers.

Sealing entries into chained streams is :mod:`charter.audit.trail`; checking
them is :mod:`charter.audit.verify`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
    text,
)
from sqlalchemy.types import JSON

from ..redaction import is_secret_name
from ..storage import metadata

__all__ = [
    "CONTENT_FIELDS",
    "ENTRY_INSERT",
    "LINK_INSERT",
    "AuditEntry",
    "audit_table",
    "canonical_message",
    "checkpoint_table",
    "digest_input",
    "link_table",
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
    # charter_0011: impersonated entries only (partial), for "who acted on my behalf"
    # (charter.sessions); an ordinary entry (real_actor NULL) costs it nothing.
    Index(
        "ix_charter_audit_impersonation",
        "real_actor",
        "subject",
        "at",
        postgresql_where=text("real_actor IS NOT NULL"),
        sqlite_where=text("real_actor IS NOT NULL"),
    ),
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
    # charter_0005: the place in the chain (unique, so two concurrent checkpoints
    # cannot follow the same one; NULL for checkpoints signed before it), what the
    # row says (``checkpoint``: heads the trail must still hold; ``prune``: how far
    # each stream was deleted on purpose), and the anchor it was written to.
    Column("position", BigInteger, nullable=True),
    Column("kind", String(16), nullable=False, server_default="checkpoint"),
    Column("anchor", String(64), nullable=True),
    Index("uq_charter_audit_checkpoints_position", "position", unique=True),
)

#: The entry INSERT, built once: no RETURNING (nobody needs the new ids), and a
#: statement reused as is skips SQLAlchemy's cache-key walk on every call.
# The further records a call changed, besides its target (issue 8): an index from
# each of them to the entry, so a record's history finds every entry that touched
# it. The entry itself lists them in its MAC-covered ``detail["touched"]``; this
# table only makes them findable, and verify checks it against the entries.
link_table = Table(
    "charter_audit_links",
    metadata,
    Column("stream", String(32), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("resource_type", String(64), nullable=False),
    Column("resource_id", String(128), nullable=False),
    Index("ix_charter_audit_links_resource", "resource_type", "resource_id"),
)

ENTRY_INSERT = insert(audit_table).inline()
LINK_INSERT = insert(link_table).inline()

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

REDACTED = "[redacted]"


def _redact(value: Any, name: str = "") -> Any:
    if name and is_secret_name(name):  # the library's one rule (charter.redaction)
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
