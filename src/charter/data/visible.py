"""The ``visibility`` stage: an outcome's body without the fields its actor may not see.

Placed after ``track`` (which renders the body as JSON) and before ``seal``
(which stores it as a keyed call's outcome), so neither the response nor a
replay of it carries a hidden field. The rules are
:mod:`charter.policy.visibility`'s; this is only where the pipeline applies them.
"""

from __future__ import annotations

from typing import Any

from ..pipeline.call import Call, Stage
from ..policy.visibility import redact_for

__all__ = ["visibility"]


def visibility(a: Any) -> Stage | None:
    """The stage for ``a.spec`` (an :class:`~charter.pipeline.Assembly`); None when its
    resource declares no field visibility."""
    resource = a.spec.resource
    if resource is None or not resource.visible:
        return None

    def visibility(call: Call) -> None:
        """Leave out of the body the fields the actor may not see (field visibility)."""
        call.body = redact_for(resource, call.ctx.actor, call.body, call.ctx)

    return Stage("visibility", visibility)
