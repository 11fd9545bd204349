"""A small application used by the tests: documents in tenants, with a few actions."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from sqlalchemy import Numeric, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from charter import Charter
from charter.context import ActionContext
from charter.errors import DomainError


class Base(DeclarativeBase):
    pass


class Doc(Base):
    __tablename__ = "test_docs"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    title: Mapped[str] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(32), default="draft")
    version: Mapped[int] = mapped_column(default=1)
    amount: Mapped[Decimal] = mapped_column(Numeric(12, 2), default=Decimal("0"))
    created_by: Mapped[str] = mapped_column(String(64))
    counter: Mapped[int] = mapped_column(default=0)


class CreateDoc(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str = Field(min_length=1, max_length=200)
    amount: Decimal = Decimal("0")
    tenant_id: str | None = None
    api_token: SecretStr | None = None


class Rename(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str = Field(min_length=1, max_length=200)


class Charge(BaseModel):
    model_config = ConfigDict(extra="forbid")
    amount: Decimal = Field(gt=0, max_digits=12, decimal_places=2)


class OverLimit(DomainError):
    code = "over_limit"
    title = "Over the limit"


def is_member(actor: Any, record: Any, ctx: ActionContext) -> bool:
    return bool(actor.subject.roles & {"member", "editor"})


def is_editor(actor: Any, record: Any, ctx: ActionContext) -> bool:
    return "editor" in actor.subject.roles and record.state == "draft"


def build(charter: Charter) -> Charter:
    """Declare the test application's resource and actions on ``charter``."""
    charter.resource(Doc, tenant="tenant_id", state="state", version="version")
    # Support may act for plain members, for changes (test_docs:write), not for editors.
    charter.allow_impersonation(
        "support-for-members", by="support", of_roles={"member"}, scopes={"test_docs:write"}
    )

    @charter.action("doc.create", on=Doc, input=CreateDoc, creates=True, allow=is_member)
    def create(ctx: ActionContext, _: None, data: CreateDoc) -> dict[str, Any]:
        doc = Doc(
            title=data.title,
            amount=data.amount,
            created_by=ctx.actor.subject.id,
            tenant_id=data.tenant_id,
        )
        assert ctx.session is not None
        ctx.session.add(doc)
        return {"title": doc.title}

    @charter.action("doc.rename", on=Doc, input=Rename, allow=is_member, idempotency="none")
    def rename(ctx: ActionContext, doc: Doc, data: Rename) -> dict[str, Any]:
        doc.title = data.title
        return {"id": doc.id, "title": doc.title}

    @charter.action("doc.publish", on=Doc, allow=is_editor)
    def publish(ctx: ActionContext, doc: Doc, data: BaseModel) -> dict[str, Any]:
        doc.state = "published"
        return {"id": doc.id, "state": doc.state}

    @charter.action("doc.bump", on=Doc, allow=is_member)
    def bump(ctx: ActionContext, doc: Doc, data: BaseModel) -> dict[str, Any]:
        doc.counter += 1
        return {"counter": doc.counter}

    @charter.action("doc.read", on=Doc, allow=is_member, sensitive_read=True)
    def read(ctx: ActionContext, doc: Doc, data: BaseModel) -> dict[str, Any]:
        return {"id": doc.id, "title": doc.title, "amount": doc.amount}

    @charter.action("doc.explode", on=Doc, allow=is_member)
    def explode(ctx: ActionContext, doc: Doc, data: BaseModel) -> None:
        doc.title = "exploded"
        assert ctx.session is not None
        ctx.session.flush()
        raise RuntimeError("boom")

    @charter.action("doc.refuse", on=Doc, allow=is_member)
    def refuse(ctx: ActionContext, doc: Doc, data: BaseModel) -> None:
        doc.title = "refused"
        raise OverLimit("the document is over its limit")

    @charter.action("doc.purge", on=Doc, allow=is_member, reason_required=True)
    def purge(ctx: ActionContext, doc: Doc, data: BaseModel) -> dict[str, Any]:
        doc.state = "purged"
        return {"id": doc.id}

    @charter.action("doc.nothing", on=Doc)
    def nothing(ctx: ActionContext, doc: Doc, data: BaseModel) -> None:
        doc.title = "should never happen"

    @charter.action("doc.charge", on=Doc, input=Charge, allow=is_member, idempotency="required")
    def charge(ctx: ActionContext, doc: Doc, data: Charge) -> dict[str, Any]:
        doc.counter += 1
        doc.amount += data.amount
        return {"counter": doc.counter, "amount": doc.amount}

    @charter.action("doc.limited", on=Doc, input=Charge, allow=is_member, idempotency="required")
    def limited(ctx: ActionContext, doc: Doc, data: Charge) -> dict[str, Any]:
        if data.amount > 100:
            raise OverLimit(f"{data.amount} is over the limit of 100")
        doc.counter += 1
        return {"counter": doc.counter}

    @charter.action(
        "doc.limited_late", on=Doc, input=Charge, allow=is_member, idempotency="required"
    )
    def limited_late(ctx: ActionContext, doc: Doc, data: Charge) -> dict[str, Any]:
        doc.counter += 1
        assert ctx.session is not None
        ctx.session.flush()  # the effect reached the database before the refusal
        raise OverLimit("refused after writing")

    @charter.action("doc.publish_once", on=Doc, allow=is_editor, idempotency="optional")
    def publish_once(ctx: ActionContext, doc: Doc, data: BaseModel) -> dict[str, Any]:
        doc.state = "published"
        return {"state": doc.state}

    @charter.action("doc.two_steps", on=Doc, input=Rename, allow=is_member)
    def two_steps(ctx: ActionContext, doc: Doc, data: Rename) -> dict[str, Any]:
        doc.title = data.title
        assert ctx.session is not None
        ctx.session.flush()  # the change reaches the database before the gate's writes
        doc.counter += 1
        return {"title": doc.title, "counter": doc.counter}

    return charter
