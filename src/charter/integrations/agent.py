"""The agent channel: tools for automated agents, each call through the gate (issue 12, item 6).

An agent is an actor of kind ``agent`` in the application's directory. It acts
only *on behalf of* a user, and only where a declared impersonation grant lets
its roles act for that user (:mod:`charter.impersonation`): this is delegation,
decided by the gate on every call, audited with both identities::

    charter.allow_impersonation("assistant-for-members", by="assistant",
                                of_roles={"member"}, scopes={"invoices:read"})
    agents = AgentChannel(charter, directory=directory, signer=signer)
    token = agents.issue(ada, alice, scopes={"invoices:read"})  # the agent's bearer token

The token (:class:`~charter.tokens.TokenSigner`) says ``sub`` the user, ``act``
the agent (RFC 8693 section 4.1) and ``aud`` ``charter:agent``: the HTTP API
refuses it (an audience it does not ask for), and only this channel reads it.

* :meth:`AgentChannel.tools` — the tools the agent-for-user may call
  (:func:`charter.agent_tools.tool_definitions`);
* :meth:`AgentChannel.call` — one tool call: ``charter.execute`` on channel
  ``agent`` with the agent's stated ``purpose`` as the reason; the body passes
  field visibility, so a hidden field never reaches the agent;
* an action declared ``agent=Agent(confirm=True)`` is not run by the call: it
  leaves a pending request (:mod:`charter.confirmations`), audited, which a
  person other than the agent approves (:meth:`approve`) before it expires.
  The approval runs the original call, as the agent for the user, through the
  whole gate again: the rules decide on the record as it is then. The approver
  is answered with the action's body as both the agent-for-user and the approver
  may see it (field visibility, for each of them).

Who may approve: a person (a user or support actor, acting as themselves) of
the same tenant who is not the agent: the user the agent acted for, or a
holder of one of the action's ``Agent(approvers=...)`` roles, whose own
credential carries the action's scope (checked as the gate checks it: a token
issued with no scopes approves nothing). Never an agent, a service or a
partner.

The MCP server over this channel is :mod:`charter.integrations.mcp`.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from ..actions import ActionSpec, refuse_nul
from ..actor import Actor, ActorKind, Channel
from ..agent_tools import MAX_PURPOSE, ToolDefinition, is_delegated, possible
from ..audit import AuditEntry
from ..confirmations import (
    ConfirmationExpired,
    ConfirmationForbidden,
    ConfirmationNotPending,
    ConfirmationState,
    PendingRequest,
    confirmation_table,
    count_waiting,
    decide,
    expire,
    finish,
    load,
    lock_waiting,
    pending_of,
)
from ..context import ActionContext
from ..decision import Decision, DecisionKind
from ..errors import (
    CharterError,
    ConfigurationError,
    Forbidden,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    Unauthenticated,
    UnknownAction,
)
from ..gate import Charter
from ..idempotency.keys import IdempotencyKeyMissing, IdempotencyMode, validate_key
from ..idempotency.recovery import actor_from_snapshot, actor_snapshot
from ..outcome import Outcome
from ..pipeline.call import entry_for
from ..policy.visibility import redact_for
from ..ratelimit import default_class_of
from ..resources import request_id_or_new
from ..tokens import TokenSigner

__all__ = ["AGENT_AUDIENCE", "MAX_ARGUMENTS", "AgentChannel", "ToolResult"]

#: The ``aud`` of an agent's token: accepted by this channel only.
AGENT_AUDIENCE = "charter:agent"
#: The largest tool call's arguments, as JSON (bytes).
MAX_ARGUMENTS = 64 * 1024
_ARGUMENTS = frozenset({"purpose", "input", "target", "idempotency_key"})
_PERSONS = frozenset({ActorKind.USER, ActorKind.SUPPORT})
_MAX_ID = 128

Directory = Callable[[str, str], Actor | None]


@dataclass(frozen=True, slots=True)
class ToolResult:
    """What a tool call answers: the action's (visible) body, or the pending request."""

    status: str  # "ok" or "pending_confirmation"
    body: Any
    request_id: str
    replayed: bool = False

    def as_json(self) -> dict[str, Any]:
        key = "result" if self.status == "ok" else "confirmation"
        return {"status": self.status, key: self.body, "request_id": self.request_id,
                "replayed": self.replayed}  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Arguments:
    purpose: str
    input: dict[str, Any]
    target: Any
    key: str | None


class AgentChannel:
    """Tools, tool calls, agent tokens and confirmations over one Charter (see the module)."""

    def __init__(
        self,
        charter: Charter,
        *,
        directory: Directory,
        signer: TokenSigner | None = None,
        audience: str = AGENT_AUDIENCE,
        max_pending: int = 100,
        max_tenant_pending: int = 1000,
    ) -> None:
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ConfigurationError("AgentChannel(max_pending=) is a positive integer")
        if (
            isinstance(max_tenant_pending, bool)
            or not isinstance(max_tenant_pending, int)
            or max_tenant_pending < 1
        ):
            raise ConfigurationError("AgentChannel(max_tenant_pending=) is a positive integer")
        self.charter = charter
        self.directory = directory
        self.signer = signer
        self.audience = audience
        #: The most requests one agent may leave waiting in a tenant at once.
        self.max_pending = max_pending
        #: The most requests all agents together may leave waiting in a tenant at once:
        #: every waiting request stays in view of :meth:`pending` (which reads this many).
        self.max_tenant_pending = max_tenant_pending

    # -- credentials -----------------------------------------------------------------------

    def issue(self, agent: Actor, user: Actor, *, scopes: Any) -> str:
        """A bearer token for ``agent`` acting on behalf of ``user``, narrowed to ``scopes``."""
        if agent.kind is not ActorKind.AGENT or user.kind is ActorKind.AGENT:
            raise ConfigurationError("an agent token is issued to an agent, for a non-agent user")
        if agent.tenant != user.tenant:
            raise ConfigurationError("an agent acts for users of its own tenant only")
        return self._signer().issue(user.id, user.tenant, scopes=scopes, audience=self.audience,
                                    act=agent.id)  # fmt: skip

    def authenticate(self, token: str | None) -> Actor:
        """The agent on behalf of its user that ``token`` names, looked up now (or 401)."""
        if not token:
            raise Unauthenticated("Send an Authorization: Bearer <agent token> header.")
        claims = self._signer().verify(token, audience=self.audience)
        act = claims.get("act")
        agent_id = act.get("sub") if isinstance(act, Mapping) else None
        if (
            not isinstance(act, Mapping)
            or set(act) != {"sub"}  # no delegation chains
            or "sid" in claims  # a support session's token is not an agent's
            or not isinstance(agent_id, str)
            or not 0 < len(agent_id) <= _MAX_ID
        ):
            raise Unauthenticated("The bearer token is not an agent's token.")
        tenant, user_id = str(claims["tenant"]), str(claims["sub"])
        agent, user = self.directory(tenant, agent_id), self.directory(tenant, user_id)
        if agent is None or agent.kind is not ActorKind.AGENT:
            raise Unauthenticated("The token's agent is not a known agent.")
        if user is None or user.kind is ActorKind.AGENT or user.id == agent.id:
            raise Unauthenticated("The user the agent acts for does not exist.")
        scopes = frozenset(str(claims.get("scope") or "").split())
        real = Actor(id=agent.id, tenant=agent.tenant, kind=agent.kind, roles=agent.roles,
                     scopes=scopes, attributes=agent.attributes)  # fmt: skip
        subject = Actor(id=user.id, tenant=user.tenant, kind=user.kind, roles=user.roles,
                        attributes=user.attributes)  # fmt: skip
        return real.impersonate(subject)

    def authenticate_header(self, authorization: str | None) -> Actor:
        """:meth:`authenticate` for an ``Authorization: Bearer ...`` header."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            raise Unauthenticated("Send an Authorization: Bearer <agent token> header.")
        return self.authenticate(token.strip())

    def _signer(self) -> TokenSigner:
        if self.signer is None:
            raise ConfigurationError("AgentChannel needs signer= to issue or read agent tokens")
        return self.signer

    # -- tools -----------------------------------------------------------------------------

    def tools(self, actor: Actor) -> tuple[ToolDefinition, ...]:
        """The tools ``actor`` (an agent on behalf of a user) may call; none for anyone else."""
        return self.charter.tools(actor)

    def call(
        self, actor: Actor, name: str, arguments: Any, *, request_id: str | None = None
    ) -> ToolResult:
        """Call tool ``name`` as ``actor``: run its action through the gate, or leave it pending."""
        if not is_delegated(actor):
            raise Unauthenticated("Tools are called by an agent acting on behalf of a user.")
        spec = self._exposed(name)
        args = _parse(spec, arguments)
        request_id = request_id_or_new(request_id)
        if spec.agent is not None and spec.agent.confirm:
            pending = self._request(actor, spec, args, request_id)
            return ToolResult("pending_confirmation", pending.as_json(), request_id)
        outcome = self.charter.execute(
            actor, name, args.input, target=args.target, key=args.key, reason=args.purpose,
            channel=Channel.AGENT, request_id=request_id,
        )  # fmt: skip
        return ToolResult("ok", self._visible(spec, actor, outcome), request_id, outcome.replayed)

    def _exposed(self, name: str) -> ActionSpec:
        spec = self.charter.actions.get(name) if isinstance(name, str) else None
        if spec is None or spec.agent is None:  # an action not exposed is no tool at all
            raise UnknownAction(f"there is no tool named {str(name)[:_MAX_ID]!r}")
        return spec

    def _visible(self, spec: ActionSpec, actor: Actor, outcome: Outcome) -> Any:
        # The pipeline's visibility stage already left hidden fields out; this is the
        # channel's own guarantee, whatever the pipeline holds.
        return redact_for(spec.resource, self.charter.resolve(actor), outcome.body)

    # -- confirmations ---------------------------------------------------------------------

    def _request(
        self, actor: Actor, spec: ActionSpec, args: _Arguments, request_id: str
    ) -> PendingRequest:
        """Check the call as far as it can be without running it, then store it, audited."""
        resolved = self.charter.resolve(actor)
        data = spec.validate(args.input)  # 422 now, not when a person approves it
        ctx = ActionContext(action=spec.name, actor=resolved, channel=Channel.AGENT,
                            now=self.charter.clock(), request_id=request_id,
                            reason=args.purpose, idempotency_key=args.key, input=data)  # fmt: skip
        self._count(spec, ctx)
        policy = self.charter.policy_of(spec.name)
        denial = policy.credential_denial(resolved)
        if denial is None and not possible(spec, policy, resolved, ctx.now):
            denial = Decision.deny(
                DecisionKind.NO_RULE, reason=f"no rule of {spec.name} can allow this actor",
            )  # fmt: skip
        committer = self.charter.pipeline_of(spec.name).committer
        if denial is not None:
            committer.alone(entry_for(spec, ctx, data, None, denial, "forbidden", None,
                                      target=args.target,
                                      detail={"explanation": denial.reason}))  # fmt: skip
            raise Forbidden(denial.public_reason, decision=denial)
        assert spec.agent is not None
        expires_at = ctx.now + spec.agent.expires
        row: dict[str, Any] = {
            "id": secrets.token_hex(16), "tenant": resolved.tenant_id, "action": spec.name,
            "target": None if args.target is None else str(args.target),
            "input": data.model_dump(mode="json"), "purpose": args.purpose,
            "agent": resolved.id, "subject": resolved.subject.id,
            "actor": actor_snapshot(resolved), "idempotency_key": args.key,
            "request_id": request_id, "state": ConfirmationState.PENDING,
            "created_at": ctx.now, "expires_at": expires_at,
        }  # fmt: skip
        allowed = Decision.allow("confirmation-requested", "stored for a person's confirmation")
        detail = {"confirmation": row["id"], "expires_at": expires_at.isoformat()}
        entry = entry_for(spec, ctx, data, None, allowed, "confirmation_pending", None,
                          target=args.target, detail=detail)  # fmt: skip
        with committer.transaction() as (session, lease):
            connection = session.connection()
            # Counted under the tenant's lock (SQLite: the write transaction), so concurrent
            # requests see each other: neither cap is exceeded, whatever the concurrency.
            lock_waiting(connection, row["tenant"])
            in_tenant, of_agent = count_waiting(connection, row["tenant"], resolved.id, ctx.now)
            if of_agent >= self.max_pending:
                raise ConfirmationNotPending(
                    f"{self.max_pending} requests of this agent already wait for confirmation"
                )
            if in_tenant >= self.max_tenant_pending:
                raise ConfirmationNotPending(
                    f"{self.max_tenant_pending} requests already wait for confirmation in "
                    "this tenant"
                )
            connection.execute(confirmation_table.insert(), row)
            committer.write(session, lease, [entry], None, connection)
        return PendingRequest.of(_Row(row))

    def _count(self, spec: ActionSpec, ctx: ActionContext) -> None:
        """A pending request counts against the action's rate class, like the call it stands for."""
        limiter = self.charter.rate_limiter
        if limiter is None:
            return
        cls = limiter.rate_class(spec.rate or default_class_of(spec))
        call_spec, call_ctx = spec, ctx

        def audit(detail: dict[str, object]) -> AuditEntry:
            return entry_for(call_spec, call_ctx, None, None, None, "rate_limited", None,
                             detail=detail)  # fmt: skip

        limiter.check(cls, limiter.who(ctx.actor.tenant_id, ctx.actor.id), ctx.now, audit)

    def pending(self, person: Actor, *, limit: int = 50) -> list[PendingRequest]:
        """The requests waiting for ``person``'s confirmation (not expired), oldest first."""
        limit = max(1, min(int(limit), 200))
        with self.charter.session() as session:
            # The tenant's cap is this many: every request still waiting is read.
            found = pending_of(session.connection(), person.tenant_id, self.charter.clock(),
                               self.max_tenant_pending)  # fmt: skip
        return [p for p in found if self._approver_refusal(person, p) is None][:limit]

    def get(self, person: Actor, request_id: str) -> PendingRequest:
        """One request of ``person``'s tenant, if they may decide it or it is theirs (else 404)."""
        request = self._load(person, request_id)
        if self._approver_refusal(person, request) is not None and person.id != request.agent:
            raise NotFound(f"confirmation {request_id[:_MAX_ID]} was not found")
        return request

    def approve(
        self, person: Actor, request_id: str, *, channel: Channel | str = Channel.HTTP
    ) -> Outcome:
        """Approve a pending request and run it, as the agent for the user, through the gate.

        Refused: by anyone but a person allowed to approve (403, audited); once
        decided (409); after it expired (410, audited). The run is decided again
        in full; its refusal is raised as it is (403, 409...) and the request is
        ``failed``. The answer's body passes field visibility for the agent-for-user (as
        the call would) and for ``person``: a field hidden from either is left out.
        """
        request, spec, ctx = self._claim(person, request_id, ConfirmationState.APPROVED, channel)
        actor = self._actor_of(request)
        key = request.idempotency_key
        if key is None and spec.idempotency is not IdempotencyMode.NONE:
            key = f"confirmation:{request.id}"  # approving twice never runs it twice
        try:
            if actor is None:
                raise ConfirmationForbidden("the agent or the user it acted for no longer exists")
            outcome = self.charter.execute(
                actor, request.action, dict(request.input), target=request.target, key=key,
                reason=request.purpose, channel=Channel.AGENT, request_id=request.request_id,
            )  # fmt: skip
        except CharterError as exc:
            self._finish(request.id, ConfirmationState.FAILED, exc.code)
            raise
        self._finish(request.id, ConfirmationState.EXECUTED, "ok")
        # The body is the agent-for-user's view (the pipeline's visibility stage, also what a
        # replay of the call holds); the approver reads it too, so it is also redacted for
        # them: only the fields both may see. Redaction only removes fields.
        body = redact_for(spec.resource, self.charter.resolve(person), outcome.body, ctx)
        return outcome if body is outcome.body else replace(outcome, body=body)

    def reject(
        self, person: Actor, request_id: str, *, channel: Channel | str = Channel.HTTP
    ) -> PendingRequest:
        """Refuse a pending request: it never runs (the same people who may approve it)."""
        request, _, _ = self._claim(person, request_id, ConfirmationState.REJECTED, channel)
        return self._load(person, request.id)

    def _claim(
        self, person: Actor, request_id: str, to: ConfirmationState, channel: Channel | str
    ) -> tuple[PendingRequest, ActionSpec, ActionContext]:
        """Move ``request_id`` from pending to ``to`` for ``person`` (audited), with the
        person's context (for what they are then shown)."""
        request = self._load(person, request_id)
        spec = self._exposed(request.action)
        now = self.charter.clock()
        ctx = ActionContext(action=spec.name, actor=person, channel=Channel(channel), now=now,
                            request_id=request.request_id,
                            reason=f"confirmation {request.id}")  # fmt: skip
        committer = self.charter.pipeline_of(spec.name).committer
        refusal = self._approver_refusal(person, request)
        if refusal is not None:
            committer.alone(self._entry(spec, ctx, request, "confirmation_forbidden", refusal))
            raise ConfirmationForbidden(refusal.reason)
        if request.state is not ConfirmationState.PENDING:
            raise ConfirmationNotPending(f"confirmation {request.id} is {request.state}")
        if request.expired(now):
            with committer.transaction() as (session, lease):
                expire(session.connection(), request, now)
                entry = self._entry(spec, ctx, request, "confirmation_expired", _refused("expired"))
                committer.write(session, lease, [entry], None)
            raise ConfirmationExpired(f"confirmation {request.id} expired at "
                                      f"{request.expires_at.isoformat()}")  # fmt: skip
        with committer.transaction() as (session, lease):
            if not decide(session.connection(), request, to, person.id, now):
                raise ConfirmationNotPending(f"confirmation {request.id} was decided meanwhile")
            outcome = "confirmation_approved" if to is ConfirmationState.APPROVED else (
                "confirmation_rejected")  # fmt: skip
            committer.write(session, lease, [self._entry(spec, ctx, request, outcome, None)], None)
        return request, spec, ctx

    def _approver_refusal(self, person: Actor, request: PendingRequest) -> Decision | None:
        """Why ``person`` may not decide ``request`` (the denial to audit), or None if they may."""
        reason = _person_refusal(person, request, self.charter.actions.get(request.action))
        if reason is not None:
            return _refused(reason)
        # Deciding is acting on the action: the person's own credential must carry its scope,
        # checked as the gate checks it (a token issued with no scopes decides nothing).
        return self.charter.policy_of(request.action).credential_denial(person)

    def _entry(
        self,
        spec: ActionSpec,
        ctx: ActionContext,
        request: PendingRequest,
        outcome: str,
        refusal: Decision | None,
    ) -> AuditEntry:
        decision = (
            Decision.allow("confirmation", "a person decided the agent's request")
            if refusal is None
            else refusal
        )
        detail = {"confirmation": request.id, "agent": request.agent,
                  "on_behalf_of": request.subject}  # fmt: skip
        return entry_for(spec, ctx, None, None, decision, outcome, None, target=request.target,
                         detail=detail)  # fmt: skip

    def _load(self, person: Actor, request_id: str) -> PendingRequest:
        if not isinstance(request_id, str) or not 0 < len(request_id) <= 32:
            raise NotFound("confirmation not found")
        with self.charter.session() as session:
            request = load(session.connection(), person.tenant_id, request_id)
        if request is None:
            raise NotFound(f"confirmation {request_id} was not found")
        return request

    def _actor_of(self, request: PendingRequest) -> Actor | None:
        """The agent for the user as they are now (the directory's roles), the token's scopes."""
        snap = actor_from_snapshot(request.actor)
        agent = self.directory(request.tenant, request.agent)
        user = self.directory(request.tenant, request.subject)
        if agent is None or agent.kind is not ActorKind.AGENT or user is None:
            return None
        real = Actor(id=agent.id, tenant=agent.tenant, kind=agent.kind, roles=agent.roles,
                     scopes=snap.scopes, attributes=agent.attributes)  # fmt: skip
        subject = Actor(id=user.id, tenant=user.tenant, kind=user.kind, roles=user.roles,
                        attributes=user.attributes)  # fmt: skip
        return real.impersonate(subject)

    def _finish(self, request_id: str, state: ConfirmationState, outcome: str) -> None:
        with self.charter.runtime.write_session() as session:
            finish(session.connection(), request_id, state, outcome)
            session.commit()


def _person_refusal(person: Actor, request: PendingRequest, spec: ActionSpec | None) -> str | None:
    """Why ``person`` is not someone who may decide ``request``, or None if they are."""
    if spec is None or spec.agent is None:
        return f"{request.action} is no longer exposed to agents"
    if person.kind not in _PERSONS or person.on_behalf_of is not None:
        return "a confirmation is given by a person, acting as themselves"
    if person.id == request.agent:
        return "the agent cannot confirm its own request"
    if person.tenant != request.tenant:
        return "another tenant's request"
    if person.id != request.subject and person.roles.isdisjoint(spec.agent.approvers):
        return f"only {request.subject} or an approver of {request.action} may confirm it"
    return None


def _refused(reason: str) -> Decision:
    return Decision.deny(DecisionKind.DENIED_BY_RULE, rule="confirmation", reason=reason)


class _Row:
    """A stored row's mapping, as :meth:`PendingRequest.of` reads a database row."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._mapping = {**values, "decided_by": None, "decided_at": None, "outcome": None}


def _parse(spec: ActionSpec, arguments: Any) -> _Arguments:
    """A tool call's arguments, bounded and checked (422 ``invalid_input``, 413 too large)."""
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, Mapping):
        raise InvalidInput("a tool's arguments are a JSON object", errors=[])
    try:
        size = len(json.dumps(arguments, default=str))
    except (TypeError, ValueError) as exc:
        raise InvalidInput("a tool's arguments are JSON", errors=[]) from exc
    if size > MAX_ARGUMENTS:
        raise PayloadTooLarge(f"a tool's arguments are at most {MAX_ARGUMENTS} bytes of JSON")
    refuse_nul(dict(arguments), what=f"the arguments of {spec.name}")
    unknown = sorted(set(arguments) - _ARGUMENTS)
    if unknown:
        raise InvalidInput(f"unknown arguments: {', '.join(map(str, unknown))[:200]}",
                           errors=[{"loc": [u], "type": "extra_forbidden",
                                    "msg": "not an argument"} for u in unknown[:20]])  # fmt: skip
    purpose = arguments.get("purpose")
    if not isinstance(purpose, str) or not purpose.strip() or len(purpose) > MAX_PURPOSE:
        raise InvalidInput(
            f"purpose: say why this call is made (1 to {MAX_PURPOSE} characters); it is audited",
            errors=[{"loc": ["purpose"], "type": "missing", "msg": "a purpose is required"}],
        )
    data = arguments.get("input")
    if data is not None and not isinstance(data, Mapping):
        raise InvalidInput("input: a JSON object", errors=[])
    target = arguments.get("target")
    if spec.target == "argument":
        if isinstance(target, bool) or not isinstance(target, int | str):
            raise InvalidInput("target: the id of the record to act on", errors=[
                {"loc": ["target"], "type": "missing", "msg": "a target is required"}])  # fmt: skip
    elif target is not None:
        raise InvalidInput(f"{spec.name} takes no target", errors=[])
    key = arguments.get("idempotency_key")
    if spec.idempotency is IdempotencyMode.NONE and key is not None:
        raise InvalidInput(f"{spec.name} takes no idempotency_key", errors=[])
    if spec.idempotency is IdempotencyMode.REQUIRED and key is None:
        raise IdempotencyKeyMissing(f"{spec.name} needs an idempotency_key")
    return _Arguments(purpose.strip(), dict(data or {}), target, validate_key(key))
