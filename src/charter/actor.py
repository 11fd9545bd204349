"""Who acts (:class:`Actor`) and where the call came from (:class:`Channel`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
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
    OPERATOR = "operator"  # a person at the command line, from an operator directory
    AGENT = "agent"  # an automated agent; acts for a user only under a grant (issue 12)


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
    scope under ``invoices:``. An empty set grants nothing: a token issued with
    no scopes can run no action. ``None`` (the default) means "no credential":
    an actor built in code (a script, a test, the quickstart) is not narrowed
    by scopes. The HTTP, webhook and agent adapters never produce such an actor
    from a request.

    For impersonation, the actor is the real person and ``on_behalf_of`` the
    subject whose permissions apply; :attr:`subject` and :attr:`tenant_id`
    resolve that for the gate. Impersonation is refused unless a declared
    grant allows it (:mod:`charter.impersonation`): the gate resolves the grant
    on every call and records its scopes in ``granted_scopes``, which any
    value given by the caller is replaced by.

    ``session`` names the support impersonation session the credential
    belongs to (:mod:`charter.sessions`; ``None`` outside one): it is audited
    with every call made under it.
    """

    id: str
    tenant: str
    kind: ActorKind = ActorKind.USER
    roles: frozenset[str] = field(default_factory=frozenset)
    scopes: frozenset[str] | None = None
    attributes: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    on_behalf_of: Actor | None = None
    granted_scopes: frozenset[str] | None = None
    session: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError("Actor.id must be a non-empty string")
        if not isinstance(self.tenant, str) or not self.tenant:
            raise ValueError("Actor.tenant must be a non-empty string")
        object.__setattr__(self, "kind", ActorKind(self.kind))
        object.__setattr__(self, "roles", frozenset(self.roles))
        if isinstance(self.scopes, str):
            raise ValueError("Actor.scopes is a set of scope strings, not one string")
        if self.scopes is not None:
            object.__setattr__(self, "scopes", frozenset(self.scopes))
        if self.granted_scopes is not None:
            object.__setattr__(self, "granted_scopes", frozenset(self.granted_scopes))
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
        scopes: Iterable[str] | None = None,
        attributes: Mapping[str, Any] | None = None,
        on_behalf_of: Actor | None = None,
    ) -> Actor:
        """Build an actor from plain iterables (the convenient constructor).

        ``scopes=None`` (the default) is an actor built in code, not narrowed by
        scopes; a credential's actor passes its scope set, even an empty one.
        """
        return cls(
            id=id,
            tenant=tenant,
            kind=ActorKind(kind),
            roles=frozenset(roles),
            scopes=None if scopes is None else frozenset(scopes),
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

    def impersonate(self, subject: Actor, *, session: str | None = None) -> Actor:
        """Return this actor *claiming* to act on behalf of ``subject``.

        A claim only: the gate allows nothing under it until a declared grant
        does (:mod:`charter.impersonation`). ``session``: the impersonation
        session the claim comes from (:mod:`charter.sessions`), audited.
        """
        return replace(self, on_behalf_of=subject, granted_scopes=None, session=session)

    def granted(self, scopes: frozenset[str] | None) -> Actor:
        """This impersonating actor with the scopes the gate's resolved grant allows."""
        return replace(self, granted_scopes=scopes)

    # -- scopes and roles --------------------------------------------------------------

    def has_role(self, role: str) -> bool:
        return role in self.subject.roles

    @staticmethod
    def scopes_allow(scopes: frozenset[str] | None, scope: str) -> bool:
        """Whether one scope set allows ``scope`` (``None``: no set in play, nothing narrowed)."""
        if scopes is None:  # no credential in play: nothing to narrow
            return True
        if "*" in scopes or scope in scopes:
            return True
        return any(s.endswith(":*") and scope.startswith(s[:-1]) for s in scopes)

    def has_scope(self, scope: str) -> bool:
        """True when every scope set in play allows ``scope``.

        The credential's (``scopes``; ``None`` narrows nothing). Under
        impersonation also the grant the gate resolved (``granted_scopes``;
        without one, nothing is allowed) and the subject's own scopes when it
        carries a set: each narrows, none widens.
        """
        if not self.scopes_allow(self.scopes, scope):
            return False
        subject = self.on_behalf_of
        if subject is None:
            return True
        if self.granted_scopes is None:
            return False  # impersonation without a resolved grant allows nothing
        granted, own = self.granted_scopes, subject.scopes
        return self.scopes_allow(granted, scope) and self.scopes_allow(own, scope)

    def attribute(self, name: str, default: Any = None) -> Any:
        return self.subject.attributes.get(name, default)
