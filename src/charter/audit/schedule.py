"""Checkpoints on a schedule, written by every process that runs the gate.

A :class:`~charter.Charter` owns one :class:`AuditCheckpointer`. It starts a
daemon thread lazily, when the process commits its first audit entry, and
writes a checkpoint (then its anchor record) every ``interval`` (60 s by
default) or every ``entries`` entries, whichever comes first, as long as the
process wrote something since the last one. Each process signs the heads its
own streams reached, from memory (:meth:`~charter.audit.AuditTrail.dirty_heads`):
no read of the audit table, no lock that a gate transaction waits on. Its first
checkpoint signs every stream's head, read from the table, so the tail that a
process which died before its next checkpoint left behind is covered by the
next process to start.

Lifetime: :meth:`close` (``Charter.close()``) stops the thread and writes a
final checkpoint; disposing the engine (``charter.engine.dispose()``) stops the
thread too, without writing, and the next entry starts it again; interpreter
exit writes the final checkpoint of every checkpointer still running. A forked
child starts its own thread on its first entry (the parent's does not survive
``fork``), with fresh streams (:mod:`charter.audit.trail`).

A checkpoint whose anchor append failed stays in the database and is appended
again on the next run; until then ``charter audit verify`` reports it missing
from the anchor (once it is older than :data:`~charter.audit.verify.ANCHOR_GRACE`).

For tests, :meth:`checkpoint_now` runs the scheduled checkpoint synchronously.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

from ..errors import AuditIntegrityError, ConfigurationError
from ..lifecycle import ProcessHooks
from .anchor import AuditAnchor, anchor_checkpoint, anchor_identity
from .checkpoint import write_checkpoint
from .prune import Pruned, prune
from .trail import AuditKeyring, AuditTrail
from .verify import VerificationReport

# Our own generator: the random module's shared one is other code's (tests seed it).
_JITTER = random.Random()  # noqa: S311 - jitter, not a secret

__all__ = ["DEFAULT_INTERVAL", "AuditCheckpointer"]

log = logging.getLogger("charter.audit")

DEFAULT_INTERVAL = timedelta(seconds=60)
# How long stopping waits for a checkpoint under way before leaving it to finish alone.
_JOIN_SECONDS = 30.0


class AuditCheckpointer:
    """Writes one Charter's checkpoints and anchor records (see the module docstring)."""

    def __init__(
        self,
        engine: Engine,
        keyring: AuditKeyring,
        trail: AuditTrail,
        *,
        clock: Callable[[], datetime],
        anchor: AuditAnchor | None = None,
        interval: timedelta | None = DEFAULT_INTERVAL,
        entries: int | None = None,
    ) -> None:
        if interval is not None and interval <= timedelta(0):
            raise ConfigurationError("checkpoint_interval must be positive (or None)")
        if entries is not None and entries < 1:
            raise ConfigurationError("checkpoint_entries must be at least 1 (or None)")
        self.engine = engine
        self.keyring = keyring
        self.trail = trail
        self.clock = clock
        self.anchor = anchor
        self.interval = interval
        self.entries = entries
        # An in-memory SQLite database is one connection (or one per thread): a
        # second thread cannot use it safely, so it is checkpointed only on
        # checkpoint_now() and close().
        self._enabled = (interval is not None or entries is not None) and not _in_memory(engine)
        self._closed = False
        self._identity: str | None = None
        self._unanchored: list[dict[str, Any]] = []
        self._fresh_state()
        trail.observer = self.notice
        event.listen(engine, "engine_disposed", self._on_dispose)
        PROCESS_HOOKS.watch(self)

    def _fresh_state(self) -> None:
        self._state = threading.Lock()  # guards the thread's lifecycle
        self._running = threading.Lock()  # one checkpoint at a time
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()  # each thread gets its own: a late one never resumes
        self._paused = False
        self._pending = 0
        self._full = True  # a process's first checkpoint signs every stream

    # -- the writers' side (on every commit: cheap) ------------------------------------

    def notice(self, count: int) -> None:
        """``count`` entries were committed (the trail's observer)."""
        self._pending += count  # a lost update only delays the trigger by one commit
        if self._thread is None and self._enabled:
            self._start()
        if self.entries is not None and self._pending >= self.entries:
            self._wake.set()

    def _start(self) -> None:
        with self._state:
            if self._thread is not None or self._closed:
                return
            self._paused = False
            self._stop = stop = threading.Event()
            thread = threading.Thread(
                target=self._loop, args=(stop,), name="charter-audit-checkpoints", daemon=True
            )
            try:
                thread.start()
            except RuntimeError:  # the commit that called us succeeded: never fail it
                log.warning("cannot start the audit checkpoint thread", exc_info=True)
                return
            self._thread = thread

    # -- the thread ----------------------------------------------------------------------

    def _loop(self, stop: threading.Event) -> None:
        while True:
            self._wake.wait(self._timeout())
            if stop.is_set():
                return
            self._wake.clear()
            if self._pending or self._unanchored:
                pool = self.engine.pool
                try:
                    self.checkpoint_now()
                except Exception:
                    log.warning("audit checkpoint failed; the next run retries", exc_info=True)
                if self.engine.pool is not pool:
                    # The engine was disposed during the run: our connection went back
                    # to the old pool, which nobody will close.
                    pool.dispose()
                    self.engine.pool.dispose()

    def _timeout(self) -> float | None:
        if self.interval is None:
            return None
        # Up to 10% early, so the workers of one service do not all checkpoint at once.
        return self.interval.total_seconds() * (1 - _JITTER.random() / 10)

    # -- checkpoints -------------------------------------------------------------------------

    def checkpoint_now(self) -> dict[str, Any] | None:
        """Write the scheduled checkpoint now, synchronously; None if nothing moved since.

        Signs the heads this process's streams reached (every stream's on the
        first run), then appends it and any earlier unanchored checkpoint to the
        anchor; raises if the anchor append fails (the next run retries it).
        """
        with self._running:
            self._pending = 0  # entries committed from here on count toward the next one
            heads = None if self._full else self.trail.dirty_heads()
            row = None
            if heads is None or heads:
                row = self._write(heads)
                self._full = False
            self._flush_anchor()
            return row

    def checkpoint_all(self) -> dict[str, Any]:
        """Sign every stream's head, read from the table (``charter audit checkpoint``)."""
        with self._running:
            row = self._write(None)
            self._flush_anchor()
            return row

    def prune(self, before: datetime, *, verified: VerificationReport) -> Pruned:
        """Prune entries older than ``before`` (:func:`charter.audit.prune.prune`), anchored."""
        with self._running:
            pruned = prune(
                self.engine, self.keyring, self.clock(), before,
                verified=verified, anchor=self._anchor_identity(),
            )  # fmt: skip
            if pruned.record is not None and self.anchor is not None:
                self._unanchored.append(pruned.record)
            self._flush_anchor()
            return pruned

    def _write(self, heads: dict[str, Any] | None) -> dict[str, Any]:
        identity = self._anchor_identity()
        row = write_checkpoint(
            self.engine, self.keyring, self.clock(), heads=heads, anchor=identity
        )
        self.trail.checkpointed(row["heads"])
        if identity is not None:
            self._unanchored.append(row)
        return row

    def _anchor_identity(self) -> str | None:
        if self.anchor is None:
            return None
        if self._identity is None:
            self._identity = anchor_identity(self.anchor, self.keyring, self.clock())
        return self._identity

    def _flush_anchor(self) -> None:
        anchor = self.anchor
        while anchor is not None and self._unanchored:
            row = self._unanchored[0]
            try:
                anchor_checkpoint(anchor, self.keyring, row)
            except AuditIntegrityError as exc:
                self._identity = None  # re-read it on the next checkpoint
                if not exc.attrs.get("replaced"):
                    raise  # e.g. its last record was edited: verify reports it
                # Written for an anchor that is gone: no anchor can take it now, and
                # verify reports it missing. Later checkpoints go to the new anchor.
                log.error("audit checkpoint %s is lost to its anchor: %s", row["position"], exc)
            except Exception:
                self._identity = None
                raise
            self._unanchored.pop(0)

    # -- lifetime ------------------------------------------------------------------------------

    def _halt(self) -> None:
        with self._state:
            thread = self._thread
            self._stop.set()
            self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(_JOIN_SECONDS)
        with self._state:
            if self._thread is thread:
                self._thread = None
            self._wake.clear()

    def _on_dispose(self, _engine: Engine) -> None:
        self._halt()
        self._paused = True

    def close(self, *, final: bool = True) -> None:
        """Stop the thread and (``final``) checkpoint what this process wrote since the last one."""
        with self._state:
            if self._closed:
                return
            self._closed = True
        self._halt()
        if final and (self.trail.dirty_heads() or self._unanchored):
            try:
                self.checkpoint_now()
            except Exception:
                log.warning("final audit checkpoint failed", exc_info=True)
        PROCESS_HOOKS.forget(self)
        if event.contains(self.engine, "engine_disposed", self._on_dispose):
            event.remove(self.engine, "engine_disposed", self._on_dispose)

    @property
    def running(self) -> bool:
        """Whether the thread is alive (for tests and health checks)."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def _after_fork(self) -> None:
        self._fresh_state()
        self._unanchored = []  # the parent appends its own
        if self.anchor is not None:
            self.anchor.after_fork()


def _in_memory(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite" and engine.url.database in (None, "", ":memory:")


def _final_checkpoint(checkpointer: AuditCheckpointer) -> None:
    if not checkpointer._paused:  # a disposed engine is not reopened at exit
        checkpointer.close()


#: Checkpointers alive, weakly: each takes its final checkpoint at exit.
PROCESS_HOOKS: ProcessHooks[AuditCheckpointer] = ProcessHooks(
    at_exit=_final_checkpoint, after_fork=AuditCheckpointer._after_fork
)
