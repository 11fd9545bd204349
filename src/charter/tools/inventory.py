"""The inventory of a live application: every way in, joined with the gate's registry.

``charter check`` and ``charter report`` read an application as it runs, not its
source text: the routes of a FastAPI or Flask app, the commands of a Typer CLI,
the events of each webhook receiver and the tools exposed to agents. One
adapter per source turns what it finds into :class:`Entry` values; the checks
(:mod:`charter.tools.check`) only ever see entries.

How an entry is known to be Charter's: the endpoints that
:class:`~charter.integrations.fastapi.CharterRoutes` creates carry a marker,
``endpoint.__charter__ = {"kind": "action" | "list" | "webhook" | ..., "action": ...,
"charter": ...}``; any adapter (Flask's, a CLI command that runs actions, a
later export or bulk route) marks its endpoints the same way and is inventoried
without a change here. An endpoint without a marker is not one of Charter's.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigurationError
from ..gate import Charter

__all__ = [
    "MUTATING_METHODS",
    "AgentTool",
    "Entry",
    "Inventory",
    "Location",
    "agent_tools_of",
    "charter_of",
    "cli_entries",
    "fastapi_entries",
    "flask_entries",
    "inventory",
    "location_of",
    "marker_of",
]

MUTATING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: The attribute Charter's adapters set on the endpoints they create (see the module doc).
MARKER = "__charter__"


@dataclass(frozen=True, slots=True, order=True)
class Location:
    """Where something is defined: a file (relative to the working directory if under it)."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


UNKNOWN = Location("<unknown>", 0)


def location_of(obj: Any) -> Location:
    """The file and first line of a function (unwrapped), or ``<unknown>:0``."""
    try:
        target = inspect.unwrap(obj)
        path = inspect.getsourcefile(target) or inspect.getfile(target)
        _, line = inspect.getsourcelines(target)
    except (TypeError, OSError, ValueError):
        return UNKNOWN
    return Location(_relative(path), max(line, 1))


def _relative(path: str) -> str:
    absolute = os.path.abspath(path)
    cwd = os.getcwd()
    if absolute.startswith(cwd + os.sep):
        return os.path.relpath(absolute, cwd).replace(os.sep, "/")
    return absolute.replace(os.sep, "/")


def marker_of(endpoint: Any) -> Mapping[str, Any] | None:
    """The ``__charter__`` marker of an endpoint (or of a function it wraps), if any."""
    seen = 0
    while endpoint is not None and seen < 16:  # bounded: a wrapper chain is short
        mark = getattr(endpoint, MARKER, None)
        if isinstance(mark, Mapping):
            return mark
        endpoint = getattr(endpoint, "__wrapped__", None)
        seen += 1
    return None


@dataclass(frozen=True, slots=True)
class Entry:
    """One way into the application: a route, a CLI command or a webhook event.

    ``source`` is ``fastapi``, ``flask``, ``cli`` or ``webhook``; ``kind`` is the
    marker's kind (``action``, ``list``, ``webhook``, ``export``, ``bulk``, ...) or
    ``None`` for an endpoint that is not Charter's; ``actions`` the actions it runs.
    """

    source: str
    methods: tuple[str, ...]
    path: str
    name: str
    kind: str | None
    actions: tuple[str, ...]
    location: Location
    marker: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def charters(self) -> bool:
        """Whether one of Charter's adapters created it."""
        return self.kind is not None

    @property
    def mutating(self) -> bool:
        return bool(MUTATING_METHODS.intersection(self.methods))

    @property
    def label(self) -> str:
        if self.source == "cli":
            return f"command {self.path}"
        return f"{'|'.join(self.methods)} {self.path}"


@dataclass(frozen=True, slots=True)
class AgentTool:
    """An action exposed to automated agents (issue 12's agent tools).

    ``confirmation``: whether a human must confirm the agent's call before it runs.
    """

    name: str
    action: str
    confirmation: bool
    location: Location = UNKNOWN


@dataclass(frozen=True, slots=True)
class Inventory:
    """Everything found: the Charter, its entries by source, and the agent tools."""

    charter: Charter
    entries: tuple[Entry, ...]
    agent_tools: tuple[AgentTool, ...] = ()
    app_kind: str = "none"

    def routes(self) -> tuple[Entry, ...]:
        return tuple(e for e in self.entries if e.source in ("fastapi", "flask"))

    def reaching(self, action: str) -> tuple[Entry, ...]:
        """The entries that run ``action``."""
        return tuple(e for e in self.entries if action in e.actions)


# -- FastAPI / Starlette ------------------------------------------------------------------


def fastapi_entries(app: Any, *, prefix: str = "") -> Iterator[Entry]:
    """The routes of a Starlette/FastAPI app, mounted sub-applications included."""
    for route in getattr(getattr(app, "router", app), "routes", ()):
        path = prefix + str(getattr(route, "path", ""))
        endpoint = getattr(route, "endpoint", None)
        methods = getattr(route, "methods", None)
        if endpoint is not None and methods:
            yield _entry("fastapi", methods, path, str(getattr(route, "name", "")), endpoint)
            continue
        mounted = getattr(route, "app", None)
        if mounted is not None and hasattr(mounted, "routes"):  # Mount / sub-application
            yield from fastapi_entries(mounted, prefix=path)
        # WebSocket routes and mounted static files are not HTTP methods: nothing to gate.


# -- Flask ------------------------------------------------------------------------------------


def flask_entries(app: Any) -> Iterator[Entry]:
    """The rules of a Flask app's ``url_map``, each with its view function."""
    views = getattr(app, "view_functions", {})
    for rule in app.url_map.iter_rules():
        view = views.get(rule.endpoint)
        if view is None:
            continue
        methods = set(rule.methods or ()) - {"HEAD", "OPTIONS"}
        if rule.endpoint == "static":
            continue  # files served as they are: nothing to gate
        yield _entry("flask", methods, str(rule.rule), str(rule.endpoint), view)


def _entry(source: str, methods: Iterable[str], path: str, name: str, endpoint: Any) -> Entry:
    mark = marker_of(endpoint)
    kind = str(mark.get("kind")) if mark is not None else None
    actions = _actions_of(mark)
    where = location_of(endpoint)
    charter = mark.get("charter") if mark is not None else None
    if isinstance(charter, Charter) and actions and actions[0] in charter.actions:
        # A route Charter generated is defined by its declaration: point at the handler.
        where = location_of(charter.actions[actions[0]].handler)
    return Entry(
        source=source,
        methods=tuple(sorted(m.upper() for m in methods if m.upper() not in ("HEAD", "OPTIONS"))),
        path=path,
        name=name,
        kind=kind,
        actions=actions,
        location=where,
        marker=mark,
    )


def _actions_of(mark: Mapping[str, Any] | None) -> tuple[str, ...]:
    if mark is None:
        return ()
    found: list[str] = []
    if isinstance(mark.get("action"), str):
        found.append(mark["action"])
    actions = mark.get("actions")
    if isinstance(actions, Iterable) and not isinstance(actions, str):
        found.extend(a for a in actions if isinstance(a, str))
    receiver = mark.get("receiver")
    routes = getattr(receiver, "routes", None)
    if isinstance(routes, Mapping):
        found.extend(str(getattr(r, "action", "")) for r in routes.values())
    return tuple(dict.fromkeys(a for a in found if a))


# -- CLI (Typer / Click) ------------------------------------------------------------------------


def cli_entries(cli: Any, *, prefix: str = "") -> Iterator[Entry]:
    """The commands of a Typer (or Click) application, by their full names (``audit verify``).

    A command that runs actions through the gate marks its callback like an endpoint:
    ``__charter__ = {"kind": "operator", "actions": ["ledger.close"]}``, or ``"actions": "*"``
    for one that runs any action (expanded by :func:`inventory`).
    """
    group = _click_group(cli)
    if group is None:
        return
    for name, command in sorted(getattr(group, "commands", {}).items()):
        full = f"{prefix} {name}".strip()
        if hasattr(command, "commands"):
            yield from cli_entries(command, prefix=full)
            continue
        callback = getattr(command, "callback", None)
        mark = marker_of(callback)
        yield Entry(
            source="cli",
            methods=(),
            path=full,
            name=full,
            kind=str(mark.get("kind")) if mark is not None else None,
            actions=_actions_of(mark),
            location=location_of(callback),
            marker=mark,
        )


def _click_group(cli: Any) -> Any:
    if hasattr(cli, "commands"):
        return cli
    try:
        import typer.main
    except ImportError:  # pragma: no cover - typer is a dependency
        return None
    if isinstance(cli, typer.Typer):
        return typer.main.get_command(cli)
    return None


# -- agent tools (issue 12) -------------------------------------------------------------------


def agent_tools_of(charter: Charter) -> tuple[AgentTool, ...]:
    """The actions exposed to agents, read from the declarations.

    A seam for the agent channel (issue 12): an action opts in to agent exposure
    in its declaration. Read here, in this order: a declaration field ``agent``
    (``True``, or an object with ``confirm``/``confirmation``), or ``expose``
    naming ``agent``, with ``confirm``/``confirmation``/``requires_confirmation``
    beside it. A Charter whose actions have none of these exposes no tool, and
    the check's agent rule has nothing to report.
    """
    tools = []
    for name, spec in sorted(charter.actions.items()):
        exposure = _exposure(spec)
        if exposure is not None:
            tools.append(AgentTool(name, name, exposure, location_of(spec.handler)))
    return tuple(tools)


def _exposure(spec: Any) -> bool | None:
    """None: not exposed to agents; else whether a human must confirm."""
    agent = getattr(spec, "agent", None)
    expose = getattr(spec, "expose", None)
    exposed = bool(agent) or (
        isinstance(expose, Iterable) and not isinstance(expose, str) and "agent" in expose
    )
    if not exposed:
        return None
    for holder in (agent, spec):
        for attribute in ("confirm", "confirmation", "requires_confirmation"):
            value = getattr(holder, attribute, None)
            if isinstance(value, bool):
                return value
    return False


# -- the whole application ----------------------------------------------------------------------


def charter_of(app: Any, entries: Iterable[Entry] = ()) -> Charter:
    """The Charter an application runs its gate with.

    Found from the markers of its routes (the Charter each adapter was built
    with), else ``app.state.charter`` (FastAPI) or ``app.extensions["charter"]``
    (Flask, a Charter or an object holding one as ``.charter``). Two different
    Charters on one app are a :class:`ConfigurationError`: say which one.
    """
    if isinstance(app, Charter):
        return app
    marked = (e.marker.get("charter") for e in entries if e.marker is not None)
    found = {id(c): c for c in marked if isinstance(c, Charter)}
    for candidate in (
        getattr(getattr(app, "state", None), "charter", None),
        _extension(app),
    ):
        if isinstance(candidate, Charter):
            found.setdefault(id(candidate), candidate)
    if len(found) == 1:
        return next(iter(found.values()))
    if not found:
        raise ConfigurationError(
            "no Charter found on the application (no Charter route, no app.state.charter, "
            "no app.extensions['charter']): name it with --charter module:attribute"
        )
    raise ConfigurationError(
        "the application uses several Charters: name the one to check with --charter"
    )


def _extension(app: Any) -> Any:
    extensions = getattr(app, "extensions", None)
    if not isinstance(extensions, Mapping):
        return None
    value = extensions.get("charter")
    return value if isinstance(value, Charter) else getattr(value, "charter", None)


def _is_flask(app: Any) -> bool:
    return hasattr(app, "url_map") and hasattr(app, "view_functions")


def inventory(
    app: Any,
    *,
    charter: Charter | None = None,
    cli: Any = None,
    agent_tools: Callable[[Charter], Iterable[AgentTool]] = agent_tools_of,
) -> Inventory:
    """Inventory ``app`` (FastAPI, Flask, or a bare Charter) and, if given, a CLI app."""
    if isinstance(app, Charter):
        entries: list[Entry] = []
        kind = "none"
    elif _is_flask(app):
        entries, kind = list(flask_entries(app)), "flask"
    elif hasattr(app, "router") or hasattr(app, "routes"):
        entries, kind = list(fastapi_entries(app)), "fastapi"
    else:
        raise ConfigurationError(
            f"{type(app).__name__} is neither a FastAPI/Starlette nor a Flask application"
        )
    the_charter = charter if charter is not None else charter_of(app, entries)
    if cli is not None:
        every = tuple(sorted(the_charter.actions))
        # A command marked ``"actions": "*"`` runs any action (an operator's ``charter run``).
        entries.extend(
            dataclasses.replace(e, actions=every)
            if e.marker is not None and e.marker.get("actions") == "*"
            else e
            for e in cli_entries(cli)
        )
    entries.extend(_webhook_events(entries))
    return Inventory(the_charter, tuple(entries), tuple(agent_tools(the_charter)), kind)


def _webhook_events(routes: Iterable[Entry]) -> Iterator[Entry]:
    """Each event a webhook receiver maps to an action, as an entry of its own."""
    for route in list(routes):
        receiver = route.marker.get("receiver") if route.marker is not None else None
        mapping = getattr(receiver, "routes", None)
        if not isinstance(mapping, Mapping):
            continue
        for event, target in sorted(mapping.items()):
            action = str(getattr(target, "action", ""))
            yield Entry(
                source="webhook",
                methods=route.methods,
                path=f"{route.path}#{event}",
                name=str(event),
                kind="webhook_event",
                actions=(action,) if action else (),
                location=route.location,
                marker=route.marker,
            )
