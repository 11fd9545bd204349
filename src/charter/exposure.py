"""Agent exposure: an action opts in to being a tool that automated agents call (issue 12).

An action is never a tool unless its declaration says so::

    @charter.action("invoice.get", on=Invoice, ..., agent=True)
    @charter.action("invoice.void", on=Invoice, ..., agent=Agent(confirm=True))

``agent=True`` exposes it; :class:`Agent` says more: ``confirm`` (a person must
approve the agent's call before it runs, within ``expires``), ``description``
(the tool's description, else the handler's docstring) and ``approvers`` (roles
whose holders may approve besides the user the agent acts for). The channel
that serves the tools is :mod:`charter.integrations.agent`; which tools an
actor sees is :func:`charter.agent_tools.tool_definitions`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from .errors import ConfigurationError

__all__ = ["DEFAULT_CONFIRMATION_TTL", "MAX_CONFIRMATION_TTL", "Agent", "as_agent"]

#: How long a pending confirmation waits for a person, unless the action says otherwise.
DEFAULT_CONFIRMATION_TTL = timedelta(hours=24)
#: The longest an action may let a request wait: past it, the context it was asked in is gone.
MAX_CONFIRMATION_TTL = timedelta(days=7)
_MAX_DESCRIPTION = 2000


@dataclass(frozen=True, slots=True)
class Agent:
    """How an action is exposed to agents (see the module docstring).

    ``confirm``: the agent's call leaves a pending request that a person other
    than the agent approves; the action is decided again, in full, when it is.
    ``expires``: how long the request waits (default 24 h, at most 7 days).
    ``approvers``: roles whose holders may approve besides the user the agent
    acts for (default none: only that user).
    """

    confirm: bool = False
    description: str | None = None
    expires: timedelta = DEFAULT_CONFIRMATION_TTL
    approvers: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "approvers", frozenset(self.approvers))

    @property
    def confirmation(self) -> bool:
        """Whether a person must confirm (the name ``charter check`` reads)."""
        return self.confirm


def as_agent(action: str, value: Any) -> Agent | None:
    """Check an ``agent=`` declaration: ``None``/``False`` (not exposed), ``True`` or an Agent."""
    if value is None or value is False:
        return None
    if value is True:
        return Agent()
    if not isinstance(value, Agent):
        raise ConfigurationError(f"action {action}: agent= is True, False or an Agent(...)")
    if not isinstance(value.confirm, bool):
        raise ConfigurationError(f"action {action}: Agent(confirm=) is True or False")
    if value.description is not None and (
        not isinstance(value.description, str)
        or not value.description.strip()
        or len(value.description) > _MAX_DESCRIPTION
    ):
        raise ConfigurationError(
            f"action {action}: Agent(description=) is a non-empty text of at most "
            f"{_MAX_DESCRIPTION} characters"
        )
    if not isinstance(value.expires, timedelta) or not (
        timedelta(minutes=1) <= value.expires <= MAX_CONFIRMATION_TTL
    ):
        raise ConfigurationError(
            f"action {action}: Agent(expires=) is a timedelta from 1 minute to 7 days"
        )
    if value.approvers and not value.confirm:
        raise ConfigurationError(f"action {action}: Agent(approvers=) needs confirm=True")
    _roles(action, value.approvers)
    return value


def _roles(action: str, roles: Iterable[Any]) -> None:
    if any(not isinstance(r, str) or not r.strip() for r in roles):
        raise ConfigurationError(f"action {action}: Agent(approvers=) names roles")
