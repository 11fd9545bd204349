"""Action declarations: one per business operation, validated at start-up."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from pydantic import AliasChoices, AliasPath, BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo

from .credits.costs import Cost, as_cost, as_tags
from .credits.quotas import Quota
from .errors import ConfigurationError, InvalidInput
from .exposure import Agent, as_agent
from .idempotency.keys import IdempotencyMode
from .resources import ResourceSpec

if TYPE_CHECKING:
    from .workflow.model import Workflow

__all__ = [
    "MAX_BATCH_LIMIT",
    "ActionSpec",
    "BulkMode",
    "Handler",
    "Locks",
    "NoInput",
    "default_scope",
]

Handler = Callable[..., Any]
#: The further records an action acts on, located from its validated input:
#: ``locks=lambda data: [(Card, data.to)]``. Each is a declared resource's model and an id.
Locks = Callable[[Any], "Sequence[tuple[type[Any], Any]]"]

_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
_RATE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")  # a rate class name (charter.ratelimit)
#: The largest ``max_batch=`` a declaration may ask for (charter.data.bulk).
MAX_BATCH_LIMIT = 100_000


class BulkMode(StrEnum):
    """How an action runs many items in one request (:mod:`charter.data.bulk`, AIP-233/235).

    ``per_item``: one transaction per item, partial success stated per item.
    ``all_or_nothing``: one transaction for the batch; any failing item fails it.
    """

    PER_ITEM = "per_item"
    ALL_OR_NOTHING = "all_or_nothing"


def default_scope(name: str, resource: ResourceSpec | None, *, sensitive_read: bool) -> str:
    """The scope of an action declared without ``scope=``: every action has one.

    ``<resource>:read`` for a sensitive read and ``<resource>:write`` for any
    other action on a resource (``invoices:read``, ``invoices:write``); the
    action's own name for an action on no resource. So a token scoped
    ``cards:read`` cannot redeem a card.
    """
    if resource is None:
        return name
    return f"{resource.name}:{'read' if sensitive_read else 'write'}"


class NoInput(BaseModel):
    """The input model of actions that take none: any field is an error."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True, slots=True)
class ActionSpec:
    """Everything Charter knows about one action.

    ``target`` says how the record is located: ``"argument"`` (the ``target=``
    argument of :meth:`Charter.execute`, e.g. the URL's id), the name of an
    input field holding the id, or ``None`` for actions that create a record or
    act on no record. ``by`` names the column the target is found by: the
    primary key (``None``) or a column unique within the tenant (a promo code,
    an external reference). ``locks`` locates the further records the action
    acts on (see :data:`Locks`).
    """

    name: str
    handler: Handler
    input: type[BaseModel]
    resource: ResourceSpec | None
    target: str | None
    creates: bool
    allow: Any
    reason_required: bool
    sensitive_read: bool
    scope: str
    impersonation: bool
    listable: bool
    status: int
    idempotency: IdempotencyMode = IdempotencyMode.OPTIONAL
    by: str | None = None
    locks: Locks | None = None
    cost: Cost | Quota | None = None  # charged by the charge stage (charter.credits)
    tags: frozenset[str] = frozenset()  # risk tags; a credit cost adds "financial"
    #: The workflow of the action's resource, if it declares one (charter.workflow).
    workflow: Workflow | None = None
    #: The rate class it is counted against (None: its default, charter.ratelimit).
    rate: str | None = None
    #: Whether (and how) it takes many items in one request (None: it does not).
    bulk: BulkMode | None = None
    #: Its own largest batch (None: the Charter's ``max_batch``).
    max_batch: int | None = None
    #: How automated agents may call it (None: not exposed, charter.exposure).
    agent: Agent | None = None

    @property
    def mutates(self) -> bool:
        return not self.sensitive_read

    @classmethod
    def declare(
        cls,
        name: str,
        handler: Handler,
        *,
        input: type[BaseModel] | None,
        resource: ResourceSpec | None,
        target: str | None,
        creates: bool,
        allow: Any,
        reason_required: bool,
        sensitive_read: bool,
        scope: str | None,
        impersonation: bool,
        listable: bool,
        status: int | None,
        idempotency: IdempotencyMode | None = None,
        by: str | None = None,
        locks: Locks | None = None,
        workflow: Workflow | None = None,
        cost: Any = None,
        tags: Any = None,
        rate: str | None = None,
        bulk: BulkMode | str | None = None,
        max_batch: int | None = None,
        agent: Any = None,
    ) -> ActionSpec:
        if not isinstance(name, str) or not _NAME.match(name) or len(name) > 128:
            raise ConfigurationError(
                f"action name {name!r} must look like 'resource.verb' (lowercase, dotted)"
            )
        if not callable(handler):
            raise ConfigurationError(f"action {name}: the handler must be callable")
        model = input or NoInput
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise ConfigurationError(f"action {name}: input must be a Pydantic model class")
        if model.model_config.get("extra") != "forbid":
            # No mass assignment: a field the model does not declare is an error,
            # never silently dropped or (worse) copied onto the record.
            raise ConfigurationError(
                f"action {name}: input model {model.__name__} must reject unknown fields; "
                "set model_config = ConfigDict(extra='forbid')"
            )
        if creates and target is not None:
            raise ConfigurationError(f"action {name}: an action that creates has no target")
        if creates and resource is None:
            raise ConfigurationError(f"action {name}: creates=True needs on=<resource>")
        if target not in (None, "argument") and target not in model.model_fields:
            raise ConfigurationError(
                f"action {name}: target field {target!r} is not a field of {model.__name__}"
            )
        if target is not None and resource is None:
            raise ConfigurationError(f"action {name}: a target needs on=<resource>")
        if sensitive_read and creates:
            raise ConfigurationError(f"action {name}: a sensitive read cannot create")
        if sensitive_read and idempotency not in (None, IdempotencyMode.NONE):
            raise ConfigurationError(
                f"action {name}: a sensitive read changes nothing; it takes no idempotency key"
            )
        if idempotency is None:
            # Every change can be retried safely unless its author says otherwise.
            idempotency = IdempotencyMode.NONE if sensitive_read else IdempotencyMode.OPTIONAL
        if by is not None:
            if resource is None or target is None:
                raise ConfigurationError(f"action {name}: by= needs a target on a resource")
            resource.check_unique(by, f"action {name}")
        if locks is not None and not callable(locks):
            raise ConfigurationError(f"action {name}: locks= must be a function of the input")
        if scope is not None and (not isinstance(scope, str) or not scope.strip()):
            raise ConfigurationError(f"action {name}: scope must be a non-empty string")
        if scope is None:
            scope = default_scope(name, resource, sensitive_read=sensitive_read)
        cost = as_cost(name, cost)
        if rate is not None and (not isinstance(rate, str) or not _RATE.match(rate)):
            raise ConfigurationError(
                f"action {name}: rate= names a rate class (lowercase, such as 'export'), "
                f"not {rate!r}"
            )
        if workflow is not None:
            _check_workflow(name, model, workflow, creates=creates, sensitive_read=sensitive_read)
        mode = _check_bulk(name, bulk, max_batch, sensitive_read=sensitive_read)
        return cls(
            name=name,
            handler=handler,
            input=model,
            resource=resource,
            target=target,
            creates=creates,
            allow=allow,
            reason_required=reason_required,
            sensitive_read=sensitive_read,
            scope=scope,
            impersonation=impersonation,
            listable=listable,
            status=status or (201 if creates else 200),
            idempotency=idempotency,
            by=by,
            locks=locks,
            workflow=workflow,
            cost=cost,
            tags=as_tags(name, tags, cost),
            rate=rate,
            bulk=mode,
            max_batch=max_batch,
            agent=as_agent(name, agent),
        )

    def validate(self, data: Any) -> BaseModel:
        """Validate raw input (a mapping or a model instance) into the input model.

        No string in it, member name or value, may hold a NUL character: PostgreSQL
        cannot store one, so it is refused on every database alike, before the
        model runs (422 ``invalid_input``, each field named, type ``string_nul``).
        """
        if isinstance(data, self.input):
            refuse_nul(data.model_dump(), what=f"the input of {self.name}")
            return data
        if data is None:
            data = {}
        if isinstance(data, BaseModel):
            data = data.model_dump()
        if not isinstance(data, dict):
            raise InvalidInput(f"the input of {self.name} must be a JSON object", errors=[])
        refuse_nul(data, what=f"the input of {self.name}")
        try:
            return self.input.model_validate(data)
        except ValidationError as exc:
            errors = [
                {"loc": list(e["loc"]), "type": e["type"], "msg": e["msg"]}
                for e in exc.errors(include_url=False, include_input=False)
            ]
            raise InvalidInput(
                f"the input of {self.name} is invalid: "
                + "; ".join(
                    f"{'.'.join(map(str, e['loc'])) or '(body)'}: {e['msg']}" for e in errors
                ),
                errors=errors,
            ) from exc


def _check_workflow(
    name: str, model: type[BaseModel], workflow: Workflow, *, creates: bool, sensitive_read: bool
) -> None:
    """Only the gate writes a workflow's state: no input may carry it, no creation perform it."""
    for field_name, info in model.model_fields.items():
        names = _input_names(field_name, info)
        written = [c for c in workflow.guarded_columns if c in names]
        if written:
            raise ConfigurationError(
                f"action {name}: input model {model.__name__} has a field {written[0]!r}, "
                f"which only the workflow of {workflow.resource.name} writes (by transitions)"
            )
    if workflow.transition_of(name) is not None and (creates or sensitive_read):
        kind = "creates a record" if creates else "is a sensitive read"
        raise ConfigurationError(f"action {name} {kind}: it cannot perform a transition")


def _input_names(name: str, info: FieldInfo) -> set[str]:
    """Every key a field is known by: its name, its alias, each of its validation aliases
    (an ``AliasChoices``' choices, an ``AliasPath`` by the input key it starts at) and its
    serialization alias (what ``model_dump(by_alias=True)`` writes)."""
    names = {name}
    for alias in (info.alias, info.validation_alias, info.serialization_alias):
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
        for choice in choices:
            key = choice.path[0] if isinstance(choice, AliasPath) else choice
            if isinstance(key, str):
                names.add(key)
    return names


def _check_bulk(name: str, bulk: Any, max_batch: Any, *, sensitive_read: bool) -> BulkMode | None:
    """A bulk form is declared, never implied; a read has none (a list is the bulk read)."""
    if bulk is None:
        if max_batch is not None:
            raise ConfigurationError(f"action {name}: max_batch= needs bulk=")
        return None
    try:
        mode = BulkMode(bulk)
    except ValueError:
        raise ConfigurationError(
            f"action {name}: bulk= is 'per_item' or 'all_or_nothing', not {bulk!r}"
        ) from None
    if sensitive_read:
        # Reading many records by id is what lists and exports do, filtered in SQL.
        raise ConfigurationError(f"action {name}: a sensitive read has no bulk form")
    if max_batch is not None and (
        isinstance(max_batch, bool)
        or not isinstance(max_batch, int)
        or not 1 <= max_batch <= MAX_BATCH_LIMIT
    ):
        raise ConfigurationError(
            f"action {name}: max_batch= is a whole number from 1 to {MAX_BATCH_LIMIT}"
        )
    return mode


def refuse_nul(data: Any, *, what: str) -> None:
    """Raise :class:`InvalidInput` naming every string of ``data`` that holds a NUL character."""
    found = list(_nul_locations(data, ()))
    if found:
        raise InvalidInput(
            f"{what} is invalid: "
            + "; ".join(f"{'.'.join(map(str, loc)) or '(body)'}" for loc in found)
            + ": NUL characters (\\u0000) are not allowed in text",
            errors=[
                {"loc": loc, "type": "string_nul", "msg": "NUL characters are not allowed"}
                for loc in found
            ],
        )


def _nul_locations(value: Any, loc: tuple[str | int, ...]) -> Iterator[list[str | int]]:
    if isinstance(value, str):
        if "\x00" in value:
            yield list(loc)
    elif isinstance(value, dict):
        for name, item in value.items():
            if isinstance(name, str) and "\x00" in name:
                name = name.replace("\x00", "\\u0000")  # the location, escaped
                yield [*loc, name]
            yield from _nul_locations(item, (*loc, name))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _nul_locations(item, (*loc, index))
