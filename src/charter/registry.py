"""Declarations: the resources and actions an application registers, checked at start-up."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel

from .actions import ActionSpec, Handler
from .actor import Actor
from .context import ActionContext
from .decision import Decision, DecisionKind
from .errors import ConfigurationError, UnknownAction
from .idempotency import IdempotencyMode
from .resources import ResourceSpec

__all__ = ["Registry"]

log = logging.getLogger("charter")

F = TypeVar("F", bound=Handler)


class Registry:
    """Resources and actions by name; every declaration is validated when it is made."""

    def __init__(self) -> None:
        self._resources: dict[type[Any], ResourceSpec] = {}
        self._resource_names: dict[str, ResourceSpec] = {}
        self._actions: dict[str, ActionSpec] = {}

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
    ) -> ResourceSpec:
        """Declare a mapped class as a resource; ``tenant=None`` must be explicit.

        ``view`` renders a record as JSON when a handler returns the record itself
        (after the gate has bumped its version).
        """
        spec = ResourceSpec.declare(
            model, name=name, tenant=tenant, state=state, version=version, view=view
        )
        if model in self._resources:
            raise ConfigurationError(f"resource {model.__name__} is declared twice")
        if spec.name in self._resource_names:
            raise ConfigurationError(f"two resources are named {spec.name!r}")
        self._resources[model] = spec
        self._resource_names[spec.name] = spec
        return spec

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
        idempotency: IdempotencyMode | str = IdempotencyMode.NONE,
    ) -> Callable[[F], F]:
        """Declare an action; use as a decorator on its handler.

        The handler is called as ``handler(ctx, record, data)`` where ``record``
        is the locked target (``None`` for creations and record-less actions)
        and ``data`` the validated input model.
        """

        def register(handler: F) -> F:
            self.register(
                name, handler, on=on, input=input, allow=allow,
                target=None if (creates or on is None) else target, creates=creates,
                reason_required=reason_required, sensitive_read=sensitive_read, scope=scope,
                impersonation=impersonation, listable=listable, status=status,
                idempotency=IdempotencyMode(idempotency),
            )
            return handler

        return register

    def register(self, name: str, handler: Handler, *, on: type[Any] | None, **options: Any) -> ActionSpec:
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
        spec = ActionSpec.declare(name, handler, resource=resource, **options)
        self._compile_policy(spec)
        self._actions[name] = spec
        return spec

    def _compile_policy(self, spec: ActionSpec) -> None:
        allow = spec.allow
        if allow is not None and not callable(allow):
            raise ConfigurationError(f"action {spec.name}: allow= must be a rule or a callable")

    @property
    def actions(self) -> Mapping[str, ActionSpec]:
        return dict(self._actions)

    @property
    def resources(self) -> Mapping[str, ResourceSpec]:
        return dict(self._resource_names)

    def spec(self, action: str) -> ActionSpec:
        try:
            return self._actions[action]
        except KeyError:
            raise UnknownAction(f"there is no action named {action!r}") from None

    # -- policy --------------------------------------------------------------------

    def decide(self, spec: ActionSpec, actor: Actor, record: Any, ctx: ActionContext) -> Decision:
        """Decide ``spec`` for ``actor`` on ``record``; fails closed on errors."""
        if spec.scope is not None and not actor.has_scope(spec.scope):
            return Decision.deny(
                DecisionKind.DENIED_BY_RULE, rule="scope",
                reason=f"the credential lacks scope {spec.scope!r}",
                public_reason=f"Your credential does not grant the {spec.scope} scope.",
            )
        if actor.is_impersonating and not spec.impersonation:
            return Decision.deny(
                DecisionKind.DENIED_BY_RULE, rule="no-impersonation",
                reason=f"{spec.name} cannot be performed on behalf of someone else",
                public_reason="This action cannot be performed while impersonating a user.",
            )
        if spec.allow is None:
            return Decision.deny(
                DecisionKind.NO_RULE, reason=f"no rule permits {spec.name}",
            )
        try:
            allowed = bool(spec.allow(actor.subject, record, ctx))
        except Exception as exc:
            log.error("policy for %s failed closed: %r", spec.name, exc)
            return Decision.deny(
                DecisionKind.ERROR, reason=f"rule raised {type(exc).__name__}: fails closed"
            )
        rule = getattr(spec.allow, "__name__", "allow")
        if allowed:
            return Decision.allow(rule)
        return Decision.deny(
            DecisionKind.NO_RULE, rule=rule, reason=f"predicate {rule} returned False",
        )

