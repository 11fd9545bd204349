"""Impersonation grants: who may act on behalf of whom, with which scopes.

Token parsing only says who *claims* to act for whom (``X-On-Behalf-Of``).
Whether the claim is honoured is decided here, by the gate, on every call and
every channel, from grants the application declares::

    charter.allow_impersonation(
        "support-for-staff",
        by="support",                        # a role the real actor holds
        of_roles={"member", "approver"},     # every role the subject holds is one of these
        scopes={"invoices:read", "invoices:write"},
    )

The default is no grant, and so no impersonation at all. A grant matches when

* the real actor and the subject are in the same tenant (never across tenants);
* the real actor holds one of the ``by`` roles (its *own* roles, not the subject's);
* the subject's kind is one of ``of_kinds`` (users only, by default) and
  **every** role the subject holds is in ``of_roles``, so a subject who is also
  an admin is out of reach of a grant for members;
* the subject is not the real actor.

The matching grants' scopes (their union) become the actor's
``granted_scopes``: under impersonation an action runs only if its scope is in
the credential's scopes, in the granted scopes and, when the subject carries a
set of its own, in the subject's. Without a matching grant nothing runs: the
action's scope gate explains the denial as ``impersonation-grant``, and the
denial is audited like any other. Impersonation also always needs a reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .actor import Actor, ActorKind
from .errors import ConfigurationError

__all__ = ["ImpersonationGrant", "ImpersonationGrants"]


def _names(value: str | Iterable[str], what: str, grant: str) -> frozenset[str]:
    names = frozenset([value] if isinstance(value, str) else value)
    if not names or any(not isinstance(n, str) or not n.strip() for n in names):
        raise ConfigurationError(f"impersonation grant {grant!r}: {what} must name at least one")
    return names


@dataclass(frozen=True, slots=True)
class ImpersonationGrant:
    """One declared permission to act on behalf of others (see the module docstring)."""

    name: str
    by: frozenset[str]
    of_roles: frozenset[str]
    of_kinds: frozenset[ActorKind]
    scopes: frozenset[str]

    @classmethod
    def declare(
        cls,
        name: str,
        *,
        by: str | Iterable[str],
        of_roles: str | Iterable[str],
        scopes: str | Iterable[str],
        of_kinds: str | Iterable[str] = (ActorKind.USER,),
    ) -> ImpersonationGrant:
        if not isinstance(name, str) or not name.strip():
            raise ConfigurationError("an impersonation grant needs a name (it is audited)")
        try:
            kinds = frozenset(ActorKind(k) for k in _names(of_kinds, "of_kinds", name))
        except ValueError as exc:
            raise ConfigurationError(f"impersonation grant {name!r}: {exc}") from None
        return cls(
            name=name,
            by=_names(by, "by", name),
            of_roles=_names(of_roles, "of_roles", name),
            of_kinds=kinds,
            scopes=_names(scopes, "scopes", name),
        )

    def matches(self, actor: Actor, subject: Actor) -> bool:
        return (
            not self.by.isdisjoint(actor.roles)
            and subject.kind in self.of_kinds
            and subject.roles <= self.of_roles
        )


class ImpersonationGrants:
    """The declared grants; :meth:`resolve` is the gate's check (none declared: none allowed)."""

    def __init__(self) -> None:
        self._grants: dict[str, ImpersonationGrant] = {}

    def add(self, grant: ImpersonationGrant) -> ImpersonationGrant:
        if grant.name in self._grants:
            raise ConfigurationError(f"impersonation grant {grant.name!r} is declared twice")
        self._grants[grant.name] = grant
        return grant

    @property
    def declared(self) -> tuple[ImpersonationGrant, ...]:
        return tuple(self._grants.values())

    def matching(self, actor: Actor) -> tuple[ImpersonationGrant, ...]:
        """The grants that let ``actor`` act for its subject (empty when not impersonating)."""
        subject = actor.on_behalf_of
        if subject is None or subject.tenant != actor.tenant or subject.id == actor.id:
            return ()
        return tuple(g for g in self._grants.values() if g.matches(actor, subject))

    def resolve(self, actor: Actor) -> Actor:
        """The actor the gate decides for: under impersonation, with its granted scopes.

        Whatever ``granted_scopes`` the caller set is replaced: only a declared
        grant puts scopes there. No matching grant leaves ``None``, which allows
        nothing.
        """
        if actor.on_behalf_of is None:
            return actor if actor.granted_scopes is None else actor.granted(None)
        grants = self.matching(actor)
        scopes = frozenset().union(*(g.scopes for g in grants)) if grants else None
        if scopes == actor.granted_scopes:
            return actor
        return actor.granted(scopes)
