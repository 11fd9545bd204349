"""Inline SVG for the report: workflow diagrams (a layered layout) and bar charts.

Drawn here, as text, so that the report needs no script and no network: the
page is viewed as it is, in any browser, offline. Every string that reaches the
SVG is escaped.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from ..workflow import Workflow

__all__ = ["bar_chart", "workflow_svg"]

NODE_W, NODE_H = 150, 36
LAYER_GAP, ROW_GAP, MARGIN = 120, 30, 24
_CHAR_W = 6.6  # an average glyph width at 11px, to size labels


def _layers(workflow: Workflow) -> list[list[str]]:
    """States by distance from the initial state (breadth-first); unreachable ones last."""
    edges: dict[str, list[str]] = {s: [] for s in workflow.states}
    for t in workflow.transitions.values():
        for source in t.sources:
            edges[source].append(t.target)
    depth = {workflow.initial: 0}
    queue = [workflow.initial]
    while queue:
        state = queue.pop(0)
        for target in edges[state]:
            if target not in depth:
                depth[target] = depth[state] + 1
                queue.append(target)
    last = max(depth.values()) + 1
    for state in workflow.states:
        depth.setdefault(state, last)
    layers: list[list[str]] = [[] for _ in range(max(depth.values()) + 1)]
    for state in workflow.states:  # declaration order within a layer: stable
        layers[depth[state]].append(state)
    return [layer for layer in layers if layer]


def workflow_svg(workflow: Workflow) -> str:
    """The state diagram of ``workflow``: states left to right by layer, transitions as arrows."""
    layers = _layers(workflow)
    rows = max(len(layer) for layer in layers)
    width = MARGIN * 2 + len(layers) * NODE_W + (len(layers) - 1) * LAYER_GAP
    # Room above for the bows of edges that skip layers, below for those that go back.
    bow = 34 * max(0, len(layers) - 2) + 40
    height = MARGIN * 2 + rows * NODE_H + (rows - 1) * ROW_GAP + 2 * bow
    where: dict[str, tuple[float, float]] = {}
    for column, layer in enumerate(layers):
        top = (height - (len(layer) * NODE_H + (len(layer) - 1) * ROW_GAP)) / 2
        for row, state in enumerate(layer):
            where[state] = (MARGIN + column * (NODE_W + LAYER_GAP), top + row * (NODE_H + ROW_GAP))
    terminal = set(workflow.terminal())
    parts = [
        f'<svg class="workflow" role="img" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" aria-label="workflow of '
        f'{escape(workflow.resource.name)}">',
        '<defs><marker id="arrow-' + escape(workflow.resource.name) + '" viewBox="0 0 10 10" '
        'refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse">'
        '<path d="M0,0 L10,5 L0,10 z" fill="#445"/></marker></defs>',
    ]
    parts.extend(_edges(workflow, where))
    for state, (x, y) in where.items():
        kind = "terminal" if state in terminal else ("initial" if state == workflow.initial else "")
        parts.append(
            f'<g class="state {kind}"><rect x="{x:.1f}" y="{y:.1f}" width="{NODE_W}" '
            f'height="{NODE_H}" rx="8"/><text x="{x + NODE_W / 2:.1f}" '
            f'y="{y + NODE_H / 2 + 4:.1f}" text-anchor="middle">{escape(state)}</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _edges(workflow: Workflow, where: dict[str, tuple[float, float]]) -> list[str]:
    """Each transition as a quadratic curve: forward ones bow upwards by the layers they skip,
    backward ones run below the states; parallel edges fan out."""
    marker = f"url(#arrow-{escape(workflow.resource.name)})"
    out: list[str] = []
    seen: dict[tuple[str, str], int] = {}
    for t in workflow.transitions.values():
        for source in t.sources:
            (x1, y1), (x2, y2) = where[source], where[t.target]
            fan = seen.get((source, t.target), 0)
            seen[(source, t.target)] = fan + 1
            span = round(abs(x2 - x1) / (NODE_W + LAYER_GAP))
            if x2 > x1:  # forward: right side to left side
                sx, sy, ex, ey = x1 + NODE_W, y1 + NODE_H / 2, x2, y2 + NODE_H / 2
                cy = (sy + ey) / 2 - (span - 1) * 34 - fan * 16
            else:  # backward or within a layer: under the states
                sx, sy, ex, ey = x1 + NODE_W / 2, y1 + NODE_H, x2 + NODE_W / 2, y2 + NODE_H
                cy = max(sy, ey) + 40 + fan * 16
            cx = (sx + ex) / 2
            ly = (sy + 2 * cy + ey) / 4  # the curve's midpoint
            label = t.action + (" [guarded]" if t.guard is not None else "")
            out.append(
                f'<path class="edge" d="M{sx:.1f},{sy:.1f} Q{cx:.1f},{cy:.1f} {ex:.1f},{ey:.1f}" '
                f'marker-end="{marker}"/>'
                f'<text class="edge-label" x="{cx:.1f}" y="{ly - 5:.1f}" '
                f'text-anchor="middle">{escape(label)}</text>'
            )
    return out


def bar_chart(title: str, rows: Sequence[tuple[str, int]], *, limit: int = 15) -> str:
    """A horizontal bar chart of ``rows`` (label, count), the largest ``limit`` first."""
    shown = sorted(rows, key=lambda r: (-r[1], r[0]))[:limit]
    label_w = min(320, max([60, *(len(label) * _CHAR_W + 12 for label, _ in shown)]))
    bar_w, bar_h, gap = 360, 18, 6
    width = int(label_w + bar_w + 70)
    height = 34 + max(1, len(shown)) * (bar_h + gap)
    top = max((count for _, count in shown), default=0)
    parts = [
        f'<svg class="chart" role="img" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" aria-label="{escape(title)}">',
        f'<text class="chart-title" x="4" y="16">{escape(title)}</text>',
    ]
    if not shown:
        parts.append('<text class="empty" x="4" y="40">none recorded</text>')
    for index, (label, count) in enumerate(shown):
        y = 28 + index * (bar_h + gap)
        length = 0 if top == 0 else max(2.0, bar_w * count / top)
        parts.append(
            f'<text class="bar-label" x="{label_w - 6:.0f}" y="{y + 13}" text-anchor="end">'
            f"{escape(label)}</text>"
            f'<rect class="bar" x="{label_w:.0f}" y="{y}" width="{length:.1f}" height="{bar_h}"/>'
            f'<text class="bar-value" x="{label_w + length + 6:.1f}" y="{y + 13}">{count}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)
