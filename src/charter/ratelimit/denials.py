"""Limit denials in the audit trail, aggregated: a flood must not flood the trail.

The first denial of an (actor, class, window) is audited at once, with who,
what and which limit. Every further denial of that window in this process is
only counted; when the window closes, one summary entry records how many there
were (outcome ``rate_limited_summary``, ``detail.denied``). So a flood costs
the trail at most two entries per actor, class and window in each process:

* with a shared store (Redis) the *first* denial is the one whose count is the
  limit plus one, which exactly one call in all processes sees: it alone is
  audited at once; every process summarises the denials it refused itself.
  A check that does not count (a request with a credential, checked against
  its address's count: :meth:`~charter.ratelimit.RateLimiter.peek`) refused on
  the limit itself comes before any such call, so it is recorded as a first
  too: a process's first one is audited at once (several processes refusing
  on the limit may each write one; still two entries per process at most),
  and a counted first that comes after it in the same process is summarised;
* a background thread (started at the first denial) writes the summaries of
  closed windows every second, and ends when no window is left to summarise;
  :meth:`DenialLog.close` writes those still open, with the count so far.
  Disposing the Charter's engine stops the thread without writing
  (:meth:`DenialLog.pause`, as the audit checkpoints do): the windows stay
  counted, and the next denial or :meth:`close` writes them.
* a process that exits without :meth:`close` (a web worker stopping) writes
  the open windows' summaries at interpreter exit (``atexit``, as the audit
  checkpoints do; a log whose engine was disposed is not reopened then). A
  forked child forgets its parent's windows: the parent summarises them.

A denial whose entry cannot be written (the database is down) is still
refused: the failure is logged, never raised to the caller.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from datetime import UTC, datetime

from ..audit.entry import AuditEntry
from ..errors import CharterError
from ..lifecycle import ProcessHooks

__all__ = ["SUMMARY", "DenialLog"]

log = logging.getLogger("charter.ratelimit")

SUMMARY = "rate_limited_summary"
#: At most this many windows are counted at once; past it the oldest are summarised early.
MAX_PENDING = 10_000


@dataclass(slots=True)
class _Pending:
    entry: AuditEntry  # the first denial's entry: the summary is written in its name
    closes: datetime
    count: int = 0


class DenialLog:
    """The aggregated audit of limit denials (see the module docstring)."""

    def __init__(
        self,
        write: Callable[[AuditEntry], None] | None = None,
        clock: Callable[[], datetime] | None = None,
        *,
        interval: float = 1.0,
    ) -> None:
        self._write = write
        self._clock = clock or (lambda: datetime.now(UTC))
        self.interval = interval
        self._pending: dict[Hashable, _Pending] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()  # closed: no writer ever again
        self._halt = threading.Event()  # this writer: stop (paused, or closed)
        self._thread: threading.Thread | None = None
        self._paused = False  # the engine was disposed: not reopened at exit

    def bind(self, write: Callable[[AuditEntry], None], clock: Callable[[], datetime]) -> None:
        self._write, self._clock = write, clock

    def denied(
        self,
        key: Hashable,
        *,
        first: bool,
        closes: datetime,
        entry: Callable[[], AuditEntry],
    ) -> None:
        """Record one denial of ``key``'s window.

        ``first``: no counted call anywhere was denied before this one (it may
        be the window's first denial): audited at once, unless this process
        has already recorded a denial of the window. Otherwise the denial is
        only counted, for the window's summary.
        """
        with self._lock:
            pending = self._pending.get(key)
            if pending is not None:
                pending.count += 1
                return
            pending = self._pending[key] = _Pending(entry(), closes, 0 if first else 1)
            crowded = len(self._pending) > MAX_PENDING
        PROCESS_HOOKS.watch(self)
        if first:
            self._append(pending.entry)
        if crowded:
            self.flush(everything=True)
        self._start()

    def flush(self, now: datetime | None = None, *, everything: bool = False) -> int:
        """Write the summary of every window closed by ``now`` (all: ``everything``)."""
        now = now or self._clock()
        with self._lock:
            due = [k for k, p in self._pending.items() if everything or p.closes <= now]
            closed = [self._pending.pop(k) for k in due]
        summaries = [summary(p, now) for p in closed if p.count]
        for entry in summaries:
            self._append(entry)
        return len(summaries)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        """Stop the background writer and summarise every window still open."""
        self._stop.set()
        self.pause()
        self.flush(everything=True)

    def pause(self, *_engine: object) -> None:
        """Stop the background writer, writing nothing: the next denial starts it again.

        Also an ``engine_disposed`` listener (the engine is its argument).
        """
        with self._lock:
            thread, self._thread = self._thread, None
            self._halt.set()
            self._paused = not self._stop.is_set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def append(self, entry: AuditEntry) -> None:
        """Write one entry now (not aggregated): the fail-open warning."""
        self._append(entry)

    def _append(self, entry: AuditEntry) -> None:
        if self._write is None:
            log.warning("rate limit denial not audited (no audit trail bound): %s", entry.action)
            return
        try:
            self._write(entry)
        except CharterError:
            log.exception("could not audit a rate limit denial of %s", entry.action)

    def _start(self) -> None:
        if self._thread is not None or self._stop.is_set():
            return
        with self._lock:
            if self._thread is None:
                self._paused = False
                self._halt = halt = threading.Event()
                self._thread = threading.Thread(
                    target=self._run, args=(halt,), name="charter-ratelimit-audit", daemon=True
                )
                self._thread.start()

    def _run(self, halt: threading.Event) -> None:
        while not halt.wait(self.interval):
            try:
                self.flush()
            except Exception:  # never let the writer die: the next round retries
                log.exception("rate limit denial summaries failed; will retry")
            with self._lock:  # under the lock denied() adds under: none is left behind
                if not self._pending:
                    if self._thread is threading.current_thread():
                        self._thread = None
                    return

    def _at_exit(self) -> None:
        """Summarise the windows still open as the process exits; log, never raise."""
        if self._stop.is_set() or self._paused or not self._pending:
            return
        try:
            self.close()
        except Exception:  # the database may be gone already: the operator must know
            log.exception("rate limit denial summaries could not be written at exit")

    def _after_fork(self) -> None:
        """In a forked child: none of the parent's windows (it summarises them) or threads."""
        self._lock = threading.Lock()  # it may have been held at the fork
        self._pending, self._thread, self._halt = {}, None, threading.Event()


#: Logs with windows counted, weakly: their open windows are summarised at exit.
PROCESS_HOOKS: ProcessHooks[DenialLog] = ProcessHooks(
    at_exit=DenialLog._at_exit, after_fork=DenialLog._after_fork
)


def summary(pending: _Pending, now: datetime) -> AuditEntry:
    """The summary entry of one closed window: the first denial's identity, the count."""
    first = pending.entry
    return dataclasses.replace(
        first,
        at=now,
        outcome=SUMMARY,
        request_id=None,
        detail={
            **(first.detail or {}),
            "denied": pending.count,
            "window_closes": pending.closes.isoformat(),
        },
    )
