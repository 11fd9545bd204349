"""The gate as a pipeline of named stages, assembled once per action.

* :mod:`.call` — the per-call state (:class:`Call`) and the :class:`Stage` type;
* :mod:`.stages` — the stages (validate, replay, claim, load, precondition,
  decide, handler, track, seal, commit), each built by a factory from a declaration;
* :mod:`.build` — the assembly, once per action, and the extension point;
* :mod:`.run` — the heart: the transaction, the claim retry, the audit of a refusal;
* :mod:`.writes` — the gate's own writes, committed in each dialect's form;
* :mod:`.tenancy` — the session confined to the actor's tenant;
* :mod:`.runtime` — what every stage shares.
"""

from .build import Pipeline, PipelineBuilder, StageFactory
from .call import Call, Refusal, Stage, Touched, Writes
from .stages import Assembly

__all__ = [
    "Assembly",
    "Call",
    "Pipeline",
    "PipelineBuilder",
    "Refusal",
    "Stage",
    "StageFactory",
    "Touched",
    "Writes",
]
