"""A gift-card service written on Charter the way a new user would, from the README alone.

It declares no ``scope=`` and no ``idempotency=``: what it gets is Charter's
defaults, which is what the attack tests in this package probe over HTTP.
Cards are readable by their owner only, so another user of the same tenant
must not be able to tell an existing card from a missing one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel, ConfigDict
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from charter import A, Actor, Charter, R
from charter.fields import Amount, Count
from charter.integrations.fastapi import CharterRoutes
from charter.tokens import TokenSigner

SECRET = "giftcards-test-secret-0123456789abcdef"
AUDIT_KEYS = {"k1": "giftcards-audit-key-0123456789abcdef"}


class Base(DeclarativeBase):
    pass


class Card(Base):
    __tablename__ = "attack_cards"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    owner: Mapped[str] = mapped_column(String(64))
    balance: Mapped[int] = mapped_column(default=0)
    redeemed: Mapped[int] = mapped_column(default=0)
    version: Mapped[int] = mapped_column(default=1)


class Redeem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    amount: Amount


class Issue(BaseModel):
    model_config = ConfigDict(extra="forbid")
    owner: str
    balance: Count


USERS = {
    ("shop", "olga"): Actor.make("olga", "shop", roles={"customer"}),
    ("shop", "mallory"): Actor.make("mallory", "shop", roles={"customer"}),
    ("shop", "clerk"): Actor.make("clerk", "shop", roles={"clerk"}),
    ("shop", "sue"): Actor.make("sue", "shop", kind="support", roles={"support"}),
}


def directory(tenant: str, user_id: str) -> Actor | None:
    return USERS.get((tenant, user_id))


def build(charter: Charter) -> Charter:
    charter.resource(Card, tenant="tenant_id", version="version", name="cards")
    owner = R.owner == A.id

    @charter.action("card.issue", on=Card, input=Issue, creates=True, allow=A.has_role("clerk"))
    def issue(ctx: Any, _: None, data: Issue) -> Card:
        card = Card(owner=data.owner, balance=data.balance)
        ctx.session.add(card)
        return card

    @charter.action("card.read", on=Card, allow=owner, sensitive_read=True)
    def read(ctx: Any, card: Card, _: Any) -> dict[str, Any]:
        return {"id": card.id, "balance": card.balance}

    @charter.action("card.redeem", on=Card, input=Redeem, allow=owner)
    def redeem(ctx: Any, card: Card, data: Redeem) -> dict[str, Any]:
        card.balance -= int(data.amount)
        card.redeemed += 1
        return {"id": card.id, "balance": card.balance}

    return charter


def create_app(charter: Charter) -> FastAPI:
    app = FastAPI()
    signer = TokenSigner([SECRET])

    def authenticate(request: Request) -> Actor:
        return signer.authenticate(
            request.headers.get("authorization"),
            directory,
            on_behalf_of=request.headers.get("x-on-behalf-of"),
        )

    routes = CharterRoutes(app, charter, authenticate=authenticate)
    routes.bind("POST", "/cards", "card.issue", target=None)
    routes.bind("GET", "/cards/{id}", "card.read")
    routes.bind("POST", "/cards/{id}/redeem", "card.redeem")
    return app


def token(user: str, scopes: list[str]) -> dict[str, str]:
    bearer = TokenSigner([SECRET]).issue(user, "shop", scopes=scopes)
    return {"Authorization": f"Bearer {bearer}"}


@contextmanager
def running(database_url: str) -> Iterator[tuple[Charter, TestClient]]:
    """The service on ``database_url`` (already migrated: the ``database_url`` fixture)."""
    charter = build(Charter(database_url=database_url, audit_keys=AUDIT_KEYS))
    try:
        Base.metadata.drop_all(charter.engine)
        Base.metadata.create_all(charter.engine)
        with TestClient(create_app(charter), raise_server_exceptions=False) as client:
            yield charter, client
    finally:
        Base.metadata.drop_all(charter.engine)
        charter.engine.dispose()
