"""Anchors: every checkpoint's signed head, copied outside the database.

Checkpoints live in the database they guard, so someone who can write to it can
delete the newest checkpoint together with the entries only it covered, or
empty both tables, and the trail still verifies. An **anchor** is an
append-only log elsewhere that receives a copy of every checkpoint:
``charter audit verify`` then reports any checkpoint, stream tail or whole
trail that the anchor vouches for and the database has lost.

An anchor is chosen by URI (:func:`anchor_from_uri`, ``CHARTER_AUDIT_ANCHOR``):

* ``file:///var/lib/charter/audit.anchor.jsonl`` (or a plain path) —
  :class:`FileAnchor`, one JSON record per line. Writers take ``flock`` and
  append with ``O_APPEND``, re-reading the last line under the lock to chain
  to it, so several processes (and hosts, on a file system whose locks work
  across hosts, e.g. NFSv4) can share one file. Make it append-only
  (``chattr +a``) or ship it to a write-once store.
* ``postgresql+psycopg://…`` or any SQLAlchemy URL of *another* database —
  :class:`SqlAnchor`, a table whose unique ``position`` makes concurrent writers
  chain correctly (the loser of a race re-reads the end and retries). Grant the
  anchor's database user ``SELECT`` and ``INSERT`` only.
* ``none`` — no anchor.

Other sinks (a write-once object store, a transparency log) implement
:class:`AuditAnchor`: ``append`` (atomically, against every other writer, call
``build`` with the last stored record and store what it returns) and
``records`` (every stored record, oldest first).

Records are signed and chained themselves: each is canonical JSON carrying its
``position``, the SHA-256 of the record before it (``prev``), the anchor's
identity (``anchor``, from its first, ``genesis`` record), the key id and an
HMAC-SHA256 with the audit keyring (rotation works as for entries). So an
edited record fails its MAC, a removed record breaks the positions, and a
truncated anchor is reported because each checkpoint in the database names
the anchor it was written to (:mod:`charter.audit.verify`).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Mapping
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from sqlalchemy import BigInteger, Column, MetaData, Table, Text, insert, inspect, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine

from ..errors import AuditIntegrityError, ConfigurationError, Conflict, StorageUnavailable
from ..storage import WRITE_OPTION, make_engine, translate_errors
from .checkpoint import utc_text
from .trail import AuditKeyring

__all__ = [
    "ANCHOR_FORMAT",
    "AnchorReading",
    "AnchorRecord",
    "AuditAnchor",
    "FileAnchor",
    "SqlAnchor",
    "anchor_checkpoint",
    "anchor_from_uri",
    "anchor_identity",
    "read_anchor",
]

ANCHOR_FORMAT = "charter-anchor-v1"
GENESIS = "genesis"

#: ``build(tail)``: given the last stored record (None if the anchor is empty),
#: the ``(position, record)`` to append, or None to append nothing.
Build = Callable[[str | None], tuple[int, str] | None]
#: What ``records()`` yields: ``(where, text)``, oldest first; closing it ends the read.
Records = Generator[tuple[str, str], None, None]


class AuditAnchor(ABC):
    """Where checkpoints are copied: an append-only, ordered store of text records."""

    uri: str

    @abstractmethod
    def append(self, build: Build) -> str | None:
        """Append ``build(tail)``, excluding every other writer between reading the tail and
        writing; return the record written (None if ``build`` declined)."""

    @abstractmethod
    def records(self) -> Records:
        """Every stored record, oldest first, as ``(where, text)`` (``where``: e.g. ``line 7``)."""

    def close(self) -> None:  # noqa: B027 - optional: most sinks hold nothing open
        """Release what the anchor holds open (connections)."""

    def after_fork(self) -> None:  # noqa: B027 - optional
        """Called in a forked child before it uses the anchor (drop inherited connections)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


class FileAnchor(AuditAnchor):
    """An append-only JSON-lines file, shared by every process that opens it (see module)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.uri = self.path.as_uri() if self.path.is_absolute() else f"file:{self.path}"
        # flock excludes other processes; threads of one process take this lock first.
        self._lock = threading.Lock()

    def append(self, build: Build) -> str | None:
        import fcntl

        with self._lock:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
            except OSError as exc:
                raise StorageUnavailable(
                    f"the audit anchor {self.uri} cannot be opened: {exc.strerror}"
                ) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                tail, torn = _last_line(fd)
                made = build(tail)
                if made is None:
                    return None
                data = made[1].encode() + b"\n"
                if torn:
                    # A line cut short by a crash stays visible as its own (invalid) line.
                    data = b"\n" + data
                while data:
                    data = data[os.write(fd, data) :]
                os.fsync(fd)
                return made[1]
            except OSError as exc:
                raise StorageUnavailable(
                    f"the audit anchor {self.uri} cannot be written: {exc.strerror}"
                ) from exc
            finally:
                os.close(fd)  # releases the flock

    def records(self) -> Records:
        import fcntl

        try:
            handle = self.path.open("rb")
        except FileNotFoundError:
            return
        with handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH)  # no half-written line
            for number, raw in enumerate(handle, 1):
                yield f"line {number}", raw.rstrip(b"\n").decode("utf-8", "replace")

    def after_fork(self) -> None:
        self._lock = threading.Lock()


def _last_line(fd: int) -> tuple[str | None, bool]:
    """The file's last complete line, and whether an incomplete one follows it."""
    size = os.fstat(fd).st_size
    if size == 0:
        return None, False
    torn = os.pread(fd, 1, size - 1) != b"\n"
    end = _rfind_newline(fd, size) if torn else size - 1
    if end < 0:
        return None, torn
    start = _rfind_newline(fd, end) + 1
    return os.pread(fd, end - start, start).decode("utf-8", "replace"), torn


def _rfind_newline(fd: int, before: int, chunk: int = 8192) -> int:
    """The offset of the last newline before ``before``, or -1."""
    while before > 0:
        start = max(0, before - chunk)
        found = os.pread(fd, before - start, start).rfind(b"\n")
        if found >= 0:
            return start + found
        before = start
    return -1


_anchor_metadata = MetaData()
anchor_table = Table(
    "charter_audit_anchor",
    _anchor_metadata,
    Column("position", BigInteger, primary_key=True, autoincrement=False),
    Column("record", Text, nullable=False),
)


class SqlAnchor(AuditAnchor):
    """A table in another database; its unique position chains concurrent writers (see module).

    The table is created on first use if it is missing (that needs CREATE once;
    afterwards the anchor's user needs only SELECT and INSERT).
    """

    def __init__(self, url: str, *, engine: Engine | None = None, retries: int = 50) -> None:
        self.engine = engine or make_engine(url, pool_size=1, max_overflow=2)
        self.uri = self.engine.url.render_as_string(hide_password=True)
        self.retries = retries
        self._ready = False

    def _prepare(self) -> None:
        if self._ready:
            return
        writer = self.engine.execution_options(**{WRITE_OPTION: True})  # SQLite: BEGIN IMMEDIATE
        for attempt in range(3):
            try:
                with writer.begin() as connection:
                    _anchor_metadata.create_all(connection, checkfirst=True)
                break
            except sa_exc.DBAPIError as exc:  # another process created it at the same time
                if attempt == 2:
                    with translate_errors():
                        raise exc
        self._ready = True

    def append(self, build: Build) -> str | None:
        self._prepare()
        t = anchor_table
        writer = self.engine.execution_options(**{WRITE_OPTION: True})
        for attempt in range(self.retries):
            try:
                with translate_errors(), writer.begin() as connection:
                    last = select(t.c.record).order_by(t.c.position.desc()).limit(1)
                    made = build(connection.execute(last).scalar())
                    if made is not None:
                        connection.execute(insert(t), {"position": made[0], "record": made[1]})
                return None if made is None else made[1]
            except Conflict as exc:
                if not isinstance(exc.__cause__, sa_exc.IntegrityError):
                    raise
                time.sleep(0.001 * attempt)  # another writer took the position: chain after it
        raise StorageUnavailable(f"the audit anchor {self.uri} stayed contended; retry shortly")

    def records(self) -> Records:
        t = anchor_table
        with translate_errors(), self.engine.connect() as connection:
            if not self._ready and not inspect(connection).has_table(t.name):
                return  # nothing written yet (reading creates nothing)
            for position, record in connection.execute(select(t).order_by(t.c.position)):
                yield f"row {position}", record

    def close(self) -> None:
        self.engine.dispose()

    def after_fork(self) -> None:
        self.engine.dispose(close=False)  # the parent's connections are the parent's


def anchor_from_uri(uri: str | AuditAnchor | None) -> AuditAnchor | None:
    """``file:…`` or a path, a SQLAlchemy URL, or ``none`` (see the module docstring)."""
    if uri is None or isinstance(uri, AuditAnchor):
        return uri
    text = uri.strip()
    if text.lower() in ("", "none"):
        return None
    if text.startswith("file:"):
        parsed = urlparse(text)
        if parsed.netloc not in ("", "localhost"):
            raise ConfigurationError(f"audit anchor {text!r}: a file URI names no host")
        return FileAnchor(url2pathname(parsed.path))
    if "://" in text:
        try:
            return SqlAnchor(text)
        except (sa_exc.ArgumentError, ImportError) as exc:
            raise ConfigurationError(f"audit anchor {text!r} is not a database URL") from exc
    return FileAnchor(text)


# -- records ---------------------------------------------------------------------------


def _canonical(body: Mapping[str, Any]) -> str:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _seal(keyring: AuditKeyring, body: Mapping[str, Any]) -> str:
    sealed = {**body, "v": ANCHOR_FORMAT, "key_id": keyring.current_id}
    sealed["mac"] = keyring.mac(_canonical(sealed).encode())
    return _canonical(sealed)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class _Unreadable(Exception):
    def __init__(self, reason: str, position: int | None = None) -> None:
        super().__init__(reason)
        self.position = position  # where an altered record stood, if it still says


def _open(text: str, keyring: AuditKeyring) -> dict[str, Any]:
    """The record's fields if ``text`` is a record this keyring signed; else _Unreadable."""
    try:
        body = json.loads(text)
        mac = body.pop("mac")
        authentic = keyring.check(_canonical(body).encode(), str(body["key_id"]), str(mac))
        int(body["position"])
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise _Unreadable("is not an anchor record (edited, or a write cut short)") from exc
    if not authentic or body.get("v") != ANCHOR_FORMAT:
        raise _Unreadable("has an invalid MAC: edited or forged", int(body["position"]))
    return dict(body)


def _following(tail: str | None, keyring: AuditKeyring) -> tuple[int, str, str | None]:
    """(position, prev hash, anchor identity) of the record that follows ``tail``."""
    if tail is None:
        return 1, "", None
    try:
        last = _open(tail, keyring)
    except _Unreadable as exc:
        raise AuditIntegrityError(
            f"the audit anchor's last record {exc}: nothing can be chained to it"
        ) from exc
    return int(last["position"]) + 1, _digest(tail), str(last["anchor"])


def anchor_identity(anchor: AuditAnchor, keyring: AuditKeyring, now: datetime) -> str:
    """The anchor's identity, from its first record; an empty anchor gets its genesis record."""

    def genesis(tail: str | None) -> tuple[int, str] | None:
        if tail is not None:
            return None
        body = {"anchor": uuid.uuid4().hex, "position": 1, "prev": "", "kind": GENESIS}
        return 1, _seal(keyring, {**body, "at": utc_text(now)})

    anchor.append(genesis)
    with closing(anchor.records()) as records:
        for _where, text in records:
            try:
                return str(_open(text, keyring)["anchor"])
            except _Unreadable:
                continue  # verify reports it; the identity is in every record
    raise AuditIntegrityError(f"the audit anchor {anchor.uri} holds no readable record")


def anchor_checkpoint(anchor: AuditAnchor, keyring: AuditKeyring, row: Mapping[str, Any]) -> str:
    """Append a checkpoint row (as :mod:`charter.audit.checkpoint` wrote it) to its anchor."""

    def record(tail: str | None) -> tuple[int, str]:
        position, prev, identity = _following(tail, keyring)
        if identity != row["anchor"]:
            raise AuditIntegrityError(
                f"the audit anchor {anchor.uri} was emptied or replaced since this process "
                f"read it (it was anchor {row['anchor']}, now {identity})",
                replaced=True,
            )
        body = {
            "anchor": identity,
            "position": position,
            "prev": prev,
            "kind": row["kind"],
            "at": utc_text(row["at"]),
            "checkpoint": int(row["position"]),
            "signature": row["signature"],
            "heads": row["heads"],
        }
        return position, _seal(keyring, body)

    written = anchor.append(record)
    assert written is not None  # record() never declines
    return written


# -- reading ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AnchorRecord:
    """One authentic anchor record (its MAC checked)."""

    where: str
    position: int
    kind: str
    at: str
    checkpoint: int | None = None
    signature: str | None = None
    heads: Mapping[str, list[Any]] = field(default_factory=dict)


@dataclass(slots=True)
class AnchorReading:
    """What an anchor holds: its authentic records, and what is wrong with it."""

    uri: str
    identity: str | None = None
    count: int = 0
    records: list[AnchorRecord] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def read_anchor(anchor: AuditAnchor, keyring: AuditKeyring) -> AnchorReading:
    """Read and check every record: MAC, identity, positions and the hash chain."""
    reading = AnchorReading(anchor.uri)
    expected, prev, trust_prev = 1, "", True
    try:
        with closing(anchor.records()) as records:
            for where, text in records:
                reading.count += 1
                try:
                    body = _open(text, keyring)
                except _Unreadable as exc:
                    reading.problems.append(f"{where} of the anchor {exc}")
                    trust_prev = False  # the next record follows the original, not this text
                    if exc.position is not None:  # an altered record still holds its place
                        expected = exc.position + 1
                    continue
                _follow(reading, where, body, expected, prev if trust_prev else None)
                expected, prev, trust_prev = int(body["position"]) + 1, _digest(text), True
    except (OSError, StorageUnavailable) as exc:
        reading.problems.append(f"the anchor {anchor.uri} cannot be read: {exc}")
    return reading


def _follow(
    reading: AnchorReading, where: str, body: Mapping[str, Any], expected: int, prev: str | None
) -> None:
    position = int(body["position"])
    if reading.identity is None:
        reading.identity = str(body["anchor"])
    elif body["anchor"] != reading.identity:
        reading.problems.append(
            f"{where} (anchor record {position}) belongs to another anchor ({body['anchor']})"
        )
        return
    if position > expected:
        span = (
            f"record {expected}"
            if position == expected + 1
            else f"records {expected}-{position - 1}"
        )
        reading.problems.append(f"anchor {span} missing before {where}: removed from the anchor")
    elif position < expected or (prev is not None and body["prev"] != prev):
        reading.problems.append(
            f"{where} (anchor record {position}) does not follow the record before it: "
            "a record was replaced or reordered"
        )
    reading.records.append(
        AnchorRecord(
            where=where,
            position=position,
            kind=str(body["kind"]),
            at=str(body["at"]),
            checkpoint=body.get("checkpoint"),
            signature=body.get("signature"),
            heads=body.get("heads") or {},
        )
    )
