"""The permission matrix: roles x actions x record states, for review and for diffs.

Each cell is ``allow``, ``deny`` or ``conditional``. The matrix is computed by
*partial evaluation* of each action's compiled expression: what the role and
the state decide is folded to constants (``A.has_role``, ``R.<state column>``,
``A.kind``, ``A.impersonating``) and what depends on the particular record or
actor (``R.amount <= A.approval_limit``) stays as the residual condition,
printed with the cell. Assumptions, stated in every rendering: the actor is in
the record's tenant, not impersonating, and its credential carries the
action's scope.

:func:`assert_matrix_snapshot` turns the matrix into a reviewed artefact: the
first run writes the snapshot, later runs fail on any difference (set
``CHARTER_UPDATE_SNAPSHOTS=1`` to accept a change), so every policy change
shows up in a code review diff.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

from ..actor import Actor, ActorKind
from .engine import ActionPolicy
from .expr import And, Condition, HasRole, HasScope, Not, Or, Predicate, Ref
from .expr import Literal as Lit
from .pyeval import evaluate

__all__ = ["MatrixCell", "PermissionMatrix", "assert_matrix_snapshot", "permission_matrix"]

Outcome = Literal["allow", "deny", "conditional"]
ASSUMPTIONS = (
    "actor in the record's tenant, not impersonating, credential carrying the action's scope"
)


@dataclass(frozen=True, slots=True)
class MatrixCell:
    role: str
    action: str
    state: str | None
    outcome: Outcome
    condition: str = ""


@dataclass(frozen=True, slots=True)
class PermissionMatrix:
    roles: tuple[str, ...]
    actions: tuple[str, ...]
    states: tuple[str | None, ...]
    cells: tuple[MatrixCell, ...]

    def cell(self, role: str, action: str, state: str | None = None) -> MatrixCell:
        for cell in self.cells:
            if (cell.role, cell.action, cell.state) == (role, action, state):
                return cell
        raise KeyError((role, action, state))

    def to_markdown(self) -> str:
        header = ["action", "state", *self.roles]
        lines = [
            f"Assumptions: {ASSUMPTIONS}.",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---" for _ in header) + "|",
        ]
        for action in self.actions:
            for state in self.states:
                row = [action, state or "*"]
                for role in self.roles:
                    cell = self.cell(role, action, state)
                    text = f"if {cell.condition}" if cell.outcome == "conditional" else cell.outcome
                    row.append(text.replace("|", "\\|"))
                lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["role", "action", "state", "outcome", "condition"])
        for c in self.cells:
            writer.writerow([c.role, c.action, c.state or "", c.outcome, c.condition])
        return out.getvalue()

    def to_json(self) -> str:
        body = {"assumptions": ASSUMPTIONS, "cells": [asdict(c) for c in self.cells]}
        return json.dumps(body, indent=2, sort_keys=True) + "\n"

    def render(self, fmt: str) -> str:
        renderers = {"md": self.to_markdown, "csv": self.to_csv, "json": self.to_json}
        if fmt not in renderers:
            raise ValueError(f"unknown matrix format {fmt!r} (md, csv, json)")
        return renderers[fmt]()


def permission_matrix(
    policies: Iterable[ActionPolicy],
    *,
    roles: Sequence[str],
    states: Sequence[str] | None = None,
    kind: ActorKind | str = ActorKind.USER,
) -> PermissionMatrix:
    """Enumerate ``roles`` x the actions of ``policies`` x ``states`` (all states if ``None``)."""
    policies = list(policies)
    state_list: tuple[str | None, ...] = tuple(states) if states else (None,)
    cells: list[MatrixCell] = []
    for role in roles:
        actor = Actor.make("matrix", "matrix", kind=kind, roles=[role], scopes=["*"])
        for policy in policies:
            for state in state_list:
                cells.append(_cell(policy, actor, role, state))
    return PermissionMatrix(
        roles=tuple(roles),
        actions=tuple(p.action for p in policies),
        states=state_list,
        cells=tuple(cells),
    )


def _cell(policy: ActionPolicy, actor: Actor, role: str, state: str | None) -> MatrixCell:
    state_column = policy.resource.state if policy.resource is not None else None
    record = SimpleNamespace()
    if state_column is not None and state is not None:
        setattr(record, state_column, _state_value(policy, state_column, state))
    known = {("A", "kind"), ("A", "impersonating"), ("A.real", "kind")}
    if state_column is not None and state is not None:
        known.add(("R", state_column))
    parts: list[Condition] = []
    if policy.denies:
        parts.append(Not(Or([r.condition for r in policy.denies])))
    parts.append(Or([r.condition for r in policy.allows]) if policy.allows else Lit(False))
    result = _fold(And(parts), actor, record, known)
    if result is True:
        return MatrixCell(role, policy.action, state, "allow")
    if result is False:
        return MatrixCell(role, policy.action, state, "deny")
    return MatrixCell(role, policy.action, state, "conditional", result.text())


def _state_value(policy: ActionPolicy, column: str, state: str) -> Any:
    from .sql import table_column

    enum_class = getattr(table_column(policy.resource, column).type, "enum_class", None)  # type: ignore[arg-type]
    return enum_class(state) if enum_class is not None else state


def _fold(
    node: Condition, actor: Actor, record: Any, known: set[tuple[str, str]]
) -> bool | Condition:
    """Fold what ``actor``'s role and ``record``'s state decide; keep the rest."""
    if isinstance(node, And | Or):
        absorbing = isinstance(node, Or)  # True absorbs an Or, False an And
        rest: list[Condition] = []
        for item in node.items:
            folded = _fold(item, actor, record, known)
            if folded is absorbing:
                return absorbing
            if not isinstance(folded, bool):
                rest.append(folded)
        if not rest:
            return not absorbing
        return rest[0] if len(rest) == 1 else type(node)(rest)
    if isinstance(node, Not):
        inner = _fold(node.item, actor, record, known)
        return (not inner) if isinstance(inner, bool) else Not(inner)
    if isinstance(node, HasRole | HasScope | Lit):
        return evaluate(node, actor, record, None)
    if isinstance(node, Predicate):
        return node
    refs = {(n.root, n.path[0]) for n in node.walk() if isinstance(n, Ref)}
    if refs <= known:
        try:
            return evaluate(node, actor, record, None)
        except Exception:
            return False  # fails closed at run time too
    return node


def assert_matrix_snapshot(
    matrix: PermissionMatrix, path: str | os.PathLike[str], *, fmt: str | None = None
) -> None:
    """Compare ``matrix`` with the snapshot at ``path``; write it on first run.

    The format follows the suffix (``.md``, ``.csv``, ``.json``) unless ``fmt``
    is given. Set ``CHARTER_UPDATE_SNAPSHOTS=1`` to rewrite a changed snapshot.
    """
    target = Path(path)
    text = matrix.render(fmt or target.suffix.lstrip(".") or "md")
    if not target.exists() or os.environ.get("CHARTER_UPDATE_SNAPSHOTS") == "1":
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        return
    expected = target.read_text(encoding="utf-8")
    if expected != text:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True),
                text.splitlines(keepends=True),
                fromfile=f"{target} (snapshot)",
                tofile="current policy",
            )
        )
        raise AssertionError(
            f"the permission matrix changed; review the diff and rerun with "
            f"CHARTER_UPDATE_SNAPSHOTS=1 to accept it:\n{diff}"
        )
