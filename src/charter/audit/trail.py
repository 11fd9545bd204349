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
  why checkpoints (:mod:`charter.audit.checkpoint`) periodically sign the
  streams' heads (seq and hash), chaining checkpoints to each other, and copy
  each one to an anchor outside the database (:mod:`charter.audit.anchor`);
  verification then reports any checkpointed entry that has gone. Entries
  written since the last checkpoint are protected against everything but tail
  truncation. Each trail keeps the heads its streams reached since the last
  checkpoint (:meth:`AuditTrail.dirty_heads`), so the scheduled checkpoint of a
  process (:mod:`charter.audit.schedule`) signs them without reading the table.

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
import os
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, or_, select, tuple_

from ..errors import ConfigurationError
from .entry import ENTRY_INSERT, LINK_INSERT, AuditEntry, audit_table, canonical_message, link_table

__all__ = ["AuditKeyring", "AuditLease", "AuditTrail", "write_links"]


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

    @property
    def key_ids(self) -> tuple[str, ...]:
        """The ids of the keys, newest first (the order they were given in)."""
        return tuple(self._keys)

    def mac(self, message: bytes, key_id: str | None = None) -> str:
        key = self._keys[key_id or self._current]
        return hmac.new(key, message, hashlib.sha256).hexdigest()

    def check(self, message: bytes, key_id: str, mac: str) -> bool:
        key = self._keys.get(key_id)
        if key is None:
            return False
        expected = hmac.new(key, message, hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, mac)


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
    #: False for a trail that writes nothing (charter.testing.NullAuditTrail).
    seals: bool = True

    def seal(self, entries: Iterable[AuditEntry]) -> list[dict[str, Any]]:
        """Seal entries after the stream's head and count them as written by this lease.

        For callers that insert the rows themselves (e.g. folded into another
        statement, see :mod:`charter.pipeline.writes`); :meth:`write` seals and inserts.
        """
        rows: list[dict[str, Any]] = []
        for entry in entries:
            rows.append(self.trail.seal(self.stream, entry, [*self.pending, *rows]))
        self.pending.extend(rows)
        return rows

    def write(self, connection: Connection, entries: Iterable[AuditEntry]) -> None:
        """Seal and insert entries (and their links) on ``connection``, in its transaction."""
        rows = self.seal(entries)
        if rows:
            # Core INSERT without RETURNING: the gate never needs the new ids, and
            # skipping them saves work on every audited call (see gate_overhead).
            connection.execute(ENTRY_INSERT, rows[0] if len(rows) == 1 else rows)
            write_links(connection, rows)

    def committed(self) -> None:
        if self.done:
            return
        self.done = True
        rows, self.pending = self.pending, []
        self.trail._committed(self.stream, rows)

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
    """Writes and reads Charter's audit trail.

    ``observer``, if set, is called with the number of entries each commit
    wrote (the checkpoint schedule counts them); it runs on the committing
    thread, so it must be quick and must not raise.
    """

    def __init__(self, keyring: AuditKeyring) -> None:
        self.keyring = keyring
        self.observer: Callable[[int], None] | None = None
        self._free: list[_Stream] = []
        # Streams whose head moved since the last checkpoint that covered them.
        self._dirty: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        _trails.add(self)
        _install_fork_hook()

    def lease(self) -> AuditLease:
        with self._lock:
            stream = self._free.pop() if self._free else _Stream(uuid.uuid4().hex)
        return AuditLease(self, stream)

    def _release(self, stream: _Stream) -> None:
        with self._lock:
            self._free.append(stream)

    def _committed(self, stream: _Stream, rows: Sequence[Mapping[str, Any]]) -> None:
        with self._lock:
            if rows:
                # Under the lock: a checkpoint never reads a head half updated.
                stream.seq, stream.head = rows[-1]["seq"], rows[-1]["hash"]
                self._dirty[stream.id] = stream
            self._free.append(stream)
        if rows and self.observer is not None:
            self.observer(len(rows))

    def dirty_heads(self) -> dict[str, list[Any]]:
        """``{stream: [seq, hash]}`` of every stream this trail moved since it was checkpointed.

        Only committed entries count; an abandoned stream stays here until a
        checkpoint has covered its last known head, then it is forgotten.
        """
        with self._lock:
            return {s.id: [s.seq, s.head] for s in self._dirty.values()}

    def checkpointed(self, heads: Mapping[str, Sequence[Any]]) -> None:
        """Forget the streams a checkpoint covered (unless they moved on since)."""
        with self._lock:
            for stream_id, (seq, _digest) in heads.items():
                stream = self._dirty.get(stream_id)
                if stream is not None and stream.seq <= int(seq):
                    del self._dirty[stream_id]

    def _after_fork(self) -> None:
        # A forked child must never continue its parent's streams: both would
        # write the same (stream, seq). It starts afresh (the parent's lock may
        # have been held at the fork, so it gets a new one too).
        self._lock = threading.Lock()
        self._free = []
        self._dirty = {}

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

    def write_alone(self, connection: Connection, entries: Sequence[AuditEntry]) -> None:
        """Append entries on an autocommit connection, each INSERT its own transaction."""
        lease = self.lease()
        try:
            lease.write(connection, entries)
        except BaseException:
            lease.abandon()  # the INSERT's fate may be unknown: never reuse the stream
            raise
        lease.committed()

    @staticmethod
    def history(
        connection: Connection, resource_type: str, resource_id: str
    ) -> list[dict[str, Any]]:
        """Every entry about one record, oldest first: as the target, or as a touched record."""
        a, link = audit_table, link_table
        linked = select(link.c.stream, link.c.seq).where(
            link.c.resource_type == resource_type, link.c.resource_id == str(resource_id)
        )
        stmt = (
            select(a)
            .where(
                or_(
                    (a.c.resource_type == resource_type) & (a.c.resource_id == str(resource_id)),
                    tuple_(a.c.stream, a.c.seq).in_(linked),
                )
            )
            .order_by(a.c.at, a.c.id)
        )
        return [dict(r._mapping) for r in connection.execute(stmt)]


_trails: weakref.WeakSet[AuditTrail] = weakref.WeakSet()
_fork_hook: list[bool] = []


def _install_fork_hook() -> None:
    """Once per process, on first use (no import-time side effect)."""
    if not _fork_hook and hasattr(os, "register_at_fork"):
        _fork_hook.append(True)
        os.register_at_fork(after_in_child=_reset_after_fork)


def _reset_after_fork() -> None:
    for trail in list(_trails):
        trail._after_fork()


def write_links(connection: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    """Index each sealed entry from the further records it touched (``detail["touched"]``)."""
    links = [
        {
            "stream": row["stream"],
            "seq": row["seq"],
            "resource_type": t["type"],
            "resource_id": t["id"],
        }
        for row in rows
        for t in ((row.get("detail") or {}).get("touched") or ())
    ]
    if links:
        connection.execute(LINK_INSERT, links)
