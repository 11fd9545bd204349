"""Objects that must act when their process exits or forks: watched weakly, hooks installed once.

A :class:`ProcessHooks` registers its ``atexit`` hook and its fork hook the
first time it watches an object (no side effect at import), and then calls them
on each watched object still alive. It holds them weakly: an object nobody else
keeps is never kept alive, nor called, by its hook. ``atexit`` runs hooks in
the reverse order of their registration, so the audit checkpointer (registered
when a Charter is built) takes its final checkpoint after the rate limit's
denial summaries (registered at the first denial) are written.
"""

from __future__ import annotations

import atexit
import os
import threading
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["ProcessHooks"]

T = TypeVar("T")


class ProcessHooks(Generic[T]):
    """``at_exit(obj)`` at interpreter exit, ``after_fork(obj)`` in a forked child."""

    def __init__(self, *, at_exit: Callable[[T], None], after_fork: Callable[[T], None]) -> None:
        self._at_exit = at_exit
        self._after_fork = after_fork
        self._live: weakref.WeakSet[T] = weakref.WeakSet()
        self._installed = False
        self._lock = threading.Lock()

    def __contains__(self, obj: object) -> bool:
        return obj in self._live

    def watch(self, obj: T) -> None:
        self._live.add(obj)
        if self._installed:
            return
        with self._lock:
            if self._installed:
                return
            self._installed = True
            atexit.register(self._exit)
            if hasattr(os, "register_at_fork"):
                os.register_at_fork(after_in_child=self._fork)

    def forget(self, obj: T) -> None:
        self._live.discard(obj)

    def _exit(self) -> None:
        for obj in list(self._live):
            self._at_exit(obj)

    def _fork(self) -> None:
        for obj in list(self._live):
            self._after_fork(obj)
