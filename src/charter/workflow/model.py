"""Workflow declarations: a resource's states and the transitions its actions perform.

Pure logic, no database: which actions are possible in a state, where each
one leads, and what a refused step is told. The gate applies it in
:mod:`charter.workflow.stage` (on the locked record, inside the call's
transaction) and :mod:`charter.workflow.guard` keeps every other writer off
the state column.

A workflow can also carry a *flow's* bookkeeping (a record that spans several
requests, such as a plan upgrade): ``deadline=`` names a column the gate sets
whenever it enters a state that ``expires=`` gives a time limit (a step not
taken by then is refused, 409 ``step_expired``), and ``log=`` names a JSON
column where the gate appends every step it performed, so that a transition
declared with ``requires=`` can verify that each required earlier step was
completed, in order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

from sqlalchemy import inspect as sa_inspect

from ..errors import ConfigurationError, InvalidTransition, StepExpired
from ..policy import Condition
from ..policy.expr import as_condition
from ..policy.pyeval import evaluate, failures
from ..resources import ResourceSpec

__all__ = ["MAX_LOG", "Transition", "Workflow", "completed_in_order"]

#: Bound on a flow's step log (a flow is a handful of steps, not an unbounded history).
MAX_LOG = 64


@dataclass(frozen=True, slots=True)
class Transition:
    """One step of a workflow: the action that performs it, from which states, to which.

    ``source`` is a state or several; ``guard`` an optional condition in the
    policy language (``R.amount > 0``) that must hold on the record for the step
    to be possible at all; ``requires`` the actions that must appear, in this
    order, in the flow's step log before this step (a flow's terminal step; see
    :func:`completed_in_order` for what "in order" means when a step repeats).
    """

    action: str
    source: str | tuple[str, ...]
    target: str
    guard: Any = None
    requires: tuple[str, ...] = ()

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.source,) if isinstance(self.source, str) else tuple(self.source)

    @property
    def condition(self) -> Condition | None:
        return None if self.guard is None else as_condition(self.guard)


@dataclass(frozen=True, slots=True)
class Workflow:
    """The declared states and transitions of one resource (see the module docstring)."""

    resource: ResourceSpec
    states: tuple[str, ...]
    initial: str
    transitions: Mapping[str, Transition]
    deadline: str | None = None
    expires: Mapping[str, timedelta] = field(default_factory=dict)
    log: str | None = None

    @property
    def column(self) -> str:
        assert self.resource.state is not None  # checked by declare()
        return self.resource.state

    @property
    def guarded_columns(self) -> tuple[str, ...]:
        """The columns only the gate writes: the state, and a flow's deadline and log."""
        return tuple(c for c in (self.column, self.deadline, self.log) if c is not None)

    @classmethod
    def declare(
        cls,
        resource: ResourceSpec,
        *,
        states: Sequence[str],
        initial: str,
        transitions: Iterable[Transition],
        deadline: str | None = None,
        expires: Mapping[str, timedelta] | None = None,
        log: str | None = None,
    ) -> Workflow:
        """Validate the declaration; every mistake is a :class:`ConfigurationError` now."""
        where = f"workflow of {resource.name}"
        if resource.state is None:
            raise ConfigurationError(
                f"{where}: the resource declares no state column (charter.resource(..., "
                "state='state'))"
            )
        names = tuple(states)
        if (
            not names
            or len(set(names)) != len(names)
            or not all(isinstance(s, str) and s for s in names)
        ):
            raise ConfigurationError(f"{where}: states must be distinct non-empty strings")
        # A state is an identifier stored in a column and printed in problems, logs and
        # diagrams: a newline, NUL, bidi override or other unprintable character in it
        # is a mistake (or an injection into what prints it), refused now.
        unprintable = [s for s in names if not s.isprintable()]
        if unprintable:
            raise ConfigurationError(
                f"{where}: state {unprintable[0]!r} holds a control or other unprintable "
                "character (states are printable text; spaces are fine)"
            )
        if initial not in names:
            raise ConfigurationError(f"{where}: the initial state {initial!r} is not a state")
        by_action: dict[str, Transition] = {}
        for t in transitions:
            if not isinstance(t, Transition):
                raise ConfigurationError(f"{where}: transitions must be Transition(...) values")
            if t.action in by_action:
                raise ConfigurationError(f"{where}: {t.action} performs two transitions")
            unknown = [s for s in (*t.sources, t.target) if s not in names]
            if unknown or not t.sources:
                raise ConfigurationError(
                    f"{where}: {t.action} names unknown states {unknown} (states: {names})"
                )
            if t.guard is not None:
                try:
                    t.condition  # noqa: B018 - validates the guard's type now
                except TypeError as exc:
                    raise ConfigurationError(f"{where}: guard of {t.action}: {exc}") from exc
            if t.action in t.requires:
                raise ConfigurationError(f"{where}: {t.action} cannot require itself")
            twice = sorted({a for a in t.requires if t.requires.count(a) > 1})
            if twice:
                raise ConfigurationError(f"{where}: {t.action} requires {twice[0]} twice")
            by_action[t.action] = t
        for t in by_action.values():
            unknown = [a for a in t.requires if a not in by_action]
            if unknown:
                raise ConfigurationError(
                    f"{where}: {t.action} requires {unknown}, which perform no transition"
                )
            if t.requires and log is None:
                raise ConfigurationError(f"{where}: requires= needs a log= column")
        expires = dict(expires or {})
        if expires and deadline is None:
            raise ConfigurationError(f"{where}: expires= needs a deadline= column")
        for state, limit in expires.items():
            if state not in names or not isinstance(limit, timedelta) or limit <= timedelta(0):
                raise ConfigurationError(
                    f"{where}: expires= maps states to positive timedeltas ({state!r})"
                )
        columns = set(sa_inspect(resource.model).columns.keys())
        for role, column in (("deadline", deadline), ("log", log)):
            if column is not None and column not in columns:
                raise ConfigurationError(f"{where}: {role} column {column!r} is not mapped")
        return cls(resource, names, initial, by_action, deadline, expires, log)

    # -- what is possible -----------------------------------------------------------

    def transition_of(self, action: str) -> Transition | None:
        return self.transitions.get(action)

    def possible_from(self, state: str | None) -> tuple[str, ...]:
        """The actions whose transition starts in ``state``, in declaration order."""
        return tuple(a for a, t in self.transitions.items() if state in t.sources)

    def is_possible(self, action: str, state: str | None) -> bool:
        """Whether ``action`` can happen in ``state`` (actions with no transition: always)."""
        t = self.transitions.get(action)
        return t is None or state in t.sources

    def terminal(self) -> tuple[str, ...]:
        """The states no transition leaves."""
        return tuple(s for s in self.states if not self.possible_from(s))

    def refusal(
        self, move: Transition, record: Any, actor: Any, ctx: Any, now: datetime
    ) -> InvalidTransition | None:
        """Why ``move`` is not possible on ``record`` now (the error to raise), or ``None``.

        In this order: the record's state is not a source of the step; the
        state's deadline has passed (a flow's step, :class:`StepExpired`); a
        required earlier step is missing from the step log, or out of order
        (:func:`completed_in_order`); the step's guard does not hold (a guard
        that cannot be evaluated does not).
        """
        state = self.resource.state_of(record)
        if state not in move.sources:
            return self._refused(record, state, f": {move.action} is not possible in this state",
                                 next_steps=True)  # fmt: skip
        if self.deadline is not None and state in self.expires:
            deadline = _aware(getattr(record, self.deadline))
            if deadline is None or now >= deadline:
                return self._refused(
                    record, state, " and the deadline of its next step has passed: start again",
                    kind=StepExpired,
                )  # fmt: skip
        done = [s.get("action") for s in (getattr(record, self.log) or [])] if self.log else []
        if move.requires and not completed_in_order(move.requires, done):
            return self._refused(
                record, state,
                f": {move.action} needs {', '.join(move.requires)} completed first, "
                "in this order (the latest of each after the latest of the one before); "
                f"completed: {', '.join(map(str, done)) or 'none'}",
            )  # fmt: skip
        if len(done) >= MAX_LOG:
            return self._refused(record, state, ": its step log is full")
        condition = move.condition
        if condition is not None and not _holds(condition, actor, record, ctx):
            failed = "; ".join(failures(condition, True, actor, record, ctx))
            return self._refused(
                record, state,
                f": the condition of {move.action} does not hold ({condition.text()}"
                + (f": {failed}" if failed else "") + ")",
            )  # fmt: skip
        return None

    def _refused(
        self,
        record: Any,
        state: str | None,
        what: str,
        *,
        kind: type[InvalidTransition] = InvalidTransition,
        next_steps: bool = False,
    ) -> InvalidTransition:
        """The refusal of a step (built only then: an allowed step pays for none of this)."""
        possible = list(self.possible_from(state))
        text = f"{self.resource.name} {self.resource.identity(record)} is {state}{what}"
        if next_steps:
            text += f"; possible next: {', '.join(possible) or 'nothing (a final state)'}"
        return kind(text, state=state, allowed=possible)


def completed_in_order(required: Sequence[str], done: Sequence[Any]) -> bool:
    """Whether each ``required`` action is in ``done`` (a step log), in the declared order.

    Other steps may come between, and any step may repeat (a capture refunded
    and captured again): what counts is each required step's **latest**
    completion, and those must follow the declared order. So with ``requires=
    ("verify", "capture")``: ``verify, capture, refund, capture`` is complete, and
    so is ``capture, verify, capture``; ``verify, capture, verify`` is not —
    verification was done again and nothing was captured after it, so the capture
    on record no longer follows the verification on record.
    """
    latest = {action: i for i, action in enumerate(done)}  # a later step overwrites
    if not all(action in latest for action in required):
        return False
    return all(latest[a] < latest[b] for a, b in pairwise(required))


def _holds(condition: Condition, actor: Any, record: Any, ctx: Any) -> bool:
    try:
        return evaluate(condition, actor, record, ctx)
    except Exception:  # a guard that cannot be evaluated does not hold (fail closed)
        return False


def _aware(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes for ``DateTime(timezone=True)``: they are UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)
