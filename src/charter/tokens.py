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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta

import jwt

from .actor import Actor
from .errors import ConfigurationError, Unauthenticated

__all__ = ["TokenSigner"]

Directory = Callable[[str, str], Actor | None]
ALGORITHM = "HS256"
MAX_TOKEN_LENGTH = 4096


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

    def issue(self, subject: str, tenant: str, *, scopes: Iterable[str] = ()) -> str:
        now = self.clock()
        claims = {
            "sub": subject,
            "tenant": tenant,
            "scope": " ".join(sorted(scopes)),
            "iss": self.issuer,
            "iat": int(now.timestamp()),
            "exp": int((now + self.lifetime).timestamp()),
        }
        return jwt.encode(claims, self._secrets[0], algorithm=ALGORITHM)

    def verify(self, token: str) -> dict[str, object]:
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
                    options={"require": ["sub", "tenant", "exp", "iat"], "verify_exp": False},
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
        self, authorization: str | None, directory: Directory, *, on_behalf_of: str | None = None
    ) -> Actor:
        """Turn an ``Authorization: Bearer ...`` header into an actor (or raise 401)."""
        if not authorization:
            raise Unauthenticated("Send an Authorization: Bearer <token> header.")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            raise Unauthenticated("Only Bearer tokens are accepted.")
        claims = self.verify(token.strip())
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
