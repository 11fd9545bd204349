"""Rules, rule sets and compiled action policies.

A :class:`PolicySet` collects :class:`Rule` objects (allow or deny, for an
action or a pattern such as ``invoice.*`` or ``*``). :meth:`PolicySet.compile`
resolves the patterns for one action *once*, validates every rule against the
resource's mapped columns, and returns an :class:`ActionPolicy` holding the
generated Python function and the rule tree for SQL. Per-call cost is
therefore independent of how many rules the set holds.

The compiled expression of an action is always::

    tenant & no_impersonation & scope & ~(deny_1 | deny_2 ...) & (allow_1 | allow_2 ...)

- **tenant** (``R.<tenant column> == A.tenant``, the subject's tenant) is
  added for every tenant-scoped resource, in Python and in SQL; no rule can
  remove it. A record of another tenant is reported as ``NOT_FOUND``.
- **no_impersonation** (``~A.impersonating``) when the action is declared
  with ``impersonation=False``.
- **scope** (``A.has_scope(scope)``): a credential without the action's scope
  cannot act, whatever the roles say.
- An explicit deny wins; without a matching allow, the default is deny.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from fnmatch import fnmatchcase
from typing import Any, Final, Literal, NamedTuple, TypeVar

import sqlalchemy as sa
from sqlalchemy import Select
from sqlalchemy.sql.elements import ColumnElement

from ..actor import Actor
from ..context import ActionContext
from ..decision import Decision, DecisionKind
from ..errors import ConfigurationError
from ..resources import ResourceSpec
from .expr import (
    NEVER,
    ORDERING,
    A,
    And,
    Compare,
    Condition,
    Const,
    Expr,
    HasScope,
    In,
    Not,
    Or,
    Predicate,
    Ref,
    Truthy,
    as_condition,
)
from .pyeval import compile_check, describe_leaf, evaluate, failures, first_error
from .sql import (
    FilterPlan,
    Shape,
    ShapeCache,
    category_of_column,
    relation,
    table_column,
    unfilterable_reason,
)
from .sqlvalues import aware_columns

__all__ = ["ActionPolicy", "BoundFilter", "BoundStatement", "PolicySet", "Rule", "allowed_actions"]

#: Shapes kept per action (each cache: bound clauses, page statements). A shape is
#: a combination of the actor facts the rules test (roles, None values, ...), so
#: an application has a handful per action; the bound only guards against a rule
#: whose shape varies with every actor.
SHAPE_CACHE_SIZE: Final = 256
_POLICY_NUMBERS = itertools.count(1)
T = TypeVar("T")


class BoundFilter(NamedTuple):
    """A WHERE clause with named parameters, and this actor's values for them."""

    where: ColumnElement[bool]
    params: dict[str, Any]


class BoundStatement(NamedTuple):
    """A complete statement with named parameters, and the values to execute it with."""

    statement: Select[Any]
    params: dict[str, Any]


Effect = Literal["allow", "deny"]
PredicateFn = Callable[[Any, Any, Any], object]
_CONTEXT_FIELDS = frozenset(f.name for f in fields(ActionContext))


@dataclass(frozen=True, slots=True, eq=False)
class Rule:
    """One rule: ``effect`` the ``condition`` for actions matching ``pattern``.

    ``message`` is an optional user-safe explanation shown as the
    ``public_reason`` when this deny rule decides.
    """

    effect: Effect
    pattern: str
    condition: Condition
    name: str
    message: str | None = None

    def matches(self, action: str) -> bool:
        return self.pattern == action or fnmatchcase(action, self.pattern)

    def __repr__(self) -> str:
        return f"Rule({self.effect} {self.pattern} {self.name!r}: {self.condition.text()})"


@dataclass(eq=False)
class PolicySet:
    """A collection of rules, compiled per (resource, action) into :class:`ActionPolicy`."""

    rules: list[Rule] = field(default_factory=list)
    _compiled: dict[tuple[str, str], ActionPolicy] = field(default_factory=dict, repr=False)

    def allow(
        self, pattern: str, condition: Condition | PredicateFn | bool, *, name: str | None = None
    ) -> Rule:
        """Allow actions matching ``pattern`` when ``condition`` holds."""
        return self._add("allow", pattern, condition, name, None)

    def deny(
        self,
        pattern: str,
        condition: Condition | PredicateFn | bool,
        *,
        name: str | None = None,
        message: str | None = None,
    ) -> Rule:
        """Deny actions matching ``pattern`` when ``condition`` holds; a deny always wins."""
        return self._add("deny", pattern, condition, name, message)

    def _add(
        self,
        effect: Effect,
        pattern: str,
        condition: Condition | PredicateFn | bool,
        name: str | None,
        message: str | None,
    ) -> Rule:
        if not isinstance(pattern, str) or not pattern:
            raise ConfigurationError("a rule needs an action name or pattern such as 'invoice.*'")
        node = _as_rule_condition(condition)
        rule_name = name or f"{effect}:{pattern}#{len(self.rules) + 1}"
        if any(r.name == rule_name for r in self.rules):
            raise ConfigurationError(f"rule name {rule_name!r} is already used")
        late = sorted(action for (_, action) in self._compiled if fnmatchcase(action, pattern))
        if late:
            raise ConfigurationError(
                f"rule {rule_name!r} ({pattern}) is declared after {', '.join(late)} was "
                "compiled; declare every rule before compiling the actions it covers"
            )
        rule = Rule(effect, pattern, node, rule_name, message)
        self.rules.append(rule)
        return rule

    def rules_for(self, action: str) -> list[Rule]:
        return [rule for rule in self.rules if rule.matches(action)]

    def compile(
        self,
        *,
        resource: ResourceSpec | None,
        action: str,
        scope: str | None = None,
        impersonation: bool = True,
        listable: bool = False,
        creates: bool = False,
    ) -> ActionPolicy:
        """Resolve, validate and compile the rules of one action (at declaration time).

        ``creates=True`` marks an action without a target record: ``R.``
        references are refused. ``listable=True`` marks an action used to
        filter lists and exports: every rule must compile to SQL exactly.
        """
        key = (resource.name if resource is not None else "", action)
        cached = self._compiled.get(key)
        if cached is not None:
            same = (cached.scope, cached.impersonation, cached.listable, cached.creates)
            if same != (scope, impersonation, listable, creates):
                raise ConfigurationError(f"action {action} is already compiled with other options")
            return cached
        policy = ActionPolicy(
            resource=resource,
            action=action,
            rules=tuple(self.rules_for(action)),
            scope=scope,
            impersonation=impersonation,
            listable=listable,
            creates=creates,
        )
        self._compiled[key] = policy
        return policy

    def compiled(self, resource: ResourceSpec) -> list[ActionPolicy]:
        """The action policies compiled so far for ``resource``, in declaration order."""
        return [p for (name, _), p in self._compiled.items() if name == resource.name]

    def allowed_actions(
        self, resource: ResourceSpec, actor: Any, record: Any, ctx: Any = None
    ) -> dict[str, Decision]:
        """What ``actor`` may do next to ``record``: each compiled action and its decision."""
        return allowed_actions(self.compiled(resource), actor, record, ctx)


def _impersonation_denial(action: str, scope: str | None, actor: Any) -> Decision | None:
    """Why the scope gate failed under impersonation, when the grant is the reason."""
    subject = getattr(actor, "on_behalf_of", None)
    if subject is None or scope is None:
        return None
    granted = getattr(actor, "granted_scopes", None)
    who = f"{actor.id} ({', '.join(sorted(actor.roles)) or 'no roles'})"
    whom = f"{subject.id} ({subject.kind}: {', '.join(sorted(subject.roles)) or 'no roles'})"
    if granted is None:
        reason = f"no impersonation grant lets {who} act on behalf of {whom}"
    elif not Actor.scopes_allow(granted, scope):
        reason = (
            f"the impersonation grants of {who} for {whom} do not cover the scope {scope!r} "
            f"required by {action}"
        )
    else:
        return None  # the grant covers it: the credential or the subject lacks the scope
    return Decision.deny(
        DecisionKind.DENIED_BY_RULE,
        rule="impersonation-grant",
        reason=reason,
        public_reason="You may not do this on behalf of this user.",
    )


def _as_rule_condition(condition: object) -> Condition:
    if isinstance(condition, Expr | bool):
        return as_condition(condition)
    if callable(condition):
        return Predicate(condition)
    raise ConfigurationError(
        f"a rule condition must be an expression or a callable, got {condition!r}"
    )


class ActionPolicy:
    """The compiled policy of one action on one resource.

    :meth:`decide` explains, :meth:`is_allowed` is its fast boolean twin,
    :meth:`where` / :meth:`apply` filter a query with the same rules.

    **Filtering on a hot path.** :meth:`where` builds the clause on every call
    (~150 µs of SQLAlchemy construction for a four-condition rule) and embeds the
    actor's values as anonymous literals, so its result can be combined with
    anything. :meth:`bound_where` and :meth:`page_statement` build the clause
    once per *shape* of the actor and context and keep it (bounded, thread-safe
    LRU of :data:`SHAPE_CACHE_SIZE` shapes per action); the values travel as
    named parameters, passed at execution::

        where, params = policy.bound_where(actor, ctx)
        rows = session.execute(select(Invoice).where(where), params)

        stmt, params = policy.page_statement(actor, ctx, limit=51, after=last_id)
        rows = session.execute(stmt, params).scalars()

    The shape (:meth:`filter_shape`) is what the actor and context change in the
    clause's *structure*, one entry per actor- or context-dependent part of the
    rules, in order: for a condition on the actor or context only
    (``A.has_role("approver")``, ``~A.impersonating``, the scope gate) its
    value, ``True``/``False``/``"raises"``; for an actor or context value
    compared with a column (``R.tenant_id == A.tenant``, ``R.amount <=
    A.approval_limit``) whether reading it raises, is ``None``, is of a type
    that never equals the column's, or else how it binds (as the column, or
    the SQL type of its literal); for a column ``in_()`` an actor or context
    collection, whether it raises, holds ``None``, and how its matching
    options bind. The values themselves (tenant, id, limit, the options) are
    never part of it. The compiler decides the clause's structure from the
    shape alone, so the bound clause selects, for every actor of that shape,
    exactly the rows :meth:`where` selects (the property tests check both).
    """

    def __init__(
        self,
        *,
        resource: ResourceSpec | None,
        action: str,
        rules: tuple[Rule, ...],
        scope: str | None = None,
        impersonation: bool = True,
        listable: bool = False,
        creates: bool = False,
    ) -> None:
        self.resource = resource
        self.action = action
        self.scope = scope
        self.impersonation = impersonation
        self.listable = listable
        self.creates = creates
        self.rules = rules
        self.denies = tuple(r for r in rules if r.effect == "deny")
        self.allows = tuple(r for r in rules if r.effect == "allow")
        self.gates: list[tuple[str, Condition]] = []
        if resource is not None and resource.tenant is not None and not creates:
            self.gates.append(("tenant", Compare("==", Ref("R", (resource.tenant,)), A.tenant)))
        if not impersonation:
            self.gates.append(("impersonation", Not(Truthy(A.impersonating))))
        if scope is not None:
            self.gates.append(("scope", HasScope(scope)))
        self._validate()
        self._is_allowed, self._which, self.source = compile_check(
            [g for _, g in self.gates],
            [r.condition for r in self.denies],
            [r.condition for r in self.allows],
            name=action,
            aware=_aware_columns(resource),
        )
        # Decisions are immutable: the allowed ones are built once, not per call.
        self._allowed = tuple(
            Decision.allow(rule.name, f"{action} allowed by rule {rule.name}")
            for rule in self.allows
        )
        self._prefix = f"charter_f{next(_POLICY_NUMBERS)}_"  # this action's parameter names
        self._plan: FilterPlan | None = None
        self._clauses: ShapeCache[Shape, ColumnElement[bool]] = ShapeCache(SHAPE_CACHE_SIZE)
        self._pages: ShapeCache[tuple[bool, Shape], Select[Any]] = ShapeCache(SHAPE_CACHE_SIZE)

    # -- declaration-time validation ---------------------------------------------------

    def _validate(self) -> None:
        if self.listable and self.resource is None:
            raise ConfigurationError(f"action {self.action}: listable=True needs a resource")
        for rule in self.rules:
            for node in rule.condition.walk():
                if isinstance(node, Ref):
                    self._check_ref(rule, node)
                elif isinstance(node, Compare | In):
                    self._check_types(rule, node)
            if self.listable and self.resource is not None:
                reason = unfilterable_reason(rule.condition, self.resource)
                if reason is not None:
                    raise ConfigurationError(
                        f"action {self.action} is listable but rule {rule.name!r} cannot "
                        f"filter a query: {reason}",
                        rule=rule.name,
                    )

    def _check_ref(self, rule: Rule, ref: Ref) -> None:
        where = f"action {self.action}, rule {rule.name!r}"
        if ref.root == "C" and ref.path[0] not in _CONTEXT_FIELDS:
            raise ConfigurationError(
                f"{where}: {ref.text()} is not a context field "
                f"(known: {', '.join(sorted(_CONTEXT_FIELDS))})"
            )
        if ref.root != "R":
            return
        if self.creates:
            raise ConfigurationError(
                f"{where}: {ref.text()} refers to the record, but this action creates one "
                "(there is no record yet)"
            )
        if self.resource is None:
            raise ConfigurationError(f"{where}: {ref.text()} needs a resource")
        columns = self.resource.columns
        if len(ref.path) != 1 or ref.path[0] not in columns:
            raise ConfigurationError(
                f"{where}: {ref.text()} is not a column of {self.resource.name} "
                f"(columns: {', '.join(sorted(columns))})"
            )

    def _check_types(self, rule: Rule, node: Compare | In) -> None:
        if self.resource is None or self.creates:
            return
        if isinstance(node, Compare):
            for side in (node.left, node.right):
                if (
                    node.op in ORDERING
                    and isinstance(side, Ref)
                    and side.root == "R"
                    and side.path[0] in self.resource.columns
                    and category_of_column(table_column(self.resource, side.path[0])).startswith(
                        "enum:"
                    )
                ):
                    raise ConfigurationError(
                        f"action {self.action}, rule {rule.name!r}: {node.text()} orders an "
                        "enum column; enums support ==, != and in_() only",
                        rule=rule.name,
                    )
            pairs = [(node.left, node.right), (node.right, node.left)]
            for ref, other in pairs:
                if not (isinstance(ref, Ref) and ref.root == "R" and isinstance(other, Const)):
                    continue
                if other.value is None:
                    if node.op in ORDERING:
                        raise ConfigurationError(
                            f"rule {rule.name!r}: {node.text()} compares with None, which "
                            "always raises; use .is_none()"
                        )
                    continue
                self._check_value(rule, node, ref, other.value)
        elif (
            isinstance(node.item, Ref) and node.item.root == "R" and isinstance(node.options, Const)
        ):
            for option in node.options.value:
                if option is not None:
                    self._check_value(rule, node, node.item, option)

    def _check_value(self, rule: Rule, node: Expr, ref: Ref, value: Any) -> None:
        if self.resource is None or ref.path[0] not in self.resource.columns:
            return  # reported by _check_ref
        column = table_column(self.resource, ref.path[0])
        category = category_of_column(column)
        if relation(category, value) != "same":
            raise ConfigurationError(
                f"action {self.action}, rule {rule.name!r}: {node.text()} compares "
                f"{type(column.type).__name__} column {ref.path[0]!r} with "
                f"{type(value).__name__} {value!r}",
                rule=rule.name,
            )

    # -- deciding -----------------------------------------------------------------------

    def is_allowed(self, actor: Any, record: Any, ctx: Any = None) -> bool:
        """True when the action is allowed; any evaluation error counts as a denial."""
        try:
            return bool(self._is_allowed(actor, record, ctx))
        except Exception:
            return False

    def decide(self, actor: Any, record: Any, ctx: Any = None) -> Decision:
        """The explained :class:`~charter.decision.Decision` (slow path only on denial)."""
        try:
            index = self._which(actor, record, ctx)
        except Exception as exc:
            return self._error(exc, actor, record, ctx)
        if index >= 0:
            return self._allowed[index]
        return self._explain(actor, record, ctx)

    def credential_denial(self, actor: Any) -> Decision | None:
        """The denial a list owes before any row is read: the scope or impersonation gate.

        A page filtered by a false gate is merely empty; the caller is owed the
        reason (a credential without the scope, impersonation without a grant).
        """
        for label, gate in self.gates:
            if label != "tenant" and not evaluate(gate, actor, None, None):
                return self._gate_denial(label, gate, actor, None, None)
        return None

    def _error(self, exc: Exception, actor: Any, record: Any, ctx: Any) -> Decision:
        where = ""
        for label, node in self._parts():
            try:
                leaf = first_error(node, actor, record, ctx)
            except Exception:  # pragma: no cover - first_error guards its own leaves
                leaf = None
            if leaf is not None:
                where = f" in {label}, at {describe_leaf(leaf, actor, record, ctx)}"
                break
        return Decision.deny(
            DecisionKind.ERROR,
            reason=f"evaluating {self.action} failed{where}: {type(exc).__name__}: {exc}",
            public_reason="The request could not be authorized.",
        )

    def _parts(self) -> Iterator[tuple[str, Condition]]:
        yield from self.gates
        for rule in (*self.denies, *self.allows):
            yield f"rule {rule.name}", rule.condition

    def _explain(self, actor: Any, record: Any, ctx: Any) -> Decision:
        for label, gate in self.gates:
            if not evaluate(gate, actor, record, ctx):
                return self._gate_denial(label, gate, actor, record, ctx)
        return self._rule_denial(actor, record, ctx)

    def _gate_denial(
        self, label: str, gate: Condition, actor: Any, record: Any, ctx: Any
    ) -> Decision:
        """The explained denial of one failed gate (tenant, impersonation, scope)."""
        if label == "tenant":
            return Decision.deny(
                DecisionKind.NOT_FOUND,
                reason=f"record belongs to another tenant than {actor.tenant_id!r}",
                public_reason="Not found.",
                failed=tuple(failures(gate, True, actor, record, ctx)),
            )
        if label == "impersonation":
            return Decision.deny(
                DecisionKind.DENIED_BY_RULE,
                rule="no-impersonation",
                reason=(
                    f"{self.action} cannot be performed under impersonation "
                    f"({actor.id} acting on behalf of {actor.subject.id})"
                ),
                public_reason="This action cannot be performed while impersonating a user.",
            )
        denial = _impersonation_denial(self.action, self.scope, actor)
        if denial is not None:
            return denial
        return Decision.deny(
            DecisionKind.DENIED_BY_RULE,
            rule="scope",
            reason=f"the credential lacks the scope {self.scope!r} required by {self.action}",
            public_reason=f"Your credential does not carry the scope {self.scope!r}.",
            failed=tuple(failures(gate, True, actor, record, ctx)),
        )

    def _rule_denial(self, actor: Any, record: Any, ctx: Any) -> Decision:
        """The explained denial when every gate passed: a deny rule, or no allow matched."""
        for rule in self.denies:
            if evaluate(rule.condition, actor, record, ctx):
                matched = tuple(failures(rule.condition, False, actor, record, ctx))
                return Decision.deny(
                    DecisionKind.DENIED_BY_RULE,
                    rule=rule.name,
                    reason=f"{self.action} denied by rule {rule.name}: " + "; ".join(matched),
                    public_reason=rule.message or f"You are not allowed to perform {self.action}.",
                    failed=matched,
                )
        if not self.allows:
            return Decision.deny(
                DecisionKind.NO_RULE,
                reason=f"no rule allows {self.action} (deny by default)",
                public_reason=f"You are not allowed to perform {self.action}.",
            )
        explained = [
            (rule, failures(rule.condition, True, actor, record, ctx)) for rule in self.allows
        ]
        nearest, failed = min(explained, key=lambda pair: len(pair[1]))
        return Decision.deny(
            DecisionKind.NO_RULE,
            reason=(
                f"no rule allows {self.action}; nearest rule {nearest.name} failed: "
                + "; ".join(failed)
            ),
            public_reason=f"You are not allowed to perform {self.action}.",
            failed=tuple(failed),
        )

    # -- filtering ----------------------------------------------------------------------

    @property
    def condition(self) -> Condition:
        """The whole compiled expression (gates, denies and allows) as one tree."""
        parts: list[Condition] = [g for _, g in self.gates]
        if self.denies:
            parts.append(Not(_any(r.condition for r in self.denies)))
        parts.append(_any(r.condition for r in self.allows))
        return And(parts)

    def where(self, actor: Any, ctx: Any = None) -> ColumnElement[bool]:
        """A WHERE clause selecting exactly the records :meth:`is_allowed` allows.

        Built on every call, with the values as anonymous literals: safe to
        combine with any statement (even twice in one, for two actors). On a hot
        path, :meth:`bound_where` returns the same clause built once per shape.
        """
        plan = self._filter_plan()
        shape, values = plan.resolve(actor, ctx)
        return plan.build(shape, values)

    def apply(self, stmt: Select[Any], actor: Any, ctx: Any = None) -> Select[Any]:
        """``stmt`` with :meth:`where` added (tenant isolation included)."""
        return stmt.where(self.where(actor, ctx))

    def filter_shape(self, actor: Any, ctx: Any = None) -> Shape:
        """What ``actor`` and ``ctx`` change in the filter's structure (see the class doc)."""
        return self._filter_plan().resolve(actor, ctx)[0]

    def bound_where(self, actor: Any, ctx: Any = None) -> BoundFilter:
        """:meth:`where` built once per shape: ``(where, params)``, params passed at execution.

        ``where`` holds no actor or context value: they are the named parameters
        in ``params`` (``charter_f<n>_<i>``, unique to this action). It selects
        exactly the rows :meth:`where` selects. A statement may hold it once (two
        bound filters of the same action in one statement would share their
        parameter names: use :meth:`where` there).
        """
        plan = self._filter_plan()
        shape, values = plan.resolve(actor, ctx)
        return BoundFilter(self._bound_clause(plan, shape, values), plan.params(shape, values))

    def page_statement(
        self, actor: Any, ctx: Any = None, *, limit: int, after: Any = None
    ) -> BoundStatement:
        """One page of the records ``actor`` may act on, in id order: ``(statement, params)``.

        ``SELECT <model> WHERE [<id> > :after AND] <filter> ORDER BY <id> LIMIT
        :limit``, built once per (shape, whether ``after`` is given) and reused
        as is, so that SQLAlchemy's statement cache key is computed once too.
        ``limit`` is the number of rows to fetch (a caller that wants to know
        whether a next page exists asks for one more than it shows); ``after``
        is the last id of the previous page, already of the id's Python type,
        or ``None`` for the first page.
        """
        plan = self._filter_plan()
        shape, values = plan.resolve(actor, ctx)
        has_after = after is not None

        def build() -> Select[Any]:
            spec = plan.spec
            id_column = spec.column(spec.id)
            stmt = sa.select(spec.model).order_by(id_column)
            stmt = stmt.limit(sa.bindparam(f"{self._prefix}limit", type_=sa.Integer()))
            if has_after:
                stmt = stmt.where(id_column > sa.bindparam(f"{self._prefix}after"))
            return stmt.where(self._bound_clause(plan, shape, values))

        stmt = _cached(self._pages, (has_after, shape), build)
        params = plan.params(shape, values)
        params[f"{self._prefix}limit"] = limit
        if has_after:
            params[f"{self._prefix}after"] = after
        return BoundStatement(stmt, params)

    def filter_cache_info(self) -> dict[str, int]:
        """Sizes and hit counts of the shape caches (for tests and operators)."""
        return {
            "clauses": len(self._clauses),
            "clause_hits": self._clauses.hits,
            "clause_misses": self._clauses.misses,
            "pages": len(self._pages),
            "page_hits": self._pages.hits,
            "page_misses": self._pages.misses,
        }

    def _filter_plan(self) -> FilterPlan:
        plan = self._plan
        if plan is None:  # checked and planned once, on first use
            if self.resource is None or self.creates:
                raise ConfigurationError(f"action {self.action} has no records to filter")
            whole = self.condition
            reason = unfilterable_reason(whole, self.resource)
            if reason:
                raise ConfigurationError(f"action {self.action} cannot filter a query: {reason}")
            plan = self._plan = FilterPlan(whole, self.resource, self._prefix)
        return plan

    def _bound_clause(
        self, plan: FilterPlan, shape: Shape, values: list[Any]
    ) -> ColumnElement[bool]:
        return _cached(self._clauses, shape, lambda: plan.build(shape, values, named=True))

    def __repr__(self) -> str:
        resource = self.resource.name if self.resource is not None else None
        return f"<ActionPolicy {self.action} on {resource}: {len(self.rules)} rules>"


def _aware_columns(resource: ResourceSpec | None) -> frozenset[str]:
    """The resource's ``DateTime(timezone=True)`` columns (read as UTC when naive)."""
    if resource is None:
        return frozenset()
    return aware_columns({name: table_column(resource, name) for name in resource.columns})


def _cached(cache: ShapeCache[Any, T], key: Any, build: Callable[[], T]) -> T:
    try:
        value = cache.get(key)
    except TypeError:  # an unhashable shape (an exotic literal type): built, not kept
        return build()
    if value is None:
        value = cache.put(key, build())
    return value


def _any(conditions: Iterable[Condition]) -> Condition:
    items = list(conditions)
    if not items:
        return NEVER
    return items[0] if len(items) == 1 else Or(items)


def allowed_actions(
    policies: Iterable[ActionPolicy], actor: Any, record: Any, ctx: Any = None
) -> dict[str, Decision]:
    """For each action policy, whether ``actor`` may perform it on ``record`` now, and why."""
    return {policy.action: policy.decide(actor, record, ctx) for policy in policies}


class Readers:
    """Who may read a record: the sensitive reads declared on its resource (live).

    Behind a resource's ``conceal`` option: an action denied on a record the
    actor may not read answers 404, as if the record did not exist.
    """

    def __init__(self) -> None:
        self._policies: dict[str, list[ActionPolicy]] = {}

    def add(self, policy: ActionPolicy) -> None:
        assert policy.resource is not None  # sensitive reads act on a resource
        self._policies.setdefault(policy.resource.name, []).append(policy)

    def may_read(self, resource: ResourceSpec, actor: Any, record: Any, ctx: Any = None) -> bool:
        return any(p.is_allowed(actor, record, ctx) for p in self._policies.get(resource.name, ()))

    def conceals(
        self, resource: ResourceSpec | None, decision: Decision, actor: Any, record: Any, ctx: Any
    ) -> bool:
        """Whether ``decision``, a denial on ``record``, must answer 404 rather than 403."""
        return (
            resource is not None
            and resource.conceal
            and record is not None
            and decision.kind is not DecisionKind.NOT_FOUND
            and not self.may_read(resource, actor, record, ctx)
        )
