"""Settings read from the environment, refusing unsafe defaults outside development.

``CHARTER_ENV``            ``development`` or ``production`` (the default: safe)
``CHARTER_DATABASE_URL``   SQLAlchemy URL; default: ``sqlite:///charter-demo.db``
``CHARTER_TOKEN_SECRET``   bearer-token signing secret(s), comma-separated, newest first
``CHARTER_AUDIT_KEY``      audit MAC key(s): ``id:secret,id2:secret2`` (newest first) or one secret
``CHARTER_AUDIT_ANCHOR``   where every audit checkpoint is copied, outside the database
                           (:mod:`charter.audit.anchor`): ``file:///var/lib/charter/audit.anchor.jsonl``
                           (or a plain path), another database's SQLAlchemy URL, or ``none``
``CHARTER_PAYMENTS_URL``   the payment provider's base URL (reference service)
``CHARTER_SENDER_URL``     the reminder sender's base URL (reference service)
``CHARTER_PAYMENTS_WEBHOOK_SECRET``  its Standard Webhooks secret(s) (``whsec_...``), newest first
``CHARTER_RATE_LIMITS``    where rate limits are counted: ``memory://`` (the default, this
                           process), ``redis://host:6379/0`` (shared), or ``none``

The anchor's default. In development, with a SQLite database file, it is a
JSON-lines file beside it (``charter-demo.db.anchor.jsonl``), so the demo's
trail is anchored out of the box and removing ``charter-demo.db*`` removes
both. Anywhere else it is unset, because Charter cannot choose a place outside
the database for you (a file beside the database shares its fate): the service
and ``charter audit verify`` run, but warn loudly that nothing outside the
database vouches for the trail. Set it in production; ``none`` says you mean
to run without one.

Two readers. :meth:`Settings.from_env` is the service's: outside development
it refuses to start without a token secret and audit keys.
:meth:`Settings.for_audit` is the audit commands': they need only the
database, the audit keys and the anchor, so it neither reads nor requires
``CHARTER_TOKEN_SECRET`` (the settings it returns carry no token secret, and
the service cannot start on them: :class:`~charter.tokens.TokenSigner` refuses).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from sqlalchemy.engine import make_url

from .errors import ConfigurationError

__all__ = ["DEVELOPMENT_TOKEN_SECRET", "Settings"]

DEVELOPMENT_TOKEN_SECRET = "charter-development-token-secret-not-secret"  # noqa: S105 - development only, refused elsewhere
DEVELOPMENT_AUDIT_KEY = "charter-development-audit-key-not-secret"
DEFAULT_DATABASE_URL = "sqlite:///charter-demo.db"
# A fixed, obviously-not-secret whsec_ value for development only (base64 of 32 bytes).
DEVELOPMENT_WEBHOOK_SECRET = "whsec_Y2hhcnRlci1kZXZlbG9wbWVudC13ZWJob29rLXNlY3I="  # noqa: S105 - development only


def _parse_keys(raw: str) -> dict[str, str]:
    keys: dict[str, str] = {}
    for i, part in enumerate(p.strip() for p in raw.split(",") if p.strip()):
        key_id, sep, secret = part.partition(":")
        if not sep:
            key_id, secret = f"k{i + 1}", part
        keys[key_id.strip()] = secret.strip()
    return keys


@dataclass(frozen=True)
class Settings:
    environment: str = "production"
    database_url: str = DEFAULT_DATABASE_URL
    token_secrets: tuple[str, ...] = field(default=(), repr=False)
    audit_keys: Mapping[str, str] = field(default_factory=dict, repr=False)
    payments_url: str | None = None
    sender_url: str | None = None
    webhook_secrets: tuple[str, ...] = field(default=(), repr=False)
    #: ``CHARTER_AUDIT_ANCHOR`` as given (None: unset); see :attr:`audit_anchor_uri`.
    audit_anchor: str | None = None
    #: ``CHARTER_RATE_LIMITS``: where rate limits are counted (``memory://``, ``redis://...``),
    #: ``none`` for no rate limits (charter.ratelimit).
    rate_limits: str | None = "memory://"

    @property
    def development(self) -> bool:
        return self.environment == "development"

    @property
    def audit_anchor_uri(self) -> str | None:
        """The anchor to use: ``CHARTER_AUDIT_ANCHOR``, or its default (see the module)."""
        if self.audit_anchor is not None:
            return None if self.audit_anchor.lower() == "none" else self.audit_anchor
        if self.development:
            url = make_url(self.database_url)
            if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
                return f"{url.database}.anchor.jsonl"
        return None

    @classmethod
    def for_audit(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """What ``charter audit`` needs: environment, database, audit keys, anchor; nothing else."""
        env = os.environ if environ is None else environ
        environment, dev = _environment(env)
        return cls(
            environment=environment,
            database_url=env.get("CHARTER_DATABASE_URL", DEFAULT_DATABASE_URL),
            audit_keys=_audit_keys(env, dev),
            audit_anchor=env.get("CHARTER_AUDIT_ANCHOR", "").strip() or None,
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """What the service reads; outside development, missing or default secrets refuse."""
        env = os.environ if environ is None else environ
        _, dev = _environment(env)
        secrets = tuple(
            s.strip() for s in env.get("CHARTER_TOKEN_SECRET", "").split(",") if s.strip()
        )
        if not secrets:
            if not dev:
                raise ConfigurationError(
                    "CHARTER_TOKEN_SECRET is not set: refusing to start outside development"
                )
            secrets = (DEVELOPMENT_TOKEN_SECRET,)
        if not dev:
            if DEVELOPMENT_TOKEN_SECRET in secrets:
                raise ConfigurationError("development secrets cannot be used outside development")
            if any(len(s) < 32 for s in secrets):
                raise ConfigurationError("CHARTER_TOKEN_SECRET must be at least 32 characters")
        hooks = tuple(
            s.strip()
            for s in env.get("CHARTER_PAYMENTS_WEBHOOK_SECRET", "").split(",")
            if s.strip()
        )
        if not hooks and dev:
            hooks = (DEVELOPMENT_WEBHOOK_SECRET,)
        if not dev and DEVELOPMENT_WEBHOOK_SECRET in hooks:
            raise ConfigurationError("development secrets cannot be used outside development")
        return dataclasses.replace(
            cls.for_audit(env),
            token_secrets=secrets,
            payments_url=env.get("CHARTER_PAYMENTS_URL") or None,
            sender_url=env.get("CHARTER_SENDER_URL") or None,
            webhook_secrets=hooks,
            rate_limits=_rate_limits(env.get("CHARTER_RATE_LIMITS", "memory://")),
        )


def _rate_limits(value: str) -> str | None:
    value = value.strip()
    return None if value.lower() in ("", "none") else value


def _environment(env: Mapping[str, str]) -> tuple[str, bool]:
    environment = env.get("CHARTER_ENV", "production").strip().lower()
    if environment not in ("development", "production"):
        raise ConfigurationError("CHARTER_ENV must be 'development' or 'production'")
    return environment, environment == "development"


def _audit_keys(env: Mapping[str, str], dev: bool) -> dict[str, str]:
    audit = _parse_keys(env.get("CHARTER_AUDIT_KEY", ""))
    if not audit:
        if not dev:
            raise ConfigurationError(
                "CHARTER_AUDIT_KEY is not set: refusing to start outside development"
            )
        audit = {"dev": DEVELOPMENT_AUDIT_KEY}
    if not dev and DEVELOPMENT_AUDIT_KEY in audit.values():
        raise ConfigurationError("development secrets cannot be used outside development")
    return audit
