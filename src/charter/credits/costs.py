"""What an action costs (``cost=``) and what it is (``tags=``), checked at declaration.

``cost=`` takes a fixed amount (``cost=5``: 5 minor units of the tenant's
``credits`` account), a function of the validated input and the locked
record (``cost=lambda data, invoice: ...``), a :class:`Cost` naming another
account, or a :class:`~charter.credits.quotas.Quota` (one use of a period
quota). An action with a credit cost is tagged ``financial`` without saying so.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import CharterError, ConfigurationError
from .amounts import check_amount
from .quotas import Quota

__all__ = ["DEFAULT_ACCOUNT", "TAGS", "Cost", "as_cost", "as_tags"]

DEFAULT_ACCOUNT = "credits"
#: The risk tags Charter knows; later checks (drift, agent tool hints) read them.
TAGS = frozenset({"financial", "irreversible", "admin", "export", "destructive"})
_ACCOUNT = re.compile(r"[a-z][a-z0-9_.-]{0,47}", re.ASCII)


@dataclass(frozen=True, slots=True)
class Cost:
    """``amount`` minor units of the actor's tenant's ``account``, fixed or computed per call."""

    amount: int | Callable[[Any, Any], int]
    account: str = DEFAULT_ACCOUNT

    def __post_init__(self) -> None:
        if not isinstance(self.account, str) or not _ACCOUNT.fullmatch(self.account):
            raise ConfigurationError(
                f"account name {self.account!r} must be lowercase letters, digits, '_.-' "
                "(at most 48; '@' names system accounts)"
            )
        if not callable(self.amount):
            check_amount(self.amount, what="a fixed cost")

    def amount_for(self, data: Any, record: Any) -> int:
        """This call's amount: the fixed one, or the function's, checked like any amount."""
        if callable(self.amount):
            return check_amount(self.amount(data, record), what="the action's cost")
        return self.amount


def as_cost(name: str, cost: Any) -> Cost | Quota | None:
    """Normalize an action's ``cost=`` (see the module docstring)."""
    if cost is None or isinstance(cost, Cost | Quota):
        return cost
    if not (callable(cost) or isinstance(cost, int)):
        raise ConfigurationError(
            f"action {name}: cost= takes an integer, a function (data, record) -> int, "
            "a Cost or a Quota"
        )
    try:
        return Cost(cost)
    except CharterError as exc:
        raise ConfigurationError(f"action {name}: cost= {exc.message}") from exc


def as_tags(name: str, tags: Iterable[str] | None, cost: Cost | Quota | None) -> frozenset[str]:
    """An action's risk tags: known names only; a credit cost adds ``financial``."""
    if isinstance(tags, str):
        raise ConfigurationError(f"action {name}: tags= is a set of names, not one string")
    found = frozenset(tags or ())
    unknown = sorted(str(t) for t in found - TAGS)
    if unknown:
        raise ConfigurationError(
            f"action {name}: unknown tag(s) {', '.join(unknown)}; known: {', '.join(sorted(TAGS))}"
        )
    return found | {"financial"} if isinstance(cost, Cost) else found
