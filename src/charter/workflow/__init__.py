"""Workflows: a resource's states, changed only by the transitions its actions perform.

Declared once, before the actions that perform its transitions::

    charter.resource(Invoice, tenant="tenant_id", state="state", version="version")
    charter.workflow(
        Invoice,
        states=("draft", "submitted", "approved", "void"),
        initial="draft",
        transitions=(
            Transition("invoice.submit", "draft", "submitted"),
            Transition("invoice.approve", "submitted", "approved"),
            Transition("invoice.void", ("draft", "submitted"), "void"),
        ),
    )

The gate checks each transition on the record's current, locked state
(:mod:`charter.workflow.stage`: 404, then 409 ``invalid_transition``, then
403), sets the state itself, and refuses every other write of it
(:mod:`charter.workflow.guard`). Flows that span several requests are
workflows too, with a deadline per step and a step log (:mod:`charter.workflow.model`).
"""

from .diagram import diagram
from .guard import WorkflowGuard
from .model import Transition, Workflow

__all__ = ["Transition", "Workflow", "WorkflowGuard", "diagram"]
