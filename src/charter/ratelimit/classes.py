"""Rate classes: what an action's calls are counted against, and what happens when the store fails.

A :class:`RateClass` is a value object, like ``limits.parse("100/minute")``: a
name (the ``RateLimit-Policy`` field's policy name), a limit per window, an
optional *concurrency* limit (at most N calls in flight per actor, after
Stripe's concurrent-request limiter) and a *failure mode*: what a call gets
when the shared store (Redis) cannot be reached — ``"closed"`` refuses it (503
with ``Retry-After``), ``"open"`` counts it in this process instead and writes
an audited warning.

Every action has a class: its declared ``rate=``, else one chosen from what it
is (:func:`default_class_of`): an export or a financial action gets a
stricter, fail-closed class than a read.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

from limits import RateLimitItem, parse

from ..errors import ConfigurationError

__all__ = [
    "ANONYMOUS",
    "DEFAULT_CLASSES",
    "MAX_AMOUNT",
    "MAX_WINDOW",
    "FailureMode",
    "RateClass",
    "default_class_of",
]

FailureMode = Literal["open", "closed"]

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")

#: The class every HTTP request without an accepted credential counts against, per address.
ANONYMOUS = "anonymous"

#: The largest limit or concurrency: a structured field's integer has at most 15 digits
#: (RFC 9651 section 3.3.1), and the ``RateLimit`` fields carry both.
MAX_AMOUNT = 999_999_999_999_999
#: The longest window, in seconds (about 100 years): its reset must be a date ``datetime``
#: can hold, and its ``w`` and ``t`` members stay far below 15 digits.
MAX_WINDOW = 100 * 365 * 24 * 3600


@dataclass(frozen=True, slots=True)
class RateClass:
    """One rate class (see the module docstring).

    ``limit`` is a ``limits`` rate string (``"100/minute"``, ``"10/second"``);
    ``concurrency`` at most that many calls of the class in flight per actor,
    each slot held at most ``concurrency_ttl`` (so a worker that dies frees it).
    """

    name: str
    limit: str
    fail: FailureMode = "open"
    concurrency: int | None = None
    concurrency_ttl: timedelta = timedelta(minutes=5)
    amount: int = field(init=False, repr=False, compare=False)
    #: The window's length in seconds (the ``RateLimit-Policy`` ``w`` parameter).
    window: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ConfigurationError(
                f"rate class name {self.name!r} must be lowercase letters, digits, - or _ "
                "(at most 32 characters)"
            )
        item = self.item  # parses: a bad limit fails at start-up
        object.__setattr__(self, "amount", int(item.amount))
        object.__setattr__(self, "window", int(item.get_expiry()))
        self._check_bounds()
        if self.fail not in ("open", "closed"):
            raise ConfigurationError(f"rate class {self.name}: fail must be 'open' or 'closed'")
        if self.concurrency is not None and (
            isinstance(self.concurrency, bool)
            or not isinstance(self.concurrency, int)
            or not 1 <= self.concurrency <= MAX_AMOUNT
        ):
            raise ConfigurationError(
                f"rate class {self.name}: concurrency must be from 1 to {MAX_AMOUNT:_}"
            )
        if self.concurrency_ttl.total_seconds() < 1:
            raise ConfigurationError(f"rate class {self.name}: concurrency_ttl must be >= 1 s")

    def _check_bounds(self) -> None:
        """A limit that allows one call, and that the ``RateLimit`` fields can state."""
        if self.amount < 1:
            raise ConfigurationError(f"rate class {self.name}: the limit must allow one call")
        if self.amount > MAX_AMOUNT:
            raise ConfigurationError(
                f"rate class {self.name}: at most {MAX_AMOUNT:_} calls per window (the RateLimit "
                "fields' integers have at most 15 digits, RFC 9651)"
            )
        if not 1 <= self.window <= MAX_WINDOW:
            raise ConfigurationError(
                f"rate class {self.name}: the window must be from 1 second to 100 years"
            )

    @property
    def item(self) -> RateLimitItem:
        try:
            items = [parse(self.limit)] if isinstance(self.limit, str) else []
        except ValueError as exc:
            raise ConfigurationError(
                f"rate class {self.name}: {self.limit!r} is not a rate such as '100/minute'"
            ) from exc
        if not items:
            raise ConfigurationError(f"rate class {self.name}: the limit must be a string")
        return items[0]


#: The classes a :class:`~charter.ratelimit.RateLimiter` knows without being told.
DEFAULT_CLASSES: Mapping[str, RateClass] = {
    c.name: c
    for c in (
        RateClass("read", "600/minute"),
        RateClass("write", "300/minute"),
        RateClass("financial", "60/minute", fail="closed"),
        RateClass("export", "10/minute", fail="closed", concurrency=2),
        RateClass(ANONYMOUS, "120/minute"),  # per client address, before authentication
    )
}


def default_class_of(spec: Any) -> str:
    """The class of an action declared without ``rate=``.

    ``financial`` for an action tagged ``financial`` (an action with a credit
    cost is, without saying so); ``export`` for one tagged ``export`` or whose
    verb is ``export`` (``invoice.export``, ``invoice.export_csv``); ``read``
    for a sensitive read; ``write`` otherwise.
    """
    tags = set(getattr(spec, "tags", None) or ())
    if "financial" in tags:
        return "financial"
    if "export" in tags or str(spec.name).rpartition(".")[2].startswith("export"):
        return "export"
    return "read" if spec.sensitive_read else "write"


def class_table(
    classes: Iterable[RateClass] | Mapping[str, RateClass] | None,
) -> dict[str, RateClass]:
    """The defaults, with ``classes`` added or replacing the default of the same name."""
    table = dict(DEFAULT_CLASSES)
    given = classes.values() if isinstance(classes, Mapping) else (classes or ())
    for c in given:
        if not isinstance(c, RateClass):
            raise ConfigurationError(f"rate classes must be RateClass values, not {c!r}")
        table[c.name] = c
    return table
