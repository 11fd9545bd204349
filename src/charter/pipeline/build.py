"""Assembling an action's pipeline, once, when the action is declared.

Like starlette's ``build_middleware_stack``: the list of stage factories is
walked once per action, each factory returns its stage or ``None`` (the action
does not need it), and the result is a fixed tuple of stages that every call
of the action runs. Nothing about *which* stages run, or which statement a
stage uses, is decided per call.

The extension point is :meth:`PipelineBuilder.insert`: a new capability (a
rate limit, a workflow transition, a charge against a quota, field visibility)
is a new factory placed before or after a named stage. Neither the runner nor
the other stages change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from ..actions import ActionSpec
from ..errors import ConfigurationError
from ..policy import ActionPolicy
from .call import Stage
from .runtime import Runtime
from .stages import FACTORIES, Assembly
from .writes import Committer

__all__ = ["Pipeline", "PipelineBuilder", "StageFactory"]

#: Builds one stage for one action, or ``None`` when the action does not need it.
StageFactory = Callable[[Assembly], Stage | None]


@dataclass(frozen=True, slots=True)
class Pipeline(Sequence[Stage]):
    """The stages one action runs, in order: ``prepare`` ones, then the transaction's."""

    action: str
    prepare: tuple[Stage, ...]  # before the transaction
    transaction: tuple[Stage, ...]  # inside it, in order; the last one commits
    runtime: Runtime
    committer: Committer

    @property
    def stages(self) -> tuple[Stage, ...]:
        return self.prepare + self.transaction

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    def __getitem__(self, index: int) -> Stage:  # type: ignore[override]
        return self.stages[index]

    def __len__(self) -> int:
        return len(self.stages)

    def __iter__(self) -> Iterator[Stage]:
        return iter(self.stages)


class PipelineBuilder:
    """The ordered stage factories of one :class:`~charter.Charter`, and the assembly."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.committer = Committer(runtime)
        self._factories: list[tuple[str, StageFactory]] = list(FACTORIES)
        self.sealed = False  # set once an action has been assembled

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self._factories)

    def insert(
        self,
        name: str,
        factory: StageFactory,
        *,
        before: str | None = None,
        after: str | None = None,
    ) -> None:
        """Add a stage factory next to a named one (exactly one of ``before``/``after``)."""
        if self.sealed:
            raise ConfigurationError(
                "add stages before declaring actions: each pipeline is assembled when "
                "its action is declared"
            )
        if (before is None) == (after is None):
            raise ConfigurationError("give exactly one of before= or after=")
        if name in self.names:
            raise ConfigurationError(f"there is already a stage named {name!r}")
        anchor = before if before is not None else after
        if anchor not in self.names or (anchor == "validate" and before is not None):
            raise ConfigurationError(
                f"cannot place a stage {'before' if before else 'after'} {anchor!r}; "
                f"stages: {', '.join(self.names)}"
            )
        position = self.names.index(str(anchor)) + (0 if before is not None else 1)
        self._factories.insert(position, (name, factory))

    def build(self, spec: ActionSpec, policy: ActionPolicy) -> Pipeline:
        """Assemble ``spec``'s pipeline from what it declares."""
        self.sealed = True
        assembly = Assembly(spec, self.runtime, self.committer, policy)
        stages = tuple(
            stage for _, factory in self._factories if (stage := factory(assembly)) is not None
        )
        phases = [s.phase for s in stages]
        if phases != sorted(phases, key=lambda p: p != "prepare"):
            raise ConfigurationError(
                f"{spec.name}: a prepare stage cannot follow a transaction stage"
            )
        prepare = tuple(s for s in stages if s.phase == "prepare")
        transaction = tuple(s for s in stages if s.phase == "transaction")
        return Pipeline(spec.name, prepare, transaction, self.runtime, self.committer)
