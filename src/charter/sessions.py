"""Support impersonation sessions: a reason, a time limit, a revocable credential (issue 12).

A support user opens a session for one user of their tenant, with a reason and
a length (30 minutes by default, at most ``max_length``)::

    sessions = ImpersonationSessions(charter, directory=directory, signer=signer)
    opened = sessions.open(sam, "alice", reason="ticket #4411: invoice stuck")
    opened.token      # a bearer token: sam on behalf of alice, RFC 8693 act claim

Opening is refused (403, audited) unless a declared impersonation grant
(:mod:`charter.impersonation`) lets the support user's roles act for that
user. The session's scopes are the matching grants' scopes, narrowed by the
support user's own credential. Its token says ``sub`` alice, ``act`` ``{"sub":
"sam"}`` and ``sid`` the session; authenticating it (``TokenSigner.authenticate(...,
sessions=sessions)``) looks the session up on **every** request, so a revoked or
expired session is a 401 on the next request, not at the token's expiry.
Nothing about a session is cached.

Every step is an action through the gate, declared here and audited like any
other, on the resource :class:`ImpersonationSession` (its workflow: ``open`` →
``closed`` or ``revoked``):

* ``support.session.open`` — creates the session; reason required; the grant is
  its rule (``impersonation-grant``);
* ``support.session.close`` — its support user ends it;
* ``support.session.revoke`` — its support user, a manager role (``admin``) or an
  operator on the CLI ends it, with a reason;
* ``support.session.get`` — a sensitive read (list: ``GET /support/sessions``);
* ``support.session.mine`` — the user acted for reads their own sessions.

None of them runs under impersonation, and their scope is ``support:sessions``
(``account:read`` for ``mine``). Each call made with a session's token is
audited with the support user (``real_actor``), the user acted for
(``subject``) and the session id (``detail["session"]``);
:meth:`ImpersonationSessions.mine` shows a user those sessions and the
actions taken under them.
"""

from __future__ import annotations

import uuid
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, create_model
from sqlalchemy import JSON, DateTime, Index, Integer, String, Text, and_, bindparam, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .actor import Actor, Channel
from .audit.entry import audit_table
from .context import ActionContext
from .data import Page
from .decision import Decision, DecisionKind
from .errors import ConfigurationError, Forbidden, NotFound, Unauthenticated
from .gate import Charter
from .impersonation import ImpersonationGrant
from .outcome import Outcome
from .policy import A, C, R
from .policy.expr import Condition, Predicate
from .storage import metadata, translate_errors
from .tokens import TokenSigner
from .workflow import Transition

__all__ = [
    "DEFAULT_LENGTH",
    "MAX_LENGTH",
    "SESSION_ACTIONS",
    "ImpersonationSession",
    "ImpersonationSessions",
    "MyImpersonations",
    "OpenedSession",
    "SessionState",
]

DEFAULT_LENGTH = timedelta(minutes=30)
#: The longest session a Charter allows unless configured otherwise.
MAX_LENGTH = timedelta(hours=2)
#: The built-in actions, by what they do.
SESSION_ACTIONS = {
    "open": "support.session.open",
    "close": "support.session.close",
    "revoke": "support.session.revoke",
    "get": "support.session.get",
    "mine": "support.session.mine",
}
SCOPE = "support:sessions"
#: The resource name sessions are audited under (``resource_type``).
RESOURCE = "impersonation_sessions"
MINE_SCOPE = "account:read"
#: How many audited actions under one session :meth:`ImpersonationSessions.mine` returns.
MAX_ACTIONS = 500
_ID = 128
_REFUSED = "You may not act on behalf of this user."


class SessionState:
    OPEN = "open"
    CLOSED = "closed"
    REVOKED = "revoked"


class _Base(DeclarativeBase):
    metadata = metadata


class ImpersonationSession(_Base):
    """One support session: who acts for whom, why, until when (charter_0010)."""

    __tablename__ = "charter_impersonation_sessions"
    __table_args__ = (
        Index("ix_charter_impersonation_sessions_subject", "tenant", "subject_id"),
        Index("ix_charter_impersonation_sessions_support", "tenant", "support_id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128))
    support_id: Mapped[str] = mapped_column(String(_ID))
    subject_id: Mapped[str] = mapped_column(String(_ID))
    grants: Mapped[list[str]] = mapped_column(JSON)
    scopes: Mapped[list[str]] = mapped_column(JSON)
    reason: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16))
    version: Mapped[int] = mapped_column(Integer)
    opened_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    ended_by: Mapped[str | None] = mapped_column(String(_ID), default=None)
    end_reason: Mapped[str | None] = mapped_column(Text, default=None)


_S = ImpersonationSession
_CHECK = select(_S.tenant, _S.support_id, _S.subject_id, _S.state, _S.expires_at).where(
    _S.id == bindparam("sid")
)
_a = audit_table
# The actions under a session: the partial index on (real_actor, subject, at) finds them.
_UNDER = (
    select(
        _a.c.at,
        _a.c.action,
        _a.c.resource_type,
        _a.c.resource_id,
        _a.c.decision,
        _a.c.outcome,
        _a.c.reason,
        _a.c.channel,
        _a.c.detail,
    )
    .where(
        _a.c.real_actor == bindparam("support"),
        _a.c.subject == bindparam("subject"),
        _a.c.tenant == bindparam("tenant"),
        and_(_a.c.at >= bindparam("since"), _a.c.at <= bindparam("until")),
    )
    .order_by(_a.c.at, _a.c.id)
)


class Directory(Protocol):
    def __call__(self, tenant: str, user_id: str, /) -> Actor | None: ...


def _aware(when: datetime) -> datetime:
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when  # SQLite keeps no zone


def session_view(session: ImpersonationSession, now: datetime | None = None) -> dict[str, Any]:
    """A session as JSON; ``status`` is ``expired`` for an open session past its end."""
    expires = _aware(session.expires_at)
    status = session.state
    if status == SessionState.OPEN and now is not None and expires <= now:
        status = "expired"
    return {
        "id": session.id,
        "tenant": session.tenant,
        "support": session.support_id,
        "user": session.subject_id,
        "grants": list(session.grants),
        "scopes": list(session.scopes),
        "reason": session.reason,
        "state": session.state,
        "status": status,
        "opened_at": _aware(session.opened_at).isoformat(),
        "expires_at": expires.isoformat(),
        "ended_at": None if session.ended_at is None else _aware(session.ended_at).isoformat(),
        "ended_by": session.ended_by,
        "end_reason": session.end_reason,
        "version": session.version,
    }


@dataclass(frozen=True, slots=True)
class OpenedSession:
    """An opened session (:func:`session_view`'s fields) and its bearer token."""

    session: Mapping[str, Any]
    token: str | None
    outcome: Outcome

    @property
    def id(self) -> str:
        return str(self.session["id"])


@dataclass(frozen=True, slots=True)
class MyImpersonations:
    """One page of :meth:`ImpersonationSessions.my_impersonations`: the sessions, each with
    its ``actions``, the cursor of the next page, the size used, and the ``RateLimit``
    fields' states of the check that counted it (:func:`charter.ratelimit.rate_headers`)."""

    items: list[dict[str, Any]]
    next: str | None
    limit: int
    rate_limit: tuple[Any, ...] = ()


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SessionTarget(_Input):
    """The input of close and revoke: none (the session is the target)."""


def _minutes(length: timedelta, what: str) -> int:
    if not isinstance(length, timedelta) or length < timedelta(minutes=1):
        raise ConfigurationError(f"ImpersonationSessions: {what} is at least one minute")
    if length % timedelta(minutes=1):
        raise ConfigurationError(f"ImpersonationSessions: {what} is a whole number of minutes")
    return length // timedelta(minutes=1)


def _narrowed(granted: Iterable[str], credential: frozenset[str] | None) -> list[str]:
    """The grant's scopes that the credential also allows (a wildcard meets the narrower)."""
    granted = frozenset(granted)
    if credential is None:
        return sorted(granted)
    kept = {s for s in granted if Actor.scopes_allow(credential, s)}
    kept |= {s for s in credential if Actor.scopes_allow(granted, s)}
    return sorted(kept)


class ImpersonationSessions:
    """The sessions of one Charter: declares their actions, opens, ends, lists and checks them.

    ``directory(tenant, user_id)`` finds the user a session is opened for (the
    one the token adapter uses). ``length`` is a session's default length,
    ``max_length`` the longest one may ask for. ``managers``: the roles that may
    list and revoke every session of their tenant (besides the support user, for
    their own). ``signer`` issues each opened session's token.
    """

    def __init__(
        self,
        charter: Charter,
        *,
        directory: Directory,
        signer: TokenSigner | None = None,
        length: timedelta = DEFAULT_LENGTH,
        max_length: timedelta = MAX_LENGTH,
        managers: Iterable[str] = ("admin",),
    ) -> None:
        self.charter = charter
        self.directory = directory
        self.signer = signer
        self.default_minutes = _minutes(length, "length")
        self.max_minutes = _minutes(max_length, "max_length")
        if self.default_minutes > self.max_minutes:
            raise ConfigurationError("ImpersonationSessions: length is longer than max_length")
        self.managers = frozenset([managers] if isinstance(managers, str) else managers)
        if not self.managers:
            raise ConfigurationError("ImpersonationSessions: managers= names at least one role")
        self.open_input = create_model(
            "OpenSession",
            __base__=_Input,
            user=(str, Field(min_length=1, max_length=_ID)),
            minutes=(
                int,
                Field(default=self.default_minutes, strict=True, ge=1, le=self.max_minutes),
            ),
        )
        _declare(self)
        _INSTALLED[charter] = self

    @classmethod
    def of(cls, charter: Charter) -> ImpersonationSessions:
        """The sessions declared on ``charter`` (ConfigurationError if there are none)."""
        found = _INSTALLED.get(charter)
        if found is None:
            raise ConfigurationError("this Charter declares no support sessions")
        return found

    @property
    def engine(self) -> Engine:
        return self.charter.engine

    @property
    def max_length(self) -> timedelta:
        return timedelta(minutes=self.max_minutes)

    # -- the grant --------------------------------------------------------------------

    def grants_for(
        self, actor: Actor, user_id: object
    ) -> tuple[Actor | None, list[ImpersonationGrant]]:
        """The user ``actor`` asks to act for, and the declared grants that allow it."""
        if actor.is_impersonating or not isinstance(user_id, str):
            return None, []
        subject = self.directory(actor.tenant, user_id)
        if subject is None or subject.tenant != actor.tenant or subject.id == actor.id:
            return subject, []
        declared: tuple[ImpersonationGrant, ...] = self.charter.impersonation_grants
        return subject, [g for g in declared if g.matches(actor, subject)]

    # -- through the gate ---------------------------------------------------------------

    def open(
        self,
        actor: Actor,
        user: str,
        *,
        reason: str | None,
        minutes: int | None = None,
        key: str | None = None,
        channel: Channel | str = Channel.HTTP,
        request_id: str | None = None,
    ) -> OpenedSession:
        """Open a session for ``user`` (``support.session.open``) and issue its token."""
        data: dict[str, Any] = {"user": user}
        if minutes is not None:
            data["minutes"] = minutes
        outcome = self.charter.execute(
            actor, SESSION_ACTIONS["open"], data, key=key, reason=reason, channel=channel,
            request_id=request_id,
        )  # fmt: skip
        view = dict(outcome.body)
        token = view.pop("token", None)
        view.pop("token_type", None)
        return OpenedSession(view, token, outcome)

    def token(self, session: Mapping[str, Any]) -> str:
        """The bearer token of an opened session (``sub`` the user, ``act`` the support user)."""
        if self.signer is None:
            raise ConfigurationError("ImpersonationSessions(signer=...) issues session tokens")
        return self.signer.issue(
            str(session["user"]), str(session["tenant"]), scopes=session["scopes"],
            act=str(session["support"]), session=str(session["id"]),
            expires_at=datetime.fromisoformat(str(session["expires_at"])),
        )  # fmt: skip

    def close(
        self,
        actor: Actor,
        session_id: str,
        *,
        reason: str | None = None,
        channel: Channel | str = Channel.HTTP,
        request_id: str | None = None,
    ) -> Outcome:
        """End one's own session (``support.session.close``)."""
        return self._end("close", actor, session_id, reason, channel, request_id)

    def revoke(
        self,
        actor: Actor,
        session_id: str,
        *,
        reason: str | None,
        channel: Channel | str = Channel.HTTP,
        request_id: str | None = None,
    ) -> Outcome:
        """Revoke a session, with a reason (``support.session.revoke``): its token stops now."""
        return self._end("revoke", actor, session_id, reason, channel, request_id)

    def _end(self, what: str, actor: Actor, session_id: str, reason: str | None,
             channel: Channel | str, request_id: str | None) -> Outcome:  # fmt: skip
        return self.charter.execute(
            actor, SESSION_ACTIONS[what], {}, target=session_id, reason=reason, channel=channel,
            request_id=request_id,
        )  # fmt: skip

    def list_sessions(self, actor: Actor, *, limit: int = 50, after: str | None = None,
             channel: Channel | str = Channel.HTTP) -> Page:  # fmt: skip
        """The sessions ``actor`` may read: their own, every one for a manager (audited)."""
        return self.charter.list_records(
            actor, SESSION_ACTIONS["get"], limit=limit, after=after, sort="-opened_at",
            channel=channel,
        )  # fmt: skip

    def mine(
        self,
        actor: Actor,
        *,
        limit: int = 50,
        after: str | None = None,
        channel: Channel | str = Channel.HTTP,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Who acted on ``actor``'s behalf, and when: their sessions with the actions under each.

        One audited page of sessions (``support.session.mine``), newest first, each
        with ``actions``: the audit entries made under it (at most :data:`MAX_ACTIONS`).
        :meth:`my_impersonations` also says the page's size and ``RateLimit`` fields.
        """
        page = self.my_impersonations(actor, limit=limit, after=after, channel=channel)
        return page.items, page.next

    def my_impersonations(
        self,
        actor: Actor,
        *,
        limit: int = 50,
        after: str | None = None,
        channel: Channel | str = Channel.HTTP,
        request_id: str | None = None,
    ) -> MyImpersonations:
        """:meth:`mine`, as a page: what ``GET /me/impersonations`` answers, fields included."""
        page = self.charter.list_records(
            actor, SESSION_ACTIONS["mine"], limit=limit, after=after, sort="-opened_at",
            channel=channel, request_id=request_id,
        )  # fmt: skip
        now = self.charter.clock()
        out = []
        for record in page.records:
            view = session_view(record, now)
            view["actions"] = self.actions_under(record)
            out.append(view)
        return MyImpersonations(out, page.next, page.limit, page.rate_limit)

    # -- reading the trail --------------------------------------------------------------

    def actions_under(self, session: ImpersonationSession) -> list[dict[str, Any]]:
        """The audit entries of calls made with ``session``'s credential, oldest first."""
        until = _aware(session.ended_at or session.expires_at)
        params = {
            "support": session.support_id, "subject": session.subject_id,
            "tenant": session.tenant, "since": _aware(session.opened_at), "until": until,
        }  # fmt: skip
        with translate_errors(), self.engine.connect() as connection:
            rows = connection.execute(_UNDER, params)
            actions = []
            for row in rows:
                detail = row.detail or {}
                if detail.get("session") != session.id:
                    continue  # X-On-Behalf-Of claims outside this session, or another session
                actions.append({
                    "at": _aware(row.at).isoformat(), "action": row.action,
                    "resource_type": row.resource_type, "resource_id": row.resource_id,
                    "decision": row.decision, "outcome": row.outcome, "reason": row.reason,
                    "channel": row.channel,
                })  # fmt: skip
                if len(actions) >= MAX_ACTIONS:
                    break
        return actions

    def stored(self, *, tenant: str | None = None, active: bool = False,
                 limit: int = 100) -> list[dict[str, Any]]:  # fmt: skip
        """The sessions in the database, newest first, for operators (``charter support``)."""
        stmt = select(_S).order_by(_S.opened_at.desc(), _S.id).limit(max(1, min(limit, 1000)))
        if tenant is not None:
            stmt = stmt.where(_S.tenant == tenant)
        now = self.charter.clock()
        if active:
            stmt = stmt.where(_S.state == SessionState.OPEN, _S.expires_at > now)
        with self.charter.session() as session:
            return [session_view(s, now) for s in session.execute(stmt).scalars()]

    def tenant_of(self, session_id: str) -> str:
        """The tenant a session belongs to (NotFound if there is no such session)."""
        with translate_errors(), self.engine.connect() as connection:
            row = connection.execute(_CHECK, {"sid": str(session_id)[:64]}).first()
        if row is None:
            raise NotFound(f"there is no impersonation session {str(session_id)[:64]!r}")
        return str(row.tenant)

    # -- the token's check (charter.tokens.SessionVerifier) -----------------------------

    def check(self, *, session: str, tenant: str, actor: str, subject: str) -> None:
        """Raise 401 unless ``session`` is open, unexpired and the token's (read now, uncached)."""
        with translate_errors(), self.engine.connect() as connection:
            row = connection.execute(_CHECK, {"sid": session[:64]}).first()
        if row is None or (row.tenant, row.support_id, row.subject_id) != (tenant, actor, subject):
            raise Unauthenticated("The impersonation session is not valid.")
        if row.state != SessionState.OPEN:
            raise Unauthenticated(f"The impersonation session was {row.state}.")
        if _aware(row.expires_at) <= self.charter.clock():
            raise Unauthenticated("The impersonation session has expired.")

    def is_active(self, *, session: str, tenant: str, actor: str, subject: str) -> bool:
        """The boolean twin of :meth:`check`."""
        try:
            self.check(session=session, tenant=tenant, actor=actor, subject=subject)
        except Unauthenticated:
            return False
        return True


_INSTALLED: weakref.WeakKeyDictionary[Charter, ImpersonationSessions] = weakref.WeakKeyDictionary()


def _any_role(roles: Iterable[str]) -> Condition:
    names = sorted(roles)
    condition: Any = A.has_role(names[0])
    for name in names[1:]:
        condition = condition | A.has_role(name)
    return condition  # type: ignore[no-any-return]


def _declare(sessions: ImpersonationSessions) -> None:
    """The sessions' resource, workflow, rules and actions, on ``sessions.charter``."""
    charter, names = sessions.charter, SESSION_ACTIONS
    if names["open"] in charter.actions:
        raise ConfigurationError("support sessions are declared twice on this Charter")
    charter.resource(_S, name=RESOURCE, tenant="tenant", state="state", version="version",
                     view=lambda s: session_view(s, charter.clock()))  # fmt: skip
    S = SessionState
    charter.workflow(
        _S,
        states=(S.OPEN, S.CLOSED, S.REVOKED),
        initial=S.OPEN,
        transitions=(
            Transition(names["close"], S.OPEN, S.CLOSED),
            Transition(names["revoke"], S.OPEN, S.REVOKED),
        ),
    )
    manager = _any_role(sessions.managers)
    own = R.support_id == A.id
    operator = A.has_role("operator") & (C.channel == "cli")

    def granted(actor: Any, _record: Any, ctx: Any) -> bool:
        data = getattr(ctx, "input", None)
        return bool(sessions.grants_for(actor, getattr(data, "user", None))[1])

    def ungranted(actor: Any, record: Any, ctx: Any) -> bool:
        return not granted(actor, record, ctx)

    # The grant is the rule: anyone whose credential has the scope may ask, and the
    # deny names the rule (an unknown user is refused alike: ids are not told).
    charter.allow(names["open"], True, name="support-session-open")
    charter.deny(names["open"], Predicate(ungranted, "no impersonation grant covers the user"),
                 name="impersonation-grant", message=_REFUSED)  # fmt: skip

    @charter.action(names["open"], on=_S, input=sessions.open_input, creates=True,
                    scope=SCOPE, reason_required=True, impersonation=False,
                    tags={"admin"}, idempotency="none")  # fmt: skip
    def open_session(ctx: ActionContext, _: None, data: Any) -> dict[str, Any]:
        """Open an impersonation session for a user a grant covers (reason required).

        The answer carries the session's token, so the call takes no idempotency key:
        a stored outcome would keep a credential in the database. A retry opens
        another session, audited like the first.
        """
        subject, grants = sessions.grants_for(ctx.actor, data.user)
        if subject is None or not grants:  # the rule decided; the directory changed since
            denial = Decision.deny(DecisionKind.DENIED_BY_RULE, rule="impersonation-grant",
                                   reason="the grant no longer matches",
                                   public_reason=_REFUSED)  # fmt: skip
            raise Forbidden(_REFUSED, decision=denial)
        assert ctx.session is not None
        record = ImpersonationSession(
            id=uuid.uuid4().hex, tenant=ctx.actor.tenant, support_id=ctx.actor.id,
            subject_id=subject.id, grants=sorted(g.name for g in grants),
            scopes=_narrowed(frozenset().union(*(g.scopes for g in grants)), ctx.actor.scopes),
            reason=ctx.reason or "", state=S.OPEN, version=1, opened_at=ctx.now,
            expires_at=ctx.now + timedelta(minutes=data.minutes),
        )  # fmt: skip
        ctx.session.add(record)
        view = session_view(record, ctx.now)
        if sessions.signer is not None:
            view.update({"token": sessions.token(view), "token_type": "Bearer"})
        return view

    def end(ctx: ActionContext, record: ImpersonationSession, _: Any) -> ImpersonationSession:
        """End the session now (the gate moves its state); its token stops working."""
        record.ended_at, record.ended_by, record.end_reason = ctx.now, ctx.actor.id, ctx.reason
        return record

    common: dict[str, Any] = {"on": _S, "input": SessionTarget, "scope": SCOPE,
                              "impersonation": False}  # fmt: skip
    charter.action(names["close"], allow=own, **common)(end)
    charter.action(names["revoke"], allow=own | manager | operator, reason_required=True,
                   tags={"admin"}, **common)(end)  # fmt: skip

    def read(ctx: ActionContext, record: ImpersonationSession, _: Any) -> dict[str, Any]:
        """Read one impersonation session (audited)."""
        return session_view(record, ctx.now)

    reads: dict[str, Any] = {"on": _S, "sensitive_read": True, "listable": True,
                             "impersonation": False}  # fmt: skip
    charter.action(names["get"], allow=own | manager, scope=SCOPE, **reads)(read)
    charter.action(names["mine"], allow=R.subject_id == A.id, scope=MINE_SCOPE, **reads)(read)
