"""Only the gate writes a workflow's state: every other write of it is refused at flush.

On a resource with a declared workflow the state column (and a flow's
deadline and step log) changes only through a transition: the ``advance``
stage plans the write (:func:`plan_write`) and sets it. In the gate's
sessions, this guard then refuses, before anything reaches the database:

* a flush that changes one of those columns to anything the gate did not
  plan (a handler that sets ``invoice.state = "paid"``, on the target or on
  any other record it loaded). The gate writes a lone changed target without
  the unit of work (:mod:`charter.pipeline.writes`), so the ``state_guard``
  stage checks the target the same way, before the commit;
* a new record in any state but the workflow's initial one (a missing state
  is set to it), or with a deadline or step log of its own;
* an ORM bulk ``update()`` that sets one of those columns, and an ORM bulk
  ``insert()`` (an import) of rows in another state than the initial one, in
  whichever form the rows come (:func:`~charter.pipeline.dml.written_rows`:
  parameters, ``.values()`` of one or many rows, ``INSERT … FROM SELECT``).

Like the tenant guard (:mod:`charter.pipeline.tenancy`), hand-written Core
statements and ``text()`` are outside this guarantee. SQLAlchemy's legacy
``bulk_*`` methods, which emit no ORM event, are refused on declared resources
(:class:`~charter.pipeline.tenancy.GateSession`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import ClauseElement, event
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import ORMExecuteState, Session, sessionmaker

from ..decision import Decision, DecisionKind
from ..errors import Forbidden
from ..pipeline.dml import upsert_sets, written_rows
from ..resources import declared_for
from .model import Workflow

__all__ = ["WorkflowGuard", "plan_write", "refuse_unplanned", "state_write_refused"]

_PLANNED = "charter.workflow_writes"


def plan_write(session: Session, record: Any, values: Mapping[str, Any]) -> None:
    """Record that the gate itself sets ``values`` on ``record`` in this session.

    A copy of its own: a flow's step log is a list the record then holds too,
    and a handler appending to that list in place must not change what the gate
    planned (it would have forged a step, and ``requires=`` trusts the log).
    """
    planned = {k: copy.deepcopy(v) if isinstance(v, list | dict) else v for k, v in values.items()}
    session.info.setdefault(_PLANNED, {})[id(record)] = (record, planned)


def _planned(session: Session, record: Any) -> Mapping[str, Any]:
    found = session.info.get(_PLANNED, {}).get(id(record))
    return found[1] if found is not None and found[0] is record else {}


class WorkflowGuard:
    """Installed on the gate's sessions once a workflow is declared (see the module docstring)."""

    def __init__(self, workflows: Mapping[type[Any], Workflow], clock: Callable[[], datetime]):
        self._workflows = workflows  # the registry's live mapping
        self._clock = clock
        self._installed = False

    def install(self, sessions: sessionmaker[Any]) -> None:
        """Listen on ``sessions`` (once; without a workflow the gate pays nothing for it)."""
        if self._installed:
            return
        self._installed = True
        event.listen(sessions, "before_flush", self._before_flush)
        event.listen(sessions, "after_flush", self._after_flush)
        event.listen(sessions, "do_orm_execute", self._bulk)

    def _before_flush(self, session: Session, _context: Any, _instances: Any) -> None:
        for obj in session.new:
            workflow = declared_for(self._workflows, type(obj))
            if workflow is not None:
                self._created(workflow, obj)
        for obj in session.dirty:
            workflow = declared_for(self._workflows, type(obj))
            if workflow is not None:
                refuse_unplanned(session, workflow, obj)

    def _after_flush(self, session: Session, _context: Any) -> None:
        """The same checks on the values the flush wrote, before the transaction goes on.

        A relationship whose foreign key is the state column (``order.status =
        <approved>``, a lookup table of states) is copied into that column during
        the flush, after :meth:`_before_flush` looked. Raising here fails the
        flush, and the call's transaction rolls back with it.
        """
        for obj in session.new:
            workflow = declared_for(self._workflows, type(obj))
            state = None if workflow is None else getattr(obj, workflow.column)
            if workflow is not None and str(getattr(state, "value", state)) != workflow.initial:
                raise state_write_refused(workflow, workflow.column, f"created as {state!r}")
        for obj in session.dirty:
            workflow = declared_for(self._workflows, type(obj))
            if workflow is not None:
                refuse_unplanned(session, workflow, obj)

    def _created(self, workflow: Workflow, obj: Any) -> None:
        state = getattr(obj, workflow.column)
        if state is None:
            setattr(obj, workflow.column, workflow.initial)
        elif isinstance(state, ClauseElement):  # SQL: its value is known only when it runs
            raise state_write_refused(workflow, workflow.column, "created as a SQL expression")
        elif str(getattr(state, "value", state)) != workflow.initial:
            raise state_write_refused(workflow, workflow.column, f"created as {state!r}")
        for column in (workflow.deadline, workflow.log):
            if column is not None and getattr(obj, column):
                raise state_write_refused(workflow, column, "set on creation")
        limit = workflow.expires.get(workflow.initial)
        if workflow.deadline is not None and limit is not None:
            setattr(obj, workflow.deadline, self._clock() + limit)

    def _bulk(self, state: ORMExecuteState) -> None:
        if not (state.is_update or state.is_insert):
            return
        mapper = state.bind_mapper
        workflow = None if mapper is None else declared_for(self._workflows, mapper.class_)
        if workflow is None:
            return
        upserted = set(upsert_sets(state.statement) or ())  # ON CONFLICT DO UPDATE's SET
        for column in workflow.guarded_columns:
            if column in upserted:
                raise state_write_refused(workflow, column, "set by an upsert")
        rows = written_rows(state)
        for column in workflow.guarded_columns:
            values = [row[column] for row in rows if column in row]
            if not values:
                continue
            initial = state.is_insert and column == workflow.column
            if not initial or any(v != workflow.initial for v in values):
                verb = "imported" if state.is_insert else "updated in bulk"
                raise state_write_refused(workflow, column, verb)


def refuse_unplanned(session: Session, workflow: Workflow, obj: Any) -> None:
    """Raise if ``obj`` has a change of a guarded column that the gate did not plan."""
    planned, attrs = _planned(session, obj), None
    for column in workflow.guarded_columns:
        if column in planned and getattr(obj, column) == planned[column]:
            continue  # the gate's own write (the common case: no history to compute)
        attrs = attrs or sa_inspect(obj).attrs
        if attrs[column].history.has_changes():
            raise state_write_refused(workflow, column, "changed")


def state_write_refused(workflow: Workflow, column: str, how: str) -> Forbidden:
    name = workflow.resource.name
    return Forbidden(
        f"The {column} of a record of {name} can only change through its workflow's "
        "transitions (the action that performs the step).",
        decision=Decision.deny(
            DecisionKind.DENIED_BY_RULE,
            rule="workflow",
            reason=f"{name}.{column} {how} outside a transition",
        ),
    )
