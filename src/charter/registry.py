"""Declarations: the resources and actions an application registers, checked at start-up."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from pydantic import BaseModel

from .actions import ActionSpec, Handler, Locks
from .actor import Actor
from .context import ActionContext
from .decision import Decision, DecisionKind
from .errors import ConfigurationError, NotFound, UnknownAction
from .idempotency.keys import IdempotencyMode
from .impersonation import ImpersonationGrant, ImpersonationGrants
from .policy import (
    ActionPolicy,
    PermissionMatrix,
    PolicySet,
    R,
    Readers,
    Rule,
    permission_matrix,
)
from .policy.visibility import check_visible
from .resources import ResourceSpec, declared_for
from .workflow.model import Transition, Workflow

__all__ = ["Registry"]


F = TypeVar("F", bound=Handler)


class Registry:
    """Resources and actions by name; every declaration is validated when it is made.

    ``on_action`` is called with each action's spec and compiled policy once it
    is declared (the gate assembles the action's pipeline then); ``clock`` is the
    Charter's, by which :meth:`allowed_actions` judges a flow's deadlines when it
    is given no context (as ``execute`` does).
    """

    def __init__(
        self,
        on_action: Callable[[ActionSpec, ActionPolicy], None],
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._on_action = on_action
        self._clock = clock
        self._resources: dict[type[Any], ResourceSpec] = {}
        self._resource_names: dict[str, ResourceSpec] = {}
        self._actions: dict[str, ActionSpec] = {}
        self._policies: dict[str, ActionPolicy] = {}
        self.policy = PolicySet()
        self.impersonation = ImpersonationGrants()
        #: Who may read a record: its resource's sensitive reads (``conceal``).
        self.readers = Readers()
        #: Declared workflows by mapped class (live: the workflow guard reads it).
        self.workflows: dict[type[Any], Workflow] = {}

    # -- declarations --------------------------------------------------------------

    def resource(
        self,
        model: type[Any],
        *,
        tenant: str | None,
        state: str | None = None,
        version: str | None = None,
        name: str | None = None,
        view: Callable[[Any], Any] | None = None,
        conceal: bool = True,
        visible: Mapping[str, Any] | None = None,
    ) -> ResourceSpec:
        """Declare a mapped class as a resource; ``tenant=None`` must be explicit.

        ``view`` renders a record as JSON when a handler returns the record itself
        (after the gate has bumped its version). ``conceal`` (default on): a denied
        action on a record the actor may not read answers 404, like a missing record.
        ``visible``: fields only some actors see, ``{"bank_account": A.has_role("finance")}``
        (:mod:`charter.policy.visibility`); hidden from everyone else in every output.
        """
        spec = ResourceSpec.declare(
            model, name=name, tenant=tenant, state=state, version=version, view=view,
            conceal=conceal,
        )  # fmt: skip
        if visible:
            spec = dataclasses.replace(spec, visible=check_visible(spec, visible))
        if model in self._resources:
            raise ConfigurationError(f"resource {model.__name__} is declared twice")
        if spec.name in self._resource_names:
            raise ConfigurationError(f"two resources are named {spec.name!r}")
        self._resources[model] = spec
        self._resource_names[spec.name] = spec
        return spec

    def workflow(
        self,
        model: type[Any],
        *,
        states: Sequence[str],
        initial: str,
        transitions: Iterable[Transition],
        deadline: str | None = None,
        expires: Mapping[str, timedelta] | None = None,
        log: str | None = None,
    ) -> Workflow:
        """Declare the states and transitions of a resource (:mod:`charter.workflow`).

        Declare it after the resource and before the actions that perform its
        transitions: each action's pipeline is assembled when it is declared.
        """
        resource = self._resources.get(model)
        if resource is None:
            raise ConfigurationError(
                f"workflow: {getattr(model, '__name__', model)!r} is not a declared resource"
            )
        if model in self.workflows:
            raise ConfigurationError(f"resource {resource.name} already has a workflow")
        declared = [a for a in self._actions.values() if a.resource is resource]
        if declared:
            raise ConfigurationError(
                f"workflow of {resource.name}: declare it before its actions "
                f"({declared[0].name} is already declared)"
            )
        workflow = Workflow.declare(
            resource, states=states, initial=initial, transitions=transitions,
            deadline=deadline, expires=expires, log=log,
        )  # fmt: skip
        taken = [a for a in workflow.transitions if a in self._actions]
        if taken:
            raise ConfigurationError(
                f"workflow of {resource.name}: {taken[0]} is already declared on another resource"
            )
        for move in workflow.transitions.values():
            # The state condition as a rule too: lists and exports filter by it in SQL,
            # and the permission matrix shows it. The gate's transition stage refuses a
            # wrong state (409) before this rule could (403).
            condition = getattr(R, workflow.column).not_in(move.sources)
            if move.condition is not None:
                condition = condition | ~move.condition
            self.policy.deny(
                move.action, condition, name=f"workflow:{move.action}",
                message=f"{move.action} is not possible in this state.",
            )  # fmt: skip
        self.workflows[model] = workflow
        return workflow

    def action(
        self,
        name: str,
        *,
        on: type[Any] | None = None,
        input: type[BaseModel] | None = None,
        allow: Any = None,
        target: str | None = "argument",
        creates: bool = False,
        reason_required: bool = False,
        sensitive_read: bool = False,
        scope: str | None = None,
        impersonation: bool = True,
        listable: bool = False,
        status: int | None = None,
        idempotency: IdempotencyMode | str | None = None,
        by: str | None = None,
        locks: Locks | None = None,
        cost: Any = None,
        tags: Iterable[str] | None = None,
        rate: str | None = None,
        bulk: str | None = None,
        max_batch: int | None = None,
        agent: Any = None,
    ) -> Callable[[F], F]:
        """Declare an action; use as a decorator on its handler.

        The handler is called as ``handler(ctx, record, data)`` where ``record``
        is the locked target (``None`` for creations and record-less actions)
        and ``data`` the validated input model. ``by`` locates the target by a
        column unique within the tenant instead of the primary key; ``locks``
        names the further records the action acts on (``ctx.locked``). ``cost``
        is charged inside the action's transaction (:mod:`charter.credits`);
        ``tags`` are its risk tags (a credit cost adds ``financial``). ``rate``
        names its rate class (default: by what it is, :mod:`charter.ratelimit`).
        ``bulk`` (``"per_item"`` or ``"all_or_nothing"``) lets it take many items
        in one request, at most ``max_batch`` (:mod:`charter.data.bulk`).
        ``agent`` (``True`` or :class:`~charter.Agent`) exposes it as a tool to
        automated agents (:mod:`charter.exposure`); by default it is not.
        """

        def register(handler: F) -> F:
            self.register(
                name,
                handler,
                on=on,
                input=input,
                allow=allow,
                target=None if (creates or on is None) else target,
                creates=creates,
                reason_required=reason_required,
                sensitive_read=sensitive_read,
                scope=scope,
                impersonation=impersonation,
                listable=listable,
                status=status,
                idempotency=None if idempotency is None else IdempotencyMode(idempotency),
                by=by,
                locks=locks,
                cost=cost,
                tags=tags,
                rate=rate,
                bulk=bulk,
                max_batch=max_batch,
                agent=agent,
            )
            return handler

        return register

    def register(
        self, name: str, handler: Handler, *, on: type[Any] | None, **options: Any
    ) -> ActionSpec:
        """Register an action without the decorator (same options as :meth:`action`)."""
        if name in self._actions:
            raise ConfigurationError(f"action {name!r} is declared twice")
        resource = None
        if on is not None:
            resource = self._resources.get(on)
            if resource is None:
                raise ConfigurationError(
                    f"action {name}: {getattr(on, '__name__', on)!r} is not a declared resource; "
                    "call charter.resource(...) first"
                )
        elsewhere = [w for m, w in self.workflows.items() if m is not on and w.transition_of(name)]
        if elsewhere:
            raise ConfigurationError(
                f"action {name}: the workflow of {elsewhere[0].resource.name} names it; "
                f"declare it on={elsewhere[0].resource.model.__name__}"
            )
        workflow = self.workflows.get(on) if on is not None else None
        spec = ActionSpec.declare(name, handler, resource=resource, workflow=workflow, **options)
        self._compile_policy(spec)
        if spec.sensitive_read and resource is not None:
            self.readers.add(self._policies[spec.name])
        self._on_action(spec, self._policies[spec.name])
        self._actions[name] = spec
        return spec

    def _compile_policy(self, spec: ActionSpec) -> None:
        """Add the action's own rule and compile its policy now: errors surface at start-up."""
        if spec.allow is not None:
            self.policy.allow(spec.name, spec.allow, name=spec.name)
        self._policies[spec.name] = self.policy.compile(
            resource=spec.resource,
            action=spec.name,
            scope=spec.scope,
            impersonation=spec.impersonation,
            listable=spec.listable,
            creates=spec.creates,
        )

    def allow_impersonation(
        self,
        name: str,
        *,
        by: str | Iterable[str],
        of_roles: str | Iterable[str],
        scopes: str | Iterable[str],
        of_kinds: str | Iterable[str] = ("user",),
    ) -> ImpersonationGrant:
        """Let actors holding a ``by`` role act on behalf of subjects of ``of_kinds`` whose
        every role is in ``of_roles``, for actions whose scope ``scopes`` allows.

        Without a grant no impersonation is honoured (:mod:`charter.impersonation`).
        """
        return self.impersonation.add(
            ImpersonationGrant.declare(
                name, by=by, of_roles=of_roles, scopes=scopes, of_kinds=of_kinds
            )
        )

    def allow(self, pattern: str, condition: Any, *, name: str | None = None) -> Rule:
        """Allow actions matching ``pattern`` (``invoice.*``) when ``condition`` holds.

        Declare shared rules before the actions they cover: each action's policy
        is compiled (and validated) when the action is declared.
        """
        return self.policy.allow(pattern, condition, name=name)

    def deny(
        self, pattern: str, condition: Any, *, name: str | None = None, message: str | None = None
    ) -> Rule:
        """Deny actions matching ``pattern`` when ``condition`` holds; an explicit deny wins."""
        return self.policy.deny(pattern, condition, name=name, message=message)

    def policy_of(self, action: str) -> ActionPolicy:
        """The compiled policy of an action (to decide, explain or filter by hand)."""
        self.spec(action)
        return self._policies[action]

    @property
    def actions(self) -> Mapping[str, ActionSpec]:
        return dict(self._actions)

    @property
    def resources(self) -> Mapping[str, ResourceSpec]:
        return dict(self._resource_names)

    @property
    def by_model(self) -> Mapping[type[Any], ResourceSpec]:
        """Declared resources by mapped class (live: later declarations appear)."""
        return self._resources

    def spec(self, action: str) -> ActionSpec:
        try:
            return self._actions[action]
        except KeyError:
            raise UnknownAction(f"there is no action named {action!r}") from None

    # -- policy --------------------------------------------------------------------

    def allowed_actions(
        self, actor: Actor, record: Any, ctx: ActionContext | None = None
    ) -> dict[str, Decision]:
        """Every action on ``record``'s resource: allowed or not, and why (for UI buttons).

        Actions on the record only: not its resource's creations, nor the actions
        declared on it without a target (an export of the resource's records).

        On a resource with a workflow, an action its current state does not allow
        is denied as ``invalid_transition`` (``Decision.possible`` is false: not
        possible for anyone now), apart from the policy's "not allowed for you".
        """
        resource = declared_for(self._resources, type(record))
        if resource is None:
            raise ConfigurationError(f"{type(record).__name__} is not a declared resource")
        actor = self.impersonation.resolve(actor)
        workflow = declared_for(self.workflows, type(record))
        # One instant for every action: the context's, or the Charter's clock (never the
        # wall clock: execute() judges the same deadlines by the Charter's clock).
        now = ctx.now if ctx is not None else self._clock()
        decisions = {}
        for name, spec in self._actions.items():
            if spec.resource is resource and not spec.creates and spec.target is not None:
                impossible = _impossible(workflow, name, actor, record, ctx, now)
                decisions[name] = (
                    impossible
                    if impossible is not None
                    else self._policies[name].decide(actor, record, ctx)
                )
        if (
            resource.conceal
            and not any(d.allowed for d in decisions.values())
            and not self.readers.may_read(resource, actor, record, ctx)
        ):
            # Nothing allowed on a record the actor cannot read: that it exists is not told.
            raise NotFound(f"{resource.name} {resource.identity(record)} was not found")
        return decisions

    def matrix(
        self, *, roles: Sequence[str], states: Sequence[str] | None = None
    ) -> PermissionMatrix:
        """Roles x actions x states -> allow, deny or conditional, for review.

        A workflow's transitions are rules too (``workflow:<action>``): an action
        its resource's workflow does not allow in a state is ``deny`` there.
        """
        return permission_matrix(
            [self._policies[name] for name in self._actions], roles=roles, states=states
        )


def _impossible(
    workflow: Workflow | None,
    action: str,
    actor: Actor,
    record: Any,
    ctx: ActionContext | None,
    now: datetime,
) -> Decision | None:
    """The denial of an action ``record``'s state does not allow, or None if it is possible."""
    move = None if workflow is None else workflow.transition_of(action)
    if workflow is None or move is None:
        return None
    error = workflow.refusal(move, record, actor, ctx, now)
    if error is None:
        return None
    return Decision.deny(
        DecisionKind.INVALID_TRANSITION, rule="workflow", reason=error.message,
        public_reason=error.message,
    )  # fmt: skip
