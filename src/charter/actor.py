"""Who acts (:class:`Actor`) and where the call came from (:class:`Channel`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

__all__ = ["Actor", "ActorKind", "Channel"]


class ActorKind(StrEnum):
    USER = "user"
    SERVICE = "service"
    PARTNER = "partner"
    SUPPORT = "support"
    SYSTEM = "system"


class Channel(StrEnum):
    """Where a call entered. Recorded in the audit trail; it relaxes no rule by itself."""

    HTTP = "http"
    ADMIN = "admin"
    CLI = "cli"
    BATCH = "batch"
    WEBHOOK = "webhook"
    AGENT = "agent"


_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Actor:
    """An immutable description of who acts.

    ``scopes`` are the *credential's* scopes: they narrow what this token may do,
    whatever the roles say. ``"*"`` grants every scope; ``"invoices:*"`` every
    scope under ``invoices:``.

    For support impersonation, the actor is the real person and
    ``on_behalf_of`` the subject whose permissions apply; :attr:`subject`,
    :attr:`effective_scopes` and :attr:`tenant_id` resolve that for the gate.
    """

    id: str
    tenant: str
    kind: ActorKind = ActorKind.USER
    roles: frozenset[str] = field(default_factory=frozenset)
    scopes: frozenset[str] = field(default_factory=frozenset)
    attributes: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    on_behalf_of: Actor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError("Actor.id must be a non-empty string")
        if not isinstance(self.tenant, str) or not self.tenant:
            raise ValueError("Actor.tenant must be a non-empty string")
        object.__setattr__(self, "kind", ActorKind(self.kind))
        object.__setattr__(self, "roles", frozenset(self.roles))
        object.__setattr__(self, "scopes", frozenset(self.scopes))
        object.__setattr__(self, "attributes", MappingProxyType(dict(self.attributes)))
        if self.on_behalf_of is not None and self.on_behalf_of.on_behalf_of is not None:
            raise ValueError("impersonation does not nest: the subject cannot itself impersonate")

    @classmethod
    def make(
        cls,
        id: str,
        tenant: str,
        *,
        kind: ActorKind | str = ActorKind.USER,
        roles: Iterable[str] = (),
        scopes: Iterable[str] = (),
        attributes: Mapping[str, Any] | None = None,
        on_behalf_of: Actor | None = None,
    ) -> Actor:
        """Build an actor from plain iterables (the convenient constructor)."""
        return cls(
            id=id,
            tenant=tenant,
            kind=ActorKind(kind),
            roles=frozenset(roles),
            scopes=frozenset(scopes),
            attributes=dict(attributes or {}),
            on_behalf_of=on_behalf_of,
        )

    # -- impersonation -----------------------------------------------------------------

    @property
    def subject(self) -> Actor:
        """Whose permissions apply: the impersonated user, or this actor."""
        return self.on_behalf_of if self.on_behalf_of is not None else self

    @property
    def real(self) -> Actor:
        """Who is really at the keyboard (this actor)."""
        return self

    @property
    def is_impersonating(self) -> bool:
        return self.on_behalf_of is not None

    @property
    def tenant_id(self) -> str:
        """The tenant the action runs in: the subject's."""
        return self.subject.tenant

    def impersonate(self, subject: Actor) -> Actor:
        """Return this actor acting on behalf of ``subject``."""
        return Actor(
            id=self.id,
            tenant=self.tenant,
            kind=self.kind,
            roles=self.roles,
            scopes=self.scopes,
            attributes=self.attributes,
            on_behalf_of=subject,
        )

    # -- scopes and roles --------------------------------------------------------------

    def has_role(self, role: str) -> bool:
        return role in self.subject.roles

    @staticmethod
    def _grants(scopes: frozenset[str], scope: str) -> bool:
        if "*" in scopes or scope in scopes:
            return True
        return any(s.endswith(":*") and scope.startswith(s[:-1]) for s in scopes)

    def has_scope(self, scope: str) -> bool:
        """True when the credential allows ``scope``.

        Under impersonation the real actor's support grant must allow it, and so
        must the subject's own scopes when it carries any: the grant narrows, it
        never widens.
        """
        if not self._grants(self.scopes, scope):
            return False
        subject = self.on_behalf_of
        # A subject built with scopes of its own narrows further; one without
        # (no credential of its own in play) defers to the grant.
        return subject is None or not subject.scopes or self._grants(subject.scopes, scope)

    def attribute(self, name: str, default: Any = None) -> Any:
        return self.subject.attributes.get(name, default)
