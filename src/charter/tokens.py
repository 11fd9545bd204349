"""Signed bearer tokens (JWT, HS256) turned into actors.

A token names who (``sub``), the tenant and the credential's scopes; roles and
attributes are looked up server-side at each request (a directory callable), so
that revoking a role takes effect at once and a token cannot grant itself roles.
Secrets rotate: the first signs, all verify.

Impersonation uses RFC 8693's ``act`` claim semantics in a header: a token
plus ``X-On-Behalf-Of: <user id>`` yields the token's user *claiming* to act
on behalf of that user of the same tenant. Parsing decides nothing more: the
gate honours the claim only where a declared grant allows it
(:mod:`charter.impersonation`; none by default), requires a reason and audits
both. The credential's scope set is always the token's, even when empty.

A support impersonation session (:mod:`charter.sessions`) issues a token whose
``sub`` is the user acted for and whose RFC 8693 ``act`` claim (section 4.1)
names the support user who acts, ``{"sub": "sam"}``, with the session's id in
``sid``. :meth:`TokenSigner.authenticate` accepts such a token only where a
:class:`SessionVerifier` is given, which looks the session up on every request
(revoked or expired: 401 at once); without one it is refused, so a session
token is never mistaken for the user's own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Protocol

import jwt

from .actor import Actor
from .errors import ConfigurationError, Unauthenticated

__all__ = ["SessionVerifier", "TokenSigner"]

Directory = Callable[[str, str], Actor | None]
ALGORITHM = "HS256"
MAX_TOKEN_LENGTH = 4096
MAX_ID_LENGTH = 128


class SessionVerifier(Protocol):
    """Checks, at each request, that a session token's session is still open.

    Raises :class:`~charter.errors.Unauthenticated` when the session does not
    exist, is not the token's (another tenant, actor or subject), was closed or
    revoked, or has expired. :class:`charter.sessions.ImpersonationSessions` is one.
    """

    def check(self, *, session: str, tenant: str, actor: str, subject: str) -> None: ...


class TokenSigner:
    """Issue and verify HS256 bearer tokens; ``secrets`` are newest first."""

    def __init__(
        self,
        secrets: Sequence[str],
        *,
        issuer: str = "charter",
        lifetime: timedelta = timedelta(hours=12),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if not secrets or any(not s for s in secrets):
            raise ConfigurationError("TokenSigner needs at least one non-empty secret")
        self._secrets = tuple(secrets)
        self.issuer = issuer
        self.lifetime = lifetime
        self.clock = clock

    def __repr__(self) -> str:
        return f"TokenSigner(issuer={self.issuer!r}, secrets=<{len(self._secrets)} redacted>)"

    def issue(
        self,
        subject: str,
        tenant: str,
        *,
        scopes: Iterable[str] = (),
        audience: str | None = None,
        act: str | None = None,
        session: str | None = None,
        expires_at: datetime | None = None,
    ) -> str:
        """A signed token for ``subject``; ``act`` names who acts for it (RFC 8693 §4.1).

        A token with an ``audience`` (``aud``) is only accepted where that audience
        is asked for: :meth:`verify` without one refuses it (an agent's token is
        not a token for the HTTP API). ``session`` (``sid``, with ``act``) makes it
        a support session's token (:mod:`charter.sessions`); ``expires_at`` shortens
        its life (the session's end), never lengthens it past ``lifetime``.
        """
        if session is not None and act is None:
            raise ConfigurationError("a session token names who acts: act= with session=")
        now = self.clock()
        expires = now + self.lifetime
        if expires_at is not None:
            expires = min(expires, expires_at)
        claims: dict[str, object] = {
            "sub": subject,
            "tenant": tenant,
            "scope": " ".join(sorted(scopes)),
            "iss": self.issuer,
            "iat": int(now.timestamp()),
            "exp": int(expires.timestamp()),
        }
        if audience is not None:
            claims["aud"] = audience
        if act is not None:
            claims["act"] = {"sub": act}
        if session is not None:
            claims["sid"] = session
        return jwt.encode(claims, self._secrets[0], algorithm=ALGORITHM)

    def verify(self, token: str, *, audience: str | None = None) -> dict[str, object]:
        """The claims of a valid token; ``audience``: the ``aud`` it must carry (else none)."""
        if not token or len(token) > MAX_TOKEN_LENGTH:
            raise Unauthenticated("The bearer token is missing or too long.")
        now = self.clock().timestamp()
        for secret in self._secrets:
            try:
                claims: dict[str, object] = jwt.decode(
                    token,
                    secret,
                    algorithms=[ALGORITHM],
                    issuer=self.issuer,
                    audience=audience,
                    options={
                        "require": ["sub", "tenant", "exp", "iat"]
                        + (["aud"] if audience is not None else []),
                        "verify_exp": False,
                    },
                )
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError as exc:
                raise Unauthenticated("The bearer token is invalid.") from exc
            exp = claims.get("exp")
            if not isinstance(exp, int) or exp <= now:
                raise Unauthenticated("The bearer token has expired; sign in again.")
            return claims
        raise Unauthenticated("The bearer token is invalid.")

    def authenticate(
        self,
        authorization: str | None,
        directory: Directory,
        *,
        on_behalf_of: str | None = None,
        sessions: SessionVerifier | None = None,
    ) -> Actor:
        """Turn an ``Authorization: Bearer ...`` header into an actor (or raise 401).

        A session token (``act`` and ``sid`` claims) needs ``sessions``, which
        checks its session now: it yields the support user acting on behalf of
        the token's subject, narrowed to the token's scopes.
        """
        if not authorization:
            raise Unauthenticated("Send an Authorization: Bearer <token> header.")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            raise Unauthenticated("Only Bearer tokens are accepted.")
        claims = self.verify(token.strip())
        if "act" in claims or "sid" in claims:
            return _session_actor(claims, directory, on_behalf_of, sessions)
        subject, tenant = str(claims["sub"]), str(claims["tenant"])
        user = directory(tenant, subject)
        if user is None:
            raise Unauthenticated("The token's user no longer exists.")
        scopes = str(claims.get("scope") or "").split()
        actor = Actor(
            id=user.id,
            tenant=user.tenant,
            kind=user.kind,
            roles=user.roles,
            scopes=frozenset(scopes),
            attributes=user.attributes,
        )
        if on_behalf_of is None:
            return actor
        if not on_behalf_of or len(on_behalf_of) > 128:
            raise Unauthenticated("X-On-Behalf-Of must name a user id (at most 128 characters).")
        subject_user = directory(actor.tenant, on_behalf_of)
        if subject_user is None:
            raise Unauthenticated("The user to act on behalf of does not exist in your tenant.")
        # The subject presents no credential here: its own scopes are not in play.
        claimed = Actor(
            id=subject_user.id,
            tenant=subject_user.tenant,
            kind=subject_user.kind,
            roles=subject_user.roles,
            attributes=subject_user.attributes,
        )
        return actor.impersonate(claimed)


def _session_actor(
    claims: Mapping[str, object],
    directory: Directory,
    on_behalf_of: str | None,
    sessions: SessionVerifier | None,
) -> Actor:
    """The actor of a session token: its ``act`` user on behalf of its ``sub``, if still open."""
    if sessions is None:
        # Fail closed: read as a plain token it would credit the subject with the act.
        raise Unauthenticated("This token acts on behalf of someone; it is not accepted here.")
    if on_behalf_of is not None:
        raise Unauthenticated("A session token already acts on behalf of its user.")
    act, sid = claims.get("act"), claims.get("sid")
    actor_id = act.get("sub") if isinstance(act, Mapping) else None
    if (
        not isinstance(act, Mapping)
        or set(act) != {"sub"}  # no nested act: no delegation chains (RFC 8693 4.1)
        or not isinstance(actor_id, str)
        or not isinstance(sid, str)
        or not 0 < len(actor_id) <= MAX_ID_LENGTH
        or not 0 < len(sid) <= MAX_ID_LENGTH
    ):
        raise Unauthenticated("The bearer token is invalid.")
    subject_id, tenant = str(claims["sub"]), str(claims["tenant"])
    sessions.check(session=sid, tenant=tenant, actor=actor_id, subject=subject_id)
    real, subject = directory(tenant, actor_id), directory(tenant, subject_id)
    if real is None or subject is None:
        raise Unauthenticated("The token's user no longer exists.")
    actor = Actor(
        id=real.id, tenant=real.tenant, kind=real.kind, roles=real.roles,
        scopes=frozenset(str(claims.get("scope") or "").split()), attributes=real.attributes,
    )  # fmt: skip
    claimed = Actor(
        id=subject.id, tenant=subject.tenant, kind=subject.kind, roles=subject.roles,
        attributes=subject.attributes,
    )  # fmt: skip
    return actor.impersonate(claimed, session=sid)
