"""Routes from action declarations: one naming rule for every web adapter, collisions refused.

The rule (``action_route``), from the action's name ``<prefix>.<verb>`` and what it
declares; the collection is the resource's table name (the action's prefix for
an action on no resource), with ``_`` spelled ``-``, as is the verb:

=========================================  =====================================
declaration                                route
=========================================  =====================================
``creates=True``                           ``POST /invoices``
a sensitive read of a target, verb ``get``  ``GET /invoices/{id}``
another sensitive read of a target         ``GET /invoices/{id}/<verb>``
a change of a target                       ``POST /invoices/{id}/<verb>``
a sensitive read of no target              ``GET /invoices/<verb>``
a change of no target                      ``POST /invoices/<verb>``
=========================================  =====================================

A target found ``by=`` another column than the key names its parameter after the
column (``GET /invoices/{charge_id}/find-by-charge``). A target taken from an
input field is in the body, so the path has no parameter. Two routes with the
same method where the first would take every request of the second (``/a/{id}``
and ``/a/{key}``; ``/a/{id}`` bound before ``/a/export``, which it would serve with
the id ``export``) are refused at start-up with a
:class:`~charter.errors.ConfigurationError` naming both, whether generated or
bound by hand (:class:`RouteTable`). ``CharterRoutes.generate`` binds literal
segments before parameters, so its own routes never shadow each other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..actions import ActionSpec
from ..errors import ConfigurationError

__all__ = ["GeneratedRoute", "RouteTable", "action_route", "route_order", "route_shape"]

_PARAMETER = re.compile(r"{[^}/]*}|<[^>/]*>")  # {id} (Starlette) and <id> / <int:id> (Flask)


@dataclass(frozen=True, slots=True)
class GeneratedRoute:
    """``method path`` for an action, and the path parameter holding its target (or None)."""

    method: str
    path: str
    target: str | None


def action_route(spec: ActionSpec) -> GeneratedRoute:
    """The route the naming rule (module docstring) gives ``spec``."""
    prefix, _, verb = spec.name.rpartition(".")
    collection = (spec.resource.name if spec.resource is not None else prefix).replace("_", "-")
    verb = verb.replace("_", "-")
    base = "/" + collection.replace(".", "/")
    if spec.creates:
        return GeneratedRoute("POST", base, None)
    method = "GET" if spec.sensitive_read else "POST"
    if spec.target == "argument":
        parameter = spec.by or "id"
        item = f"{base}/{{{parameter}}}"
        if spec.sensitive_read and verb == "get":
            return GeneratedRoute(method, item, parameter)
        return GeneratedRoute(method, f"{item}/{verb}", parameter)
    return GeneratedRoute(method, f"{base}/{verb}", None)


def route_shape(path: str) -> str:
    """``path`` with every parameter written ``{}``: what two routes must not share."""
    return _PARAMETER.sub("{}", path.rstrip("/") or "/")


def route_order(path: str) -> list[tuple[bool, str]]:
    """A sort key putting literal segments before parameters (``/a/export``, then ``/a/{id}``)."""
    return [(bool(_PARAMETER.fullmatch(part)), part) for part in path.strip("/").split("/")]


def _matcher(path: str) -> re.Pattern[str]:
    parts = _PARAMETER.split(path.rstrip("/") or "/")
    return re.compile("[^/]+".join(re.escape(part) for part in parts))


class RouteTable:
    """The routes an app serves, in order; one that an earlier route would shadow is refused."""

    def __init__(self) -> None:
        self._taken: list[tuple[str, re.Pattern[str], str, str]] = []

    def claim(self, method: str, path: str, what: str) -> None:
        method = method.upper()
        # A request for the new route: its parameters as they are written (one segment each).
        probe = path.rstrip("/") or "/"
        for taken_method, pattern, taken_path, holder in self._taken:
            if taken_method == method and pattern.fullmatch(probe):
                raise ConfigurationError(
                    f"route {method} {path} for {what} collides with {holder} "
                    f"({method} {taken_path}), which would serve its every request: bind one "
                    "of them to another path, or the literal one first"
                )
        self._taken.append((method, _matcher(path), path, what))

    def __contains__(self, key: tuple[str, str]) -> bool:
        method, path = key
        return any(m == method.upper() and p == path for m, _, p, _ in self._taken)
