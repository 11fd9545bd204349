"""The per-call state every stage reads and fills in: one :class:`Call` per ``execute``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ..audit.entry import AuditEntry, digest_input
from ..decision import Decision, DecisionKind
from ..errors import CharterError
from ..outcome import Outcome

if TYPE_CHECKING:
    from pydantic import BaseModel
    from sqlalchemy.engine import Connection, Row
    from sqlalchemy.orm import Session

    from ..actions import ActionSpec
    from ..actor import Actor
    from ..audit.trail import AuditLease
    from ..context import ActionContext

__all__ = ["Call", "Refusal", "Stage", "Touched", "Writes", "entry_for"]


@dataclass(slots=True)
class Touched:
    """A record the call changed besides its target: listed in the call's audit entry."""

    type: str
    id: str
    before: str | None
    after: str | None = None
    deleted: bool = False

    def as_json(self) -> dict[str, Any]:
        item: dict[str, Any] = {"type": self.type, "id": self.id}
        if self.before is not None or self.after is not None:
            item.update(before=self.before, after=self.after)
        if self.deleted:
            item["deleted"] = True
        return item


@dataclass(slots=True)
class Writes:
    """What the call writes besides the handler's changes, committed by one step.

    ``entries`` are the audit entries; ``outcome`` the parameters of the stored
    idempotency outcome (keyed calls); ``before`` statements that must run first
    (a multi-phase request's release). Later stages add their own (ledger
    movements) here, and :mod:`charter.pipeline.writes` commits them.
    """

    entries: list[AuditEntry] = field(default_factory=list)
    outcome: dict[str, Any] | None = None
    before: list[Any] = field(default_factory=list)
    #: The charged account's balance after the call's charge (None: nothing charged).
    balance: int | None = None


@dataclass(slots=True, eq=False)
class Call:
    """One call of one action as it passes the stages.

    The prepare stages fill ``ctx``, ``target`` and ``fingerprint``; the
    transaction's stages fill ``session`` and ``lease``, then ``record`` and
    ``locked`` (load), ``decision`` (decide), ``body`` (handler), ``version``
    and ``touched`` (track) and ``writes`` (seal). A stage that answers the call
    without running the rest (a replay) sets ``outcome``.
    """

    spec: ActionSpec
    ctx: ActionContext
    raw_input: Any = None
    target: Any = None
    expected_version: int | None = None
    fingerprint: str | None = None
    resume: Row[Any] | None = None
    session: Session | None = None
    connection: Connection | None = None  # the session's, fetched once per transaction
    lease: AuditLease | None = None
    record: Any = None
    locked: list[Any] = field(default_factory=list)
    decision: Decision | None = None
    state_before: str | None = None
    body: Any = None
    version: int | None = None
    touched: list[Touched] = field(default_factory=list)
    writes: Writes = field(default_factory=Writes)
    outcome: Outcome | None = None
    phases: int = 0  # recovery points committed so far (multi-phase requests)
    rate_limit: tuple[Any, ...] = ()  # the RateLimit fields' states (charter.ratelimit)
    releases: tuple[Callable[[], None], ...] = ()  # run when the call ends, however it ends
    pending: tuple[Callable[[], None], ...] = ()  # replies a stage has not waited for: settle()
    #: Requests a stage deferred (a rate limit's count): each, sent, gives its reply to read.
    unsent: tuple[Callable[[], Callable[[], None]], ...] = ()

    @property
    def data(self) -> BaseModel:
        data = self.ctx.input
        assert data is not None  # set by the validate stage, before any other runs
        return data

    @property
    def keyed(self) -> bool:
        return self.fingerprint is not None

    def send(self) -> None:
        """Send the requests a stage deferred; their replies wait for :meth:`settle`.

        Every one is sent; the first that cannot be (a store down: 503) raises after.
        """
        unsent, self.unsent = self.unsent, ()
        failed: BaseException | None = None
        for send in unsent:
            try:
                self.pending += (send(),)
            except BaseException as exc:
                failed = failed or exc
        if failed is not None:
            raise failed

    def settle(self) -> None:
        """Send what a stage deferred and read every reply not waited on (a rate limit's count).

        A refusal among them (429) raises here. The runner settles before the
        transaction's first statement, and again however the call ends, so a
        request is never left unsent nor a reply unread, and a refusal wins over
        what came after.
        """
        refused: BaseException | None = None
        try:
            self.send()
        except BaseException as exc:
            refused = exc
        pending, self.pending = self.pending, ()
        for read in pending:  # every one is read, so that none holds its connection
            try:
                read()
            except BaseException as exc:
                refused = refused or exc
        if refused is not None:
            raise refused

    def count(self, stage: Stage) -> None:
        """Run ``stage`` (a rate limit) and read its count now: 429 before any work.

        The runner settles a call before its first statement; a call counted
        outside it (a batch item, an export) must read the count itself, or it
        would be neither enforced nor give its connection back.
        """
        try:
            stage.run(self)
        finally:
            self.settle()  # however the stage ended: the reply is never left unread

    def give_back(self) -> None:
        """Give back what the stages hold (a concurrency slot), once."""
        releases, self.releases = self.releases, ()
        for release in releases:
            release()

    def restart(self) -> None:
        """Forget the transaction's state before the runner tries the call again."""
        self.session = self.connection = self.lease = None
        self.record = self.decision = self.body = None
        self.state_before = self.version = None
        self.locked, self.touched, self.writes = [], [], Writes()
        self.ctx.session, self.ctx.steps, self.ctx.locked, self.ctx.locker = None, None, (), None

    def entry(
        self,
        outcome: str,
        *,
        decision: Decision | None = None,
        record: Any = None,
        detail: dict[str, Any] | None = None,
    ) -> AuditEntry:
        """The audit entry of this call with ``outcome`` (the target's state as it is now)."""
        entry = entry_for(
            self.spec, self.ctx, self.ctx.input, record, decision, outcome, self.state_before,
            target=self.target, detail=detail,
        )  # fmt: skip
        if self.touched:
            entry.detail = {**(entry.detail or {}), "touched": [t.as_json() for t in self.touched]}
        return entry

    def result(self) -> Outcome:
        entry = self.writes.entries[0] if self.writes.entries else None
        return Outcome(
            action=self.spec.name,
            status=self.spec.status,
            body=self.body,
            request_id=self.ctx.request_id,
            resource_id=entry.resource_id if entry is not None else None,
            version=self.version,
            balance=self.writes.balance,
        )


def entry_for(
    spec: ActionSpec,
    ctx: ActionContext,
    data: BaseModel | None,
    record: Any,
    decision: Decision | None,
    outcome: str,
    state_before: str | None,
    *,
    target: Any = None,
    detail: dict[str, Any] | None = None,
) -> AuditEntry:
    """An audit entry for ``spec`` called in ``ctx``: who, as whom, with what scope, on what."""
    actor = ctx.actor
    resource = spec.resource
    if record is not None and resource is not None:
        resource_id: str | None = resource.identity(record)
    else:
        resource_id = None if target is None else str(target)[:128]
    if actor.scopes is None or actor.on_behalf_of is not None:
        detail = {**(detail or {}), **_credential(actor)}
    if "batch" in ctx.extra:  # an item of a bulk request: its key and position (data.bulk)
        detail = {**(detail or {}), "batch": ctx.extra["batch"]}
    return AuditEntry(
        at=ctx.now,
        tenant=actor.tenant_id,
        subject=actor.subject.id,
        subject_kind=str(actor.subject.kind),
        real_actor=actor.id if actor.is_impersonating else None,
        scopes=sorted(actor.scopes or ()),
        channel=str(ctx.channel),
        action=spec.name,
        resource_type=resource.name if resource else None,
        resource_id=resource_id,
        reason=ctx.reason,
        decision="allow" if decision and decision.allowed else "deny",
        rule=_rule(decision),
        outcome=outcome,
        request_id=ctx.request_id,
        idempotency_key=ctx.idempotency_key,
        state_before=state_before,
        state_after=resource.state_of(record) if resource else None,
        input_digest=digest_input(data),
        detail=detail,
    )


def _credential(actor: Actor) -> dict[str, Any]:
    """What the entry's ``scopes`` column cannot say: no credential, or the grant's scopes."""
    out: dict[str, Any] = {}
    if actor.scopes is None:
        out["credential"] = "none (an actor built in code, not narrowed by scopes)"
    if actor.on_behalf_of is not None:
        granted = actor.granted_scopes
        out["granted_scopes"] = None if granted is None else sorted(granted)
        if actor.session is not None:  # a support session's credential (charter.sessions)
            out["session"] = actor.session
    return out


#: The ``rule`` column of a denial no named rule decided.
_DENIAL_RULES = {
    DecisionKind.NO_RULE: "default-deny",
    DecisionKind.NOT_FOUND: "not-found",
    DecisionKind.ERROR: "evaluation-error",
}


def _rule(decision: Decision | None) -> str | None:
    if decision is None or decision.rule is not None or decision.allowed:
        return decision.rule if decision is not None else None
    return _DENIAL_RULES.get(decision.kind)


class Refusal(Exception):
    """A stage refuses the call: the runner rolls back, audits the refusal, raises ``error``."""

    def __init__(self, error: CharterError, decision: Decision | None, record: Any) -> None:
        self.error = error
        self.decision = decision
        self.record = record


@dataclass(frozen=True, slots=True)
class Stage:
    """One named step of a pipeline: a function over the :class:`Call`.

    ``phase`` is ``"prepare"`` (before the transaction: no database) or
    ``"transaction"`` (inside it, with ``call.session``). A stage fills in its
    part of the call, or raises :class:`Refusal` (audited) or a
    :class:`~charter.errors.CharterError` (not audited: bad input).
    """

    name: str
    run: Callable[[Call], None]
    phase: Literal["prepare", "transaction"] = "transaction"

    @property
    def summary(self) -> str:
        """The first line of the stage function's docstring: what it does, for reviewers."""
        doc = (self.run.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def __str__(self) -> str:
        return self.name
