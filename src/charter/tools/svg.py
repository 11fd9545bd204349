"""Inline SVG for the report: workflow diagrams (a layered layout) and bar charts.

Drawn here, as text, so that the report needs no script and no network: the
page is viewed as it is, in any browser, offline. Every string that reaches the
SVG is escaped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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
    """The state diagram of ``workflow``: states left to right by layer, transitions as arrows.

    Laid out in two passes: states and curves first, then the picture is fitted to what
    was drawn (edges that skip layers bow above the row, those going back run below).
    """
    layers = _layers(workflow)
    labels = [t.action + (" [guarded]" if t.guard is not None else "")
              for t in workflow.transitions.values()]  # fmt: skip
    gap = max(LAYER_GAP, max((len(label) for label in labels), default=0) * _CHAR_W + 24)
    rows = max(len(layer) for layer in layers)
    where: dict[str, tuple[float, float]] = {}
    for column, layer in enumerate(layers):
        top = ((rows - len(layer)) * (NODE_H + ROW_GAP)) / 2
        for row, state in enumerate(layer):
            where[state] = (MARGIN + column * (NODE_W + gap), top + row * (NODE_H + ROW_GAP))
    edges = _edges(workflow, where)
    low = min([0.0, *(e.top for e in edges)]) - 16
    high = max([rows * (NODE_H + ROW_GAP), *(e.bottom for e in edges)]) + 8
    width = MARGIN * 2 + len(layers) * NODE_W + (len(layers) - 1) * gap + 60
    height = high - low
    name = escape(workflow.resource.name)
    parts = [
        f'<svg class="workflow" role="img" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 {low:.0f} {width:.0f} {height:.0f}" aria-label="workflow of {name}">',
        f'<defs><marker id="arrow-{name}" viewBox="0 0 10 10" refX="9" refY="5" '
        'markerWidth="7" markerHeight="7" orient="auto-start-reverse">'
        '<path d="M0,0 L10,5 L0,10 z" fill="#445"/></marker></defs>',
    ]
    parts.extend(e.svg(f"url(#arrow-{name})") for e in edges)
    terminal = set(workflow.terminal())
    for state, (x, y) in where.items():
        kind = "terminal" if state in terminal else ("initial" if state == workflow.initial else "")
        parts.append(
            f'<g class="state {kind}"><rect x="{x:.1f}" y="{y:.1f}" width="{NODE_W}" '
            f'height="{NODE_H}" rx="8"/><text x="{x + NODE_W / 2:.1f}" '
            f'y="{y + NODE_H / 2 + 4:.1f}" text-anchor="middle">{escape(state)}</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)


@dataclass(frozen=True, slots=True)
class _Edge:
    """One drawn transition: a quadratic curve from (sx, sy) to (ex, ey) through (cx, cy)."""

    sx: float
    sy: float
    cx: float
    cy: float
    ex: float
    ey: float
    label: str
    lx: float
    ly: float
    anchor: str = "middle"

    @property
    def top(self) -> float:
        return min(self.sy, self.cy, self.ey, self.ly - 12)

    @property
    def bottom(self) -> float:
        return max(self.sy, self.cy, self.ey, self.ly + 4)

    def svg(self, marker: str) -> str:
        return (
            f'<path class="edge" d="M{self.sx:.1f},{self.sy:.1f} Q{self.cx:.1f},{self.cy:.1f} '
            f'{self.ex:.1f},{self.ey:.1f}" marker-end="{marker}"/>'
            f'<text class="edge-label" x="{self.lx:.1f}" y="{self.ly:.1f}" '
            f'text-anchor="{self.anchor}">{escape(self.label)}</text>'
        )


def _edges(workflow: Workflow, where: dict[str, tuple[float, float]]) -> list[_Edge]:
    """Each transition as a curve: forward ones bow upwards by the layers they skip, those
    within a layer loop out to the right, backward ones run below; parallel ones fan out."""
    out: list[_Edge] = []
    seen: dict[tuple[str, str], int] = {}
    for t in workflow.transitions.values():
        label = t.action + (" [guarded]" if t.guard is not None else "")
        for source in t.sources:
            (x1, y1), (x2, y2) = where[source], where[t.target]
            fan = seen.get((source, t.target), 0)
            seen[(source, t.target)] = fan + 1
            if x2 > x1:  # forward: right side to left side
                span = round((x2 - x1) / (NODE_W + LAYER_GAP)) if x2 - x1 > NODE_W else 1
                sx, sy, ex, ey = x1 + NODE_W, y1 + NODE_H / 2, x2, y2 + NODE_H / 2
                cx, cy = (sx + ex) / 2, (sy + ey) / 2 - max(0, span - 1) * 34 - fan * 16
            elif x2 == x1:  # within a layer: out of the right side and back in
                sx, sy, ex, ey = x1 + NODE_W, y1 + NODE_H / 2, x2 + NODE_W, y2 + NODE_H / 2
                cx, cy = sx + 60 + fan * 16, (sy + ey) / 2
            else:  # backward: under the states
                sx, sy, ex, ey = x1 + NODE_W / 2, y1 + NODE_H, x2 + NODE_W / 2, y2 + NODE_H
                cx, cy = (sx + ex) / 2, max(sy, ey) + 44 + fan * 16
            lx, ly = (sx + 2 * cx + ex) / 4, (sy + 2 * cy + ey) / 4 - 5  # the curve's midpoint
            if x2 == x1:  # beside the loop, not across the next layer's edges
                out.append(_Edge(sx, sy, cx, cy, ex, ey, label, lx + 4, ly + 9, "start"))
                continue
            out.append(_Edge(sx, sy, cx, cy, ex, ey, label, lx, ly))
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
