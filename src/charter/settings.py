"""Settings read from the environment, refusing unsafe defaults outside development.

``CHARTER_ENV``            ``development`` or ``production`` (the default: safe)
``CHARTER_DATABASE_URL``   SQLAlchemy URL; default: ``sqlite:///charter-demo.db``
``CHARTER_TOKEN_SECRET``   bearer-token signing secret(s), comma-separated, newest first
``CHARTER_AUDIT_KEY``      audit MAC key(s): ``id:secret,id2:secret2`` (newest first) or one secret
``CHARTER_PAYMENTS_URL``   the payment provider's base URL (reference service)
``CHARTER_PAYMENTS_WEBHOOK_SECRET``  its Standard Webhooks secret(s) (``whsec_...``), newest first
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

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
    webhook_secrets: tuple[str, ...] = field(default=(), repr=False)

    @property
    def development(self) -> bool:
        return self.environment == "development"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        environment = env.get("CHARTER_ENV", "production").strip().lower()
        if environment not in ("development", "production"):
            raise ConfigurationError("CHARTER_ENV must be 'development' or 'production'")
        dev = environment == "development"
        secrets = tuple(
            s.strip() for s in env.get("CHARTER_TOKEN_SECRET", "").split(",") if s.strip()
        )
        audit = _parse_keys(env.get("CHARTER_AUDIT_KEY", ""))
        if not secrets:
            if not dev:
                raise ConfigurationError(
                    "CHARTER_TOKEN_SECRET is not set: refusing to start outside development"
                )
            secrets = (DEVELOPMENT_TOKEN_SECRET,)
        if not audit:
            if not dev:
                raise ConfigurationError(
                    "CHARTER_AUDIT_KEY is not set: refusing to start outside development"
                )
            audit = {"dev": DEVELOPMENT_AUDIT_KEY}
        if not dev:
            if DEVELOPMENT_TOKEN_SECRET in secrets or DEVELOPMENT_AUDIT_KEY in audit.values():
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
        return cls(
            environment=environment,
            database_url=env.get("CHARTER_DATABASE_URL", DEFAULT_DATABASE_URL),
            token_secrets=secrets,
            audit_keys=audit,
            payments_url=env.get("CHARTER_PAYMENTS_URL") or None,
            webhook_secrets=hooks,
        )
