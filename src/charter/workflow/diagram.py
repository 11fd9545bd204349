"""A workflow's state diagram, as Mermaid or Graphviz DOT text (``charter workflow show``).

A state's name is shown, never parsed as syntax: a name such as ``in review``,
``on-hold: legal`` or ``geprüft`` is drawn as it is, and no name can add a line,
an edge or a directive to the diagram. In Mermaid a state whose name is a plain
identifier (``payment_pending``) is written as itself; any other gets an
identifier of its own (``s1``) and its name, escaped, as the label
(``state "in review" as s1``). In DOT every name is a quoted, escaped string.
"""

from __future__ import annotations

import re
from datetime import timedelta

from .model import Transition, Workflow

__all__ = ["FORMATS", "diagram"]


def _label(workflow: Workflow, t: Transition, *, deadline: bool) -> str:
    label = t.action + (" [guarded]" if t.guard is not None else "")
    if deadline and t.target in workflow.expires:
        label += f" (next step within {_duration(workflow.expires[t.target])})"
    return label


def _duration(limit: timedelta) -> str:
    """``1h 30min`` rather than ``1:30:00`` (a colon ends a Mermaid label)."""
    seconds = limit.total_seconds()
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{int(count)}{unit}")
    if seconds or not parts:
        parts.append(f"{seconds:g}s")
    return " ".join(parts)


# -- Mermaid ----------------------------------------------------------------------------
#
# Mermaid's state diagram lexer (stateDiagram.jison) reads a transition's label up to
# the next ":", ";" or newline and a quoted state name up to the next '"'; "#" starts a
# comment; a line holding "direction LR" anywhere is a direction and a name holding
# "[[fork]]" a fork; an identifier starting with "default", or a keyword followed by a
# space ("state x", "note x"), is no identifier. Mermaid decodes entity codes ("#58;")
# before it lexes (Diagram.fromText → encodeEntities), so a label keeps letters and
# digits (any script), spaces and a few inert marks, and every other character is
# written as its code.

_PLAIN_ID = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEYWORDS = ("default", "state", "note", "class", "scale", "direction", "style", "acc", "end")
_INERT = frozenset(" _.,-/()[]+'*!?@=~")
_WORDS = re.compile(r"(?i)(?<=direction)\s|\[(?=\[)")


def _mermaid_text(text: str) -> str:
    """``text`` as a Mermaid label: each character that could be syntax as its entity code."""
    kept = "".join(c if c.isalnum() or c in _INERT else f"#{ord(c)};" for c in text)
    return _WORDS.sub(lambda m: f"#{ord(m[0])};", kept)


def _mermaid_ids(states: tuple[str, ...]) -> dict[str, str]:
    """Each state's identifier: itself if it is a plain one, else ``s<i>`` (unique)."""
    plain = {s for s in states if _PLAIN_ID.fullmatch(s) and not s.lower().startswith(_KEYWORDS)}
    ids: dict[str, str] = {}
    for i, state in enumerate(states):
        if state in plain:
            ids[state] = state
            continue
        ident = f"s{i}"
        while ident in plain:  # a state may be named "s1"
            ident += "_"
        ids[state] = ident
    return ids


def mermaid(workflow: Workflow) -> str:
    ids = _mermaid_ids(workflow.states)
    lines = ["stateDiagram-v2"]
    lines.extend(
        f'    state "{_mermaid_text(s)}" as {ident}' for s, ident in ids.items() if s != ident
    )
    lines.append(f"    [*] --> {ids[workflow.initial]}")
    for t in workflow.transitions.values():
        label = _mermaid_text(_label(workflow, t, deadline=True))
        lines.extend(f"    {ids[source]} --> {ids[t.target]}: {label}" for source in t.sources)
    lines.extend(f"    {ids[state]} --> [*]" for state in workflow.terminal())
    return "\n".join(lines) + "\n"


# -- DOT --------------------------------------------------------------------------------
#
# In a quoted DOT string only '"' is escaped, and a backslash before a newline continues
# the line; a label then reads "\n", "\l", "\r" as line ends, "\N", "\G" as names and
# "&…;" as an entity ("The DOT Language"; the escString and charset attributes). So a
# backslash is doubled, '"' escaped, "&" written "&amp;", a newline "\n" and any other
# unprintable character (refused in a state name at declaration) as its entity. Text
# outside ASCII is written as it is: DOT is UTF-8 by default.

_DOT = {"\\": "\\\\", '"': '\\"', "&": "&amp;", "\n": "\\n"}


def _dot_string(text: str) -> str:
    """``text`` as a quoted DOT string, shown as it is when it is a label."""
    body = "".join(_DOT.get(c) or (c if c.isprintable() else f"&#{ord(c)};") for c in text)
    return f'"{body}"'


def dot(workflow: Workflow) -> str:
    terminal = workflow.terminal()
    start = "[*]"
    while start in workflow.states:  # the start point is no state, whatever their names
        start += "*"
    lines = [
        f"digraph {_dot_string(workflow.resource.name)} {{",
        "    rankdir=LR;",
        f"    {_dot_string(start)} [shape=point];",
    ]
    lines.extend(
        f"    {_dot_string(s)} [shape={'doublecircle' if s in terminal else 'box'}];"
        for s in workflow.states
    )
    lines.append(f"    {_dot_string(start)} -> {_dot_string(workflow.initial)};")
    for t in workflow.transitions.values():
        label = _dot_string(_label(workflow, t, deadline=False))
        lines.extend(
            f"    {_dot_string(s)} -> {_dot_string(t.target)} [label={label}];" for s in t.sources
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
