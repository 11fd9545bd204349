"""Rate limits per (tenant, actor, rate class), counted by the ``limits`` library's storage.

* :mod:`.classes` — :class:`RateClass` (a limit, a concurrency limit, a failure
  mode) and the default class of every action;
* :mod:`.store` — the counts, in a store chosen by URI (``memory://``,
  ``redis://``): one round trip per check;
* :mod:`.limiter` — :class:`RateLimiter`: the check, the failure modes, the
  ``RateLimit`` fields;
* :mod:`.denials` — limit denials audited aggregated;
* :mod:`.stage` — the ``rate_limit`` stage of the gate's pipeline.

Enable it with ``Charter(rate_limits="memory://")`` (this process) or
``Charter(rate_limits="redis://host:6379/0")`` (shared), or pass a
:class:`RateLimiter` with classes of your own.
"""

from .classes import ANONYMOUS, DEFAULT_CLASSES, FailureMode, RateClass, default_class_of
from .denials import SUMMARY, DenialLog
from .limiter import FAIL_OPEN, RateLimiter, RateState, rate_headers

__all__ = [
    "ANONYMOUS",
    "DEFAULT_CLASSES",
    "FAIL_OPEN",
    "SUMMARY",
    "DenialLog",
    "FailureMode",
    "RateClass",
    "RateLimiter",
    "RateState",
    "default_class_of",
    "rate_headers",
]
