"""Signed checkpoints: the chain that guards stream tails, and its one writer.

A checkpoint signs, with the audit keyring, the heads (last seq and hash) of
some streams, chained to the checkpoint before it. Two kinds share the chain:

* ``checkpoint`` — these heads exist; the trail must still hold them;
* ``prune`` — each stream was deleted on purpose *through* this seq (whose hash
  is given, so the first entry left still links to it): retention, not
  tampering (:mod:`charter.audit.prune`).

Each checkpoint has a unique ``position``: two processes that checkpoint at once
cannot both follow the same checkpoint; the second INSERT fails and that writer
re-reads the chain's end (:func:`chained`). No gate transaction touches this
table, and the heads are read before the write transaction opens, so a
checkpoint never makes a writer of entries wait (on SQLite the INSERT takes the
database's write lock for one short statement, as every writer does).

A checkpoint written to an anchor names the anchor (``anchor``, signed), so
verification knows the anchor must hold it (see :mod:`charter.audit.anchor`).
Checkpoints written before positions existed (``position`` NULL) are verified
in their original format, which signs neither ``kind`` nor ``anchor``: such a
row is read as a plain checkpoint written to no anchor, whatever those columns
say (:func:`signed_view`), since a ``prune`` there would excuse deleted entries.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Connection, func, insert, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine

from ..errors import Conflict
from ..storage import WRITE_OPTION, translate_errors
from .entry import audit_table, checkpoint_table
from .trail import AuditKeyring

__all__ = [
    "CHECKPOINT",
    "PRUNE",
    "append_checkpoint",
    "chained",
    "checkpoint_message",
    "read_heads",
    "signed_view",
    "write_checkpoint",
]

CHECKPOINT = "checkpoint"
PRUNE = "prune"
_V1 = "charter-checkpoint-v1"
_V2 = "charter-checkpoint-v2"
# A conflict means another process checkpointed in the same instant: retry at once.
_RETRIES = 20

T = TypeVar("T")


def utc_text(at: datetime | str) -> str:
    """A timestamp as the signatures cover it: UTC, naive ISO 8601 with microseconds."""
    if isinstance(at, str):
        return at
    if at.tzinfo is not None:
        at = at.astimezone(UTC).replace(tzinfo=None)
    return at.isoformat(timespec="microseconds")


def checkpoint_message(row: Mapping[str, Any]) -> bytes:
    """The bytes a checkpoint's signature covers (v1 for rows without a position)."""
    if row.get("position") is None:
        at = row["at"]
        # v1 dropped the zone without converting it: kept as it was, for old rows.
        at_text = (
            at if isinstance(at, str) else at.replace(tzinfo=None).isoformat("T", "microseconds")
        )
        parts: list[Any] = [_V1, at_text, row["heads"], row["prev_signature"]]
    else:
        parts = [
            _V2,
            utc_text(row["at"]),
            row["kind"],
            row["heads"],
            row["prev_signature"],
            int(row["position"]),
            row["anchor"],
        ]
    return json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()


def signed_view(row: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint row as its signature vouches for it: nothing it does not cover is trusted.

    A v1 row (``position`` NULL, written before charter_0005) signs only its time,
    heads and previous signature: it was a plain checkpoint written to no anchor,
    and is read as one even if its ``kind`` or ``anchor`` column now says otherwise.
    """
    view = dict(row)
    if row.get("position") is None:
        view.update(kind=CHECKPOINT, anchor=None)
    return view


def read_heads(connection: Connection, *, before: datetime | None = None) -> dict[str, list[Any]]:
    """``{stream: [seq, hash]}`` of each stream's last entry (older than ``before``): one query."""
    a = audit_table
    last = select(a.c.stream, func.max(a.c.seq).label("seq")).group_by(a.c.stream)
    if before is not None:
        last = last.where(a.c.at < before)
    tops = last.subquery()
    rows = connection.execute(
        select(a.c.stream, a.c.seq, a.c.hash).join(
            tops, (a.c.stream == tops.c.stream) & (a.c.seq == tops.c.seq)
        )
    )
    return {stream: [int(seq), digest] for stream, seq, digest in rows}


def append_checkpoint(
    connection: Connection,
    keyring: AuditKeyring,
    now: datetime,
    heads: Mapping[str, Any],
    *,
    kind: str = CHECKPOINT,
    anchor: str | None = None,
) -> dict[str, Any]:
    """Sign ``heads`` after the chain's last checkpoint; INSERT it in the caller's transaction."""
    c = checkpoint_table
    last = connection.execute(select(func.max(c.c.position))).scalar()
    if last is None:
        # The first positioned checkpoint follows the last one signed before positions existed.
        legacy = select(c.c.signature).where(c.c.position.is_(None)).order_by(c.c.id.desc())
        prev = connection.execute(legacy.limit(1)).scalar() or ""
    else:
        prev = connection.execute(select(c.c.signature).where(c.c.position == last)).scalar_one()
    row: dict[str, Any] = {
        "at": now,
        "kind": kind,
        "heads": {stream: [int(seq), digest] for stream, (seq, digest) in sorted(heads.items())},
        "prev_signature": prev,
        "position": int(last or 0) + 1,
        "anchor": anchor,
        "key_id": keyring.current_id,
    }
    row["signature"] = keyring.mac(checkpoint_message(row))
    connection.execute(insert(c), [row])
    return row


def chained(engine: Engine, body: Callable[[Connection], T]) -> T:
    """Run ``body`` in a short write transaction; again if another checkpoint took its position."""
    writer = engine.execution_options(**{WRITE_OPTION: True})
    for attempt in range(_RETRIES):
        try:
            with translate_errors(), writer.begin() as connection:
                return body(connection)
        except Conflict as exc:
            if not isinstance(exc.__cause__, sa_exc.IntegrityError) or attempt == _RETRIES - 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def write_checkpoint(
    engine: Engine,
    keyring: AuditKeyring,
    now: datetime,
    *,
    heads: Mapping[str, Any] | None = None,
    anchor: str | None = None,
) -> dict[str, Any]:
    """Sign ``heads`` (default: every stream's, read first, outside the write) into the chain."""
    if heads is None:
        with translate_errors(), engine.connect() as connection:
            heads = read_heads(connection)
    chosen = heads
    return chained(
        engine,
        lambda connection: append_checkpoint(connection, keyring, now, chosen, anchor=anchor),
    )
