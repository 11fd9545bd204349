"""Verifying the audit trail, and the signed checkpoints that guard stream tails.

See :mod:`charter.audit.trail` for the chain design. Verification reads every entry
once, recomputes its MAC and its links, and classifies what it finds:

* ``modified`` — an original entry whose content (or hash) was changed: its MAC
  fails, but the chain (the next entry's ``prev_hash`` or a checkpoint) still
  points at it;
* ``inserted`` — an entry that was never part of the chain: its MAC fails and
  nothing points at it;
* ``deleted`` — positions of a stream that no authentic entry occupies any more
  (gaps in the middle, or a tail that a checkpoint had seen);
* ``reordered`` — authentic entries whose stored positions no longer follow
  their original order (the MAC covers the original position, so it is
  recovered by trying the other positions of the stream);
* ``checkpoint`` — a checkpoint whose signature or chaining is wrong.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from itertools import pairwise
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from .entry import audit_table, canonical_message, checkpoint_table, link_table
from .trail import AuditKeyring

__all__ = ["AuditProblem", "VerificationReport", "checkpoint", "verify"]

# Upper bound on MAC recomputations spent recovering one moved entry's position.
_MAX_POSITION_TRIES = 5000


@dataclass(frozen=True, slots=True)
class AuditProblem:
    kind: str  # modified | inserted | deleted | reordered | checkpoint | link
    stream: str | None
    seq: int | None
    entry_id: int | None
    detail: str

    def __str__(self) -> str:
        where = f"entry {self.entry_id}" if self.entry_id is not None else "stream"
        pos = f" (stream {self.stream[:8]}… seq {self.seq})" if self.stream else ""
        return f"{self.kind}: {where}{pos}: {self.detail}"


@dataclass(slots=True)
class VerificationReport:
    entries: int = 0
    streams: int = 0
    checkpoints: int = 0
    problems: list[AuditProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _checkpoint_message(at: datetime | str, heads: Mapping[str, Any], prev: str) -> bytes:
    at_text = (
        at if isinstance(at, str) else at.replace(tzinfo=None).isoformat(timespec="microseconds")
    )
    return json.dumps(
        ["charter-checkpoint-v1", at_text, heads, prev], sort_keys=True, separators=(",", ":")
    ).encode()


def checkpoint(session: Session, keyring: AuditKeyring, now: datetime) -> dict[str, Any]:
    """Sign the head (last seq and hash) of every stream, chained to the last checkpoint.

    Run it periodically (the reference service does, and ``charter audit
    checkpoint``): entries older than the newest checkpoint are protected
    against tail truncation too.
    """
    last = session.execute(
        select(audit_table.c.stream, func.max(audit_table.c.seq)).group_by(audit_table.c.stream)
    ).all()
    heads: dict[str, list[Any]] = {}
    for stream, seq in last:
        digest = session.execute(
            select(audit_table.c.hash).where(
                audit_table.c.stream == stream, audit_table.c.seq == seq
            )
        ).scalar_one()
        heads[stream] = [int(seq), digest]
    prev = (
        session.execute(
            select(checkpoint_table.c.signature).order_by(checkpoint_table.c.id.desc()).limit(1)
        ).scalar_one_or_none()
        or ""
    )
    at = now.replace(tzinfo=None)
    signature = keyring.mac(_checkpoint_message(at, heads, prev))
    row = {
        "at": now,
        "heads": heads,
        "prev_signature": prev,
        "key_id": keyring.current_id,
        "signature": signature,
    }
    session.execute(insert(checkpoint_table), [row])
    return row


def _verify_checkpoints(
    session: Session, keyring: AuditKeyring, report: VerificationReport
) -> dict[str, tuple[int, str]]:
    """Check the checkpoint chain; return the newest valid head per stream."""
    heads: dict[str, tuple[int, str]] = {}
    prev = ""
    for cp in session.execute(select(checkpoint_table).order_by(checkpoint_table.c.id)):
        report.checkpoints += 1
        message = _checkpoint_message(cp.at, cp.heads, cp.prev_signature)
        if not keyring.check(message, cp.key_id, cp.signature):
            report.problems.append(
                AuditProblem(
                    "checkpoint",
                    None,
                    None,
                    None,
                    f"checkpoint {cp.id} has an invalid signature (altered or forged)",
                )
            )
            continue
        if cp.prev_signature != prev:
            report.problems.append(
                AuditProblem(
                    "checkpoint",
                    None,
                    None,
                    None,
                    f"checkpoint {cp.id} does not follow the previous checkpoint "
                    "(a checkpoint was deleted or reordered)",
                )
            )
        prev = cp.signature
        for stream, (seq, digest) in cp.heads.items():
            if stream not in heads or heads[stream][0] <= seq:
                heads[stream] = (int(seq), str(digest))
    return heads


def _original_position(
    row: Mapping[str, Any], keyring: AuditKeyring, candidates: range
) -> int | None:
    """The position whose MAC this row carries, or None if it is not authentic anywhere."""
    probe = dict(row)
    if keyring.check(canonical_message(probe), row["key_id"], row["hash"]):
        return int(row["seq"])
    for tries, seq in enumerate(candidates):
        if tries >= _MAX_POSITION_TRIES:
            break
        if seq == row["seq"]:
            continue
        probe["seq"] = seq
        if keyring.check(canonical_message(probe), row["key_id"], row["hash"]):
            return seq
    return None


def _verify_stream(
    stream: str,
    rows: list[dict[str, Any]],
    keyring: AuditKeyring,
    checkpointed: tuple[int, str] | None,
    report: VerificationReport,
) -> None:
    rows.sort(key=lambda r: (r["seq"], r["id"]))
    top = max([r["seq"] for r in rows] + [checkpointed[0] if checkpointed else 0])
    candidates = range(1, top + len(rows) + 1)
    authentic: dict[int, dict[str, Any]] = {}  # original seq -> row
    forged: list[dict[str, Any]] = []
    order: list[int] = []
    for row in rows:
        original = _original_position(row, keyring, candidates)
        if original is None or original in authentic:
            forged.append(row)
        else:
            authentic[original] = row
            order.append(original)

    # Which hashes does the authentic chain (or a checkpoint) still point at?
    pointed = {r["prev_hash"] for r in authentic.values()}
    if checkpointed:
        pointed.add(checkpointed[1])
    top_known = max([*authentic, checkpointed[0] if checkpointed else 0])
    modified_positions: set[int] = set()
    for row in forged:
        seq = int(row["seq"])
        if seq not in authentic and (row["hash"] in pointed or seq <= top_known):
            # It stands where an original entry stood: that entry was altered.
            modified_positions.add(seq)
            report.problems.append(
                AuditProblem(
                    "modified",
                    stream,
                    seq,
                    row["id"],
                    "the entry's content does not match its MAC: altered after it was written",
                )
            )
        else:
            # A second entry at an occupied position, or past the chain's known end.
            # (Past the end and after the last checkpoint, an altered last entry
            # looks the same as an appended one; checkpoints remove that doubt.)
            report.problems.append(
                AuditProblem(
                    "inserted",
                    stream,
                    seq,
                    row["id"],
                    "the entry was never part of the chain: nothing links to it and its MAC "
                    "is invalid",
                )
            )

    # Reordering: authentic entries whose stored order disagrees with their original order.
    if any(b < a for a, b in pairwise(order)):
        for original in order:
            moved = authentic[original]
            if moved["seq"] != original:
                report.problems.append(
                    AuditProblem(
                        "reordered",
                        stream,
                        moved["seq"],
                        moved["id"],
                        f"the entry was written at position {original} but now stands at "
                        f"{moved['seq']}",
                    )
                )

    # Deletions: positions that no authentic or altered entry occupies, up to the known end.
    missing = [
        s for s in range(1, top_known + 1) if s not in authentic and s not in modified_positions
    ]
    for start, end in _ranges(missing):
        span = f"position {start}" if start == end else f"positions {start}-{end}"
        report.problems.append(
            AuditProblem(
                "deleted",
                stream,
                start,
                None,
                f"{span} of the stream are missing (deleted entries)",
            )
        )
    if (
        checkpointed
        and checkpointed[0] in authentic
        and authentic[checkpointed[0]]["hash"] != checkpointed[1]
    ):
        report.problems.append(
            AuditProblem(
                "modified",
                stream,
                checkpointed[0],
                authentic[checkpointed[0]]["id"],
                "the entry differs from the one the last checkpoint signed",
            )
        )


def _ranges(values: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for v in values:
        if out and out[-1][1] == v - 1:
            out[-1] = (out[-1][0], v)
        else:
            out.append((v, v))
    return out


def _verify_links(
    session: Session, by_stream: Mapping[str, list[dict[str, Any]]], report: VerificationReport
) -> None:
    """The link index must say exactly what the entries' MAC-covered ``touched`` lists say.

    A deleted link would hide an entry from a touched record's history; a forged
    one would attach an entry to a record it never touched.
    """
    expected: dict[tuple[str, int, str, str], int] = {}
    for stream, rows in by_stream.items():
        for row in rows:
            for touched in (row.get("detail") or {}).get("touched") or ():
                expected[(stream, int(row["seq"]), touched["type"], touched["id"])] = row["id"]
    found = {
        (r.stream, int(r.seq), r.resource_type, r.resource_id)
        for r in session.execute(select(link_table))
    }
    for key in sorted(set(expected) - found):
        report.problems.append(
            AuditProblem(
                "link", key[0], key[1], expected[key],
                f"the link from {key[2]} {key[3]} to this entry is missing",
            )
        )  # fmt: skip
    for key in sorted(found - set(expected)):
        report.problems.append(
            AuditProblem(
                "link", key[0], key[1], None,
                f"a link from {key[2]} {key[3]} names an entry that does not list it",
            )
        )  # fmt: skip


def verify(session: Session, keyring: AuditKeyring) -> VerificationReport:
    """Check every entry and checkpoint; report each problem with its location."""
    report = VerificationReport()
    checkpointed = _verify_checkpoints(session, keyring, report)
    by_stream: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in session.execute(select(audit_table)).mappings():
        by_stream[row["stream"]].append(dict(row))
        report.entries += 1
    report.streams = len(by_stream)
    for stream, rows in by_stream.items():
        _verify_stream(stream, rows, keyring, checkpointed.get(stream), report)
    _verify_links(session, by_stream, report)
    for stream, (seq, _digest) in checkpointed.items():
        if stream not in by_stream:
            report.problems.append(
                AuditProblem(
                    "deleted",
                    stream,
                    1,
                    None,
                    f"the whole stream (positions 1-{seq}) is missing: a checkpoint had seen it",
                )
            )
    return report
