"""A workflow's state diagram, as Mermaid or Graphviz DOT text (``charter workflow show``)."""

from __future__ import annotations

import json

from .model import Workflow

__all__ = ["FORMATS", "diagram"]


def mermaid(workflow: Workflow) -> str:
    lines = ["stateDiagram-v2", f"    [*] --> {workflow.initial}"]
    for t in workflow.transitions.values():
        label = t.action + (" [guarded]" if t.guard is not None else "")
        if t.target in workflow.expires:
            label += f" (next step within {workflow.expires[t.target]})"
        lines.extend(f"    {source} --> {t.target}: {label}" for source in t.sources)
    lines.extend(f"    {state} --> [*]" for state in workflow.terminal())
    return "\n".join(lines) + "\n"


def dot(workflow: Workflow) -> str:
    name = json.dumps(workflow.resource.name)
    lines = [f"digraph {name} {{", "    rankdir=LR;", '    "[*]" [shape=point];']
    lines.extend(
        f"    {json.dumps(s)} [shape={'doublecircle' if s in workflow.terminal() else 'box'}];"
        for s in workflow.states
    )
    lines.append(f'    "[*]" -> {json.dumps(workflow.initial)};')
    for t in workflow.transitions.values():
        label = json.dumps(t.action + (" [guarded]" if t.guard is not None else ""))
        lines.extend(
            f"    {json.dumps(s)} -> {json.dumps(t.target)} [label={label}];" for s in t.sources
        )
    lines.append("}")
    return "\n".join(lines) + "\n"


FORMATS = {"mermaid": mermaid, "dot": dot}


def diagram(workflow: Workflow, fmt: str = "mermaid") -> str:
    """The diagram of ``workflow`` in ``fmt`` (``mermaid`` or ``dot``)."""
    try:
        return FORMATS[fmt](workflow)
    except KeyError:
        raise ValueError(f"unknown diagram format {fmt!r} ({', '.join(FORMATS)})") from None
