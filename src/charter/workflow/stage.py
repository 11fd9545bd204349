"""The workflow's two stages: check the transition on the locked record, then perform it.

``transition`` runs after ``load`` (the record is locked ``FOR UPDATE`` on
PostgreSQL, in the call's transaction) and before ``decide``: a missing or
unreadable record is 404, then a step that is not possible in the record's
current state is 409 ``invalid_transition`` (whoever asks, and whatever the
rules say about the state), and only then does the policy decide (403). Two
concurrent transitions of one record queue on its row lock: the second sees
the state the first committed and is refused.

``state_guard`` runs after the handler (and ``track``), before the commit, on
every action of a resource with a workflow: the gate writes a lone changed
target without a flush, so this is where a handler's own write of the state
is refused on that path.

``advance`` runs after ``decide``, before the handler: it sets the state
column to the transition's target (and a flow's deadline and step log), the
only write of those columns the flush guard (:mod:`charter.workflow.guard`)
lets through. The handler sees the record in its new state. Neither stage
runs a statement: the row was already loaded and locked, and the new state
is part of the UPDATE the call's change flushes anyway.
"""

from __future__ import annotations

from typing import Any, Protocol

from ..actions import ActionSpec
from ..decision import Decision, DecisionKind
from ..errors import Forbidden, NotFound
from ..pipeline.call import Call, Refusal, Stage
from ..pipeline.runtime import Runtime
from .guard import plan_write, refuse_unplanned
from .model import Transition, Workflow

__all__ = ["advance", "state_guard", "transition"]


class Assembled(Protocol):
    """What these factories read of :class:`charter.pipeline.stages.Assembly`.

    (A protocol, so that the pipeline's stages can list these factories without an
    import cycle.)
    """

    @property
    def spec(self) -> ActionSpec: ...

    @property
    def runtime(self) -> Runtime: ...


def transition(a: Assembled) -> Stage | None:
    workflow, move = _declared(a)
    if workflow is None or move is None:
        return None
    readers, resource = a.runtime.readers, workflow.resource

    def transition(call: Call) -> None:
        """Check the step against the record's current, locked state (409 if not possible)."""
        record = call.record
        if record is None:
            return
        state = resource.state_of(record)
        if call.resume is not None and state == move.target:
            return  # a multi-phase request resumed: its first phase already moved it
        error = workflow.refusal(move, record, call.ctx.actor, call.ctx, call.ctx.now)
        if error is None:
            return
        decision = Decision.deny(
            DecisionKind.INVALID_TRANSITION, rule="workflow", reason=error.message,
            public_reason=error.message,
        )  # fmt: skip
        if readers.conceals(resource, decision, call.ctx.actor, record, call.ctx):
            # Not readable: its state is as secret as its existence.
            missing = NotFound(f"{resource.name} {call.target} was not found")
            raise Refusal(missing, decision, record)
        raise Refusal(error, decision, record)

    return Stage("transition", transition)


def advance(a: Assembled) -> Stage | None:
    workflow, move = _declared(a)
    if workflow is None or move is None:
        return None

    def advance(call: Call) -> None:
        """Set the record's state to the transition's target (the gate's write, and only it)."""
        record, session = call.record, call.session
        if record is None or session is None:
            return
        state = workflow.resource.state_of(record)
        if call.resume is not None and state == move.target:
            return
        values: dict[str, Any] = {workflow.column: move.target}
        if workflow.deadline is not None:
            limit = workflow.expires.get(move.target)
            values[workflow.deadline] = None if limit is None else call.ctx.now + limit
        if workflow.log is not None:
            step = {
                "action": move.action, "from": state, "to": move.target,
                "at": call.ctx.now.isoformat(), "by": call.ctx.actor.subject.id,
            }  # fmt: skip
            values[workflow.log] = [*(getattr(record, workflow.log) or []), step]
        plan_write(session, record, values)
        for column, value in values.items():
            setattr(record, column, value)

    return Stage("advance", advance)


def _declared(a: Assembled) -> tuple[Workflow | None, Transition | None]:
    workflow: Workflow | None = a.spec.workflow
    if workflow is None:
        return None, None
    return workflow, workflow.transition_of(a.spec.name)


def state_guard(a: Assembled) -> Stage | None:
    workflow = a.spec.workflow
    if workflow is None:
        return None

    def state_guard(call: Call) -> None:
        """Refuse a change of the target's state that is not the gate's own (before commit)."""
        record, session = call.record, call.session
        if record is not None and session is not None:
            try:
                refuse_unplanned(session, workflow, record)
            except Forbidden as exc:
                raise Refusal(exc, exc.decision, record) from exc

    return Stage("state_guard", state_guard)
