"""Verifying the audit trail against its checkpoints and its anchor.

See :mod:`charter.audit.trail` for the chain design. Verification reads the
anchor (if one is configured), then the checkpoints, then every entry once; it
recomputes each MAC and link and classifies what it finds:

* ``modified`` — an original entry whose content (or hash) was changed: its MAC
  fails, but the chain (the next entry's ``prev_hash`` or a checkpoint) still
  points at it;
* ``inserted`` — an entry that was never part of the chain: its MAC fails and
  nothing points at it;
* ``deleted`` — positions of a stream that no authentic entry occupies any more
  (gaps in the middle, or a tail that a checkpoint or the anchor had seen);
* ``reordered`` — authentic entries whose stored positions no longer follow
  their original order (the MAC covers the original position, so it is
  recovered by trying the other positions of the stream);
* ``checkpoint`` — a checkpoint whose signature or chaining is wrong, or one
  the anchor holds and the database lost;
* ``truncated`` — the database's checkpoints end before the anchor's do: the
  trail is shorter than the anchor says;
* ``emptied`` — no entry is left of a trail that checkpoints or the anchor
  vouch for;
* ``anchor`` — the anchor itself is damaged: a record edited or removed, or
  checkpoints the database says were written to it and it lacks (truncated);
* ``link`` — the index from touched records to entries disagrees with them.

Pruned streams (a signed ``prune`` checkpoint, :mod:`charter.audit.prune`) are
expected to start after the seq it names. Without an anchor, verification works
as before and says, in ``notes``, that nothing outside the database vouches for
the trail: then deleting the newest checkpoints with the entries they cover, or
both tables, cannot be noticed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .anchor import AnchorReading, AnchorRecord, AuditAnchor, read_anchor
from .checkpoint import PRUNE, checkpoint_message, signed_view
from .entry import audit_table, canonical_message, checkpoint_table, link_table
from .trail import AuditKeyring

__all__ = ["ANCHOR_GRACE", "AuditProblem", "VerificationReport", "verify"]

# Upper bound on MAC recomputations spent recovering one moved entry's position.
_MAX_POSITION_TRIES = 5000

#: A checkpoint younger than this may still be on its way to the anchor (it is
#: committed first, then appended): only older ones are required to be there.
ANCHOR_GRACE = timedelta(minutes=2)

NO_ANCHOR = (
    "no anchor is configured: nothing outside the database vouches for this trail, so "
    "deleting the newest checkpoints together with the entries they cover, or emptying "
    "both tables, cannot be noticed (set CHARTER_AUDIT_ANCHOR)"
)


@dataclass(frozen=True, slots=True)
class AuditProblem:
    kind: str  # modified | inserted | deleted | reordered | checkpoint | truncated | emptied | ...
    stream: str | None
    seq: int | None
    entry_id: int | None
    detail: str

    def __str__(self) -> str:
        if self.entry_id is None and self.stream is None:
            return f"{self.kind}: {self.detail}"
        where = f"entry {self.entry_id}" if self.entry_id is not None else "stream"
        pos = f" (stream {self.stream[:8]}… seq {self.seq})" if self.stream else ""
        return f"{self.kind}: {where}{pos}: {self.detail}"


@dataclass(slots=True)
class VerificationReport:
    entries: int = 0
    streams: int = 0
    checkpoints: int = 0
    problems: list[AuditProblem] = field(default_factory=list)
    #: The anchor checked against (its URI), and how many records it holds.
    anchor: str | None = None
    anchor_records: int = 0
    #: What a reader must know that is not a problem (e.g. that no anchor vouches).
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def anchored(self) -> bool:
        return self.anchor is not None


@dataclass(slots=True)
class _Vouched:
    """What the checkpoints and the anchor say the trail holds, per stream."""

    heads: dict[str, tuple[int, str, str]] = field(default_factory=dict)  # seq, hash, who says
    pruned: dict[str, tuple[int, str]] = field(default_factory=dict)  # deleted through seq

    def add(self, kind: str, heads: Mapping[str, Any], who: str) -> None:
        for stream, (seq, digest) in heads.items():
            if kind == PRUNE:
                if stream not in self.pruned or self.pruned[stream][0] < int(seq):
                    self.pruned[stream] = (int(seq), str(digest))
            elif stream not in self.heads or self.heads[stream][0] <= int(seq):
                self.heads[stream] = (int(seq), str(digest), who)

    def floor(self, stream: str) -> int:
        return self.pruned.get(stream, (0, ""))[0]

    def expected(self) -> dict[str, tuple[int, str, str]]:
        """The heads of streams that should still have entries (not pruned through their head)."""
        return {s: h for s, h in self.heads.items() if h[0] > self.floor(s)}


def _problem(kind: str, detail: str) -> AuditProblem:
    return AuditProblem(kind, None, None, None, detail)


def _span(noun: str, start: int, end: int) -> str:
    return f"{noun} {start}" if start == end else f"{noun}s {start}-{end}"


def _verify_checkpoints(
    session: Session, keyring: AuditKeyring, report: VerificationReport, vouched: _Vouched
) -> dict[int, dict[str, Any]]:
    """Check the checkpoint chain; return every checkpoint row by position (valid or not)."""
    rows = [dict(r) for r in session.execute(select(checkpoint_table)).mappings()]
    # Checkpoints from before positions existed first (by id), then the chain's order.
    rows.sort(key=lambda r: (r["position"] is not None, r["position"] or 0, r["id"]))
    prev, expected = "", 1
    by_position: dict[int, dict[str, Any]] = {}
    for stored in rows:
        report.checkpoints += 1
        position = stored["position"]
        label = f"checkpoint {position if position is not None else stored['id']}"
        cp = signed_view(stored)  # only what the signature covers is believed
        cp["valid"] = keyring.check(checkpoint_message(cp), cp["key_id"], cp["signature"])
        report.problems.extend(_unsigned_claims(stored, cp, label))
        if not cp["valid"]:
            report.problems.append(
                _problem("checkpoint", f"{label} has an invalid signature (altered or forged)")
            )
        elif position is not None and position > expected:
            gone = _span("checkpoint", expected, position - 1)
            report.problems.append(
                _problem("checkpoint", f"{gone} missing before {label}: deleted or reordered")
            )
        elif cp["prev_signature"] != prev:
            report.problems.append(
                _problem(
                    "checkpoint",
                    f"{label} does not follow the previous checkpoint "
                    "(a checkpoint was deleted or reordered)",
                )
            )
        if cp["valid"]:
            vouched.add(cp["kind"], cp["heads"], label)
        prev = cp["signature"]
        if position is not None:
            expected = int(position) + 1
            by_position[int(position)] = cp
    return by_position


def _unsigned_claims(
    stored: Mapping[str, Any], believed: Mapping[str, Any], label: str
) -> list[AuditProblem]:
    """A column an old-format checkpoint's signature does not cover, set to what it never was."""
    changed = [f"{name} {stored[name]!r}" for name in ("kind", "anchor")
               if stored[name] != believed[name]]  # fmt: skip
    if not changed:
        return []
    return [
        _problem(
            "checkpoint",
            f"{label} is in the old format, whose signature covers neither its kind nor its "
            f"anchor, yet says {' and '.join(changed)}: altered (read as a plain checkpoint)",
        )
    ]


def _check_anchor(
    reading: AnchorReading,
    checkpoints: Mapping[int, Mapping[str, Any]],
    vouched: _Vouched,
    report: VerificationReport,
    now: datetime | None,
    grace: timedelta,
) -> None:
    """The anchor's own damage, then what it holds and the database lost, and the reverse."""
    report.problems.extend(_problem("anchor", detail) for detail in reading.problems)
    anchored: dict[int, AnchorRecord] = {}
    for record in reading.records:
        if record.checkpoint is not None:
            vouched.add(record.kind, record.heads, f"anchor record {record.position}")
            anchored[int(record.checkpoint)] = record
    _lost_from_database(anchored, checkpoints, report)
    _lost_from_anchor(reading, anchored, checkpoints, report, now, grace)


def _lost_from_database(
    anchored: Mapping[int, AnchorRecord],
    checkpoints: Mapping[int, Mapping[str, Any]],
    report: VerificationReport,
) -> None:
    newest = max(checkpoints, default=0)
    gone = sorted(p for p in anchored if p not in checkpoints)
    for start, end in _ranges([p for p in gone if p < newest]):
        report.problems.append(
            _problem(
                "checkpoint",
                f"{_span('checkpoint', start, end)} missing from the database: deleted "
                f"(the anchor holds {'it' if start == end else 'them'}, from "
                f"{anchored[start].where})",
            )
        )
    beyond = [p for p in gone if p > newest]
    if beyond:
        last = anchored[beyond[-1]]
        ends = f"end at checkpoint {newest}" if newest else "are gone"
        report.problems.append(
            _problem(
                "truncated",
                f"the trail is shorter than the anchor says: its checkpoints {ends}, the "
                f"anchor's go on to checkpoint {beyond[-1]} ({last.where}, signed {last.at}); "
                f"{', '.join(_span('checkpoint', a, b) for a, b in _ranges(beyond))} deleted",
            )
        )
    for position, record in sorted(anchored.items()):
        row = checkpoints.get(position)
        if row is not None and row["valid"] and row["signature"] != record.signature:
            report.problems.append(
                _problem(
                    "checkpoint",
                    f"checkpoint {position} is not the one the anchor holds ({record.where}): "
                    "replaced",
                )
            )


def _lost_from_anchor(
    reading: AnchorReading,
    anchored: Mapping[int, AnchorRecord],
    checkpoints: Mapping[int, Mapping[str, Any]],
    report: VerificationReport,
    now: datetime | None,
    grace: timedelta,
) -> None:
    """Checkpoints that say they were written to this anchor, and that it lacks."""
    identity = reading.identity
    claimed = [cp for cp in checkpoints.values() if cp["valid"] and cp["anchor"] is not None]
    elsewhere = sorted(
        int(cp["position"]) for cp in claimed if identity and cp["anchor"] != identity
    )
    lost = sorted(
        int(cp["position"])
        for cp in claimed
        if (identity is None or cp["anchor"] == identity)
        and cp["position"] not in anchored
        and (now is None or _utc(cp["at"]) <= now - grace)
    )
    if lost:
        spans, was, it = _spans(lost)
        if identity is None:
            detail = (
                f"the anchor holds no record, but {spans} {was} written to an anchor: it was "
                "emptied or replaced"
            )
        else:
            detail = (
                f"{spans} {was} written to this anchor, which holds no record of {it}: it was "
                "truncated or records were removed (or appending failed: see the writer's log)"
            )
        report.problems.append(_problem("anchor", detail))
    if elsewhere:
        spans, was, _ = _spans(elsewhere)
        report.problems.append(
            _problem(
                "anchor",
                f"{spans} {was} written to another anchor, not to this one ({identity}): the "
                "anchor was replaced, or emptied and begun again (if it was moved on purpose, "
                "copy the old anchor's records into the new one before its first use)",
            )
        )


def _spans(positions: list[int]) -> tuple[str, str, str]:
    """``checkpoints 1-3, 5``, and the verb and pronoun that agree with it."""
    spans = ", ".join(_span("checkpoint", a, b) for a, b in _ranges(positions))
    return (spans, "were", "them") if len(positions) > 1 else (spans, "was", "it")


def _utc(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at


def _unanchored_notes(
    checkpoints: Mapping[int, Mapping[str, Any]], report: VerificationReport
) -> None:
    report.notes.append(NO_ANCHOR)
    claimed = sorted({cp["anchor"] for cp in checkpoints.values() if cp["anchor"] is not None})
    if claimed:
        report.notes.append(
            f"checkpoints were written to an anchor ({', '.join(a[:8] + '…' for a in claimed)}) "
            "that is not configured here: they were not checked against it"
        )


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
    vouched: _Vouched,
    report: VerificationReport,
) -> None:
    head = vouched.heads.get(stream)  # (seq, hash, who vouches for it)
    floor = vouched.floor(stream)  # pruned through this seq, on purpose
    rows.sort(key=lambda r: (r["seq"], r["id"]))
    top = max([r["seq"] for r in rows] + [head[0] if head else 0])
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

    # Which hashes does the authentic chain (or a checkpoint, or a prune) still point at?
    pointed = {r["prev_hash"] for r in authentic.values()}
    if head:
        pointed.add(head[1])
    if stream in vouched.pruned:
        pointed.add(vouched.pruned[stream][1])
    top_known = max([*authentic, head[0] if head else 0, floor])
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

    # Deletions: positions after the pruned ones that no authentic or altered entry
    # occupies, up to the known end.
    missing = [
        s
        for s in range(floor + 1, top_known + 1)
        if s not in authentic and s not in modified_positions
    ]
    last_left = max(authentic, default=floor)
    for start, end in _ranges(missing):
        span = f"position {start}" if start == end else f"positions {start}-{end}"
        seen = f"; {head[2]} had seen them" if head and end > last_left else ""
        report.problems.append(
            AuditProblem(
                "deleted",
                stream,
                start,
                None,
                f"{span} of the stream {'is' if start == end else 'are'} missing "
                f"(deleted entries{seen})",
            )
        )
    if head and head[0] in authentic and authentic[head[0]]["hash"] != head[1]:
        report.problems.append(
            AuditProblem(
                "modified",
                stream,
                head[0],
                authentic[head[0]]["id"],
                f"the entry differs from the one {head[2]} signed",
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


def _verify_streams(
    by_stream: Mapping[str, list[dict[str, Any]]],
    keyring: AuditKeyring,
    vouched: _Vouched,
    report: VerificationReport,
) -> None:
    expected = vouched.expected()
    if not by_stream and expected:
        total = sum(seq - vouched.floor(s) for s, (seq, _, _) in expected.items())
        sources = sorted({who.rsplit(" ", 1)[0] for _, _, who in expected.values()})
        by = "the anchor vouches" if "anchor record" in sources else "the checkpoints vouch"
        report.problems.append(
            _problem(
                "emptied",
                f"the trail is empty, but {by} for {total} entries in {len(expected)} "
                "stream(s): the entries were deleted",
            )
        )
        return
    for stream, rows in by_stream.items():
        _verify_stream(stream, rows, keyring, vouched, report)
    for stream, (seq, _digest, who) in expected.items():
        if stream not in by_stream:
            report.problems.append(
                AuditProblem(
                    "deleted",
                    stream,
                    vouched.floor(stream) + 1,
                    None,
                    f"the whole stream (positions {vouched.floor(stream) + 1}-{seq}) is "
                    f"missing: {who} had seen it",
                )
            )


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


def verify(
    session: Session,
    keyring: AuditKeyring,
    *,
    anchor: AuditAnchor | None = None,
    now: datetime | None = None,
    grace: timedelta = ANCHOR_GRACE,
) -> VerificationReport:
    """Check every entry and checkpoint, against ``anchor`` if given; report each problem.

    ``now`` (aware) and ``grace``: a checkpoint signed less than ``grace`` before
    ``now`` need not be in the anchor yet (its append may be under way).
    """
    report = VerificationReport(anchor=anchor.uri if anchor is not None else None)
    # The anchor first: a checkpoint reaches it only after its commit, so every
    # checkpoint it names is visible to the reads that follow.
    reading = read_anchor(anchor, keyring) if anchor is not None else None
    postgres = session.bind is not None and session.bind.dialect.name == "postgresql"
    if postgres and not session.in_transaction():  # one snapshot: checkpoints and entries
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
    vouched = _Vouched()
    checkpoints = _verify_checkpoints(session, keyring, report, vouched)
    if reading is None:
        _unanchored_notes(checkpoints, report)
    else:
        report.anchor_records = reading.count
        _check_anchor(reading, checkpoints, vouched, report, now, grace)
    by_stream: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in session.execute(select(audit_table)).mappings():
        by_stream[row["stream"]].append(dict(row))
        report.entries += 1
    report.streams = len(by_stream)
    _verify_streams(by_stream, keyring, vouched, report)
    _verify_links(session, by_stream, report)
    return report
