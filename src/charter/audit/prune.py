"""Pruning the trail for retention, with a signed record of how far.

Deleting old entries looks, to verification, exactly like tampering: the first
positions of each stream are missing. :func:`prune` deletes, in one
transaction, every entry older than ``before`` (per stream: through the last
such seq) and its links, and appends to the checkpoint chain a signed ``prune``
record naming, for each stream, the seq it was pruned through and that entry's
hash. Verification then expects each stream to start right after it; the
record is copied to the anchor like any checkpoint. Without the record (or
with one that was altered) the missing entries are reported as deleted.

Pruning refuses to run over a trail that does not verify: deleting entries
would erase the evidence.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete
from sqlalchemy.engine import Engine

from ..errors import AuditIntegrityError
from .checkpoint import PRUNE, append_checkpoint, chained, read_heads
from .entry import audit_table, link_table
from .trail import AuditKeyring
from .verify import VerificationReport

__all__ = ["Pruned", "prune"]


@dataclass(frozen=True, slots=True)
class Pruned:
    """What a prune deleted: ``entries`` in total, and the signed record (None if nothing)."""

    entries: int
    record: dict[str, Any] | None


def prune(
    engine: Engine,
    keyring: AuditKeyring,
    now: datetime,
    before: datetime,
    *,
    verified: VerificationReport,
    anchor: str | None = None,
) -> Pruned:
    """Delete entries older than ``before`` and sign how far (see the module docstring).

    ``verified`` is a report of the trail as it is now (it must be clean);
    ``anchor`` the identity of the anchor the record will be copied to.
    """
    if not verified.ok:
        raise AuditIntegrityError(
            f"the audit trail has {len(verified.problems)} problems: pruning would erase the "
            "evidence; run `charter audit verify` and resolve them first",
            problems=len(verified.problems),
        )

    def body(connection: Connection) -> Pruned:
        marks = read_heads(connection, before=before)
        if not marks:
            return Pruned(0, None)
        a, link = audit_table, link_table
        deleted = 0
        for stream, (seq, _digest) in marks.items():
            connection.execute(delete(link).where(link.c.stream == stream, link.c.seq <= seq))
            deleted += connection.execute(
                delete(a).where(a.c.stream == stream, a.c.seq <= seq)
            ).rowcount
        record = append_checkpoint(connection, keyring, now, marks, kind=PRUNE, anchor=anchor)
        return Pruned(deleted, record)

    return chained(engine, body)
