"""The operator channel: ``charter run`` and ``charter export``, as a person at the command line.

An operator is not a superuser. It is an :class:`~charter.actor.Actor` of kind
``operator`` read from an **operator directory** — never from the user
directory the HTTP channel authenticates against — with a tenant, roles and a
credential's scopes, and every call it makes goes through the same pipeline
as any other channel's (:meth:`Charter.execute`, :meth:`Charter.export`) on
channel ``cli``: a rule that does not allow the operator refuses it, a scope
it does not hold refuses it, and the audit entry says who, on which channel,
and why. The reason is mandatory, checked before anything runs.

The directory is a mapping of operator id to its entry, or a callable
``directory(operator_id) -> Actor | None``; :meth:`OperatorDirectory.from_file`
reads JSON or TOML::

    {"ops-olga": {"tenant": "acme", "roles": ["admin"],
                  "scopes": ["invoices:read", "invoices:write"]}}

``scopes`` is required (fail closed: an entry that forgets it is a
configuration error, not an operator that may do everything; ``["*"]`` says
so explicitly). An id the directory does not know is 401 ``unknown_operator``.

Each call gets a fresh request id; the audit entry it produced (applied,
replayed or refused) is found by that id among the entries written after the
call started (a primary-key range, so the lookup stays cheap on a large trail).
"""

from __future__ import annotations

import json
import os
import sys
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import to_jsonable_python
from sqlalchemy import func, select

from ..actor import Actor, ActorKind, Channel
from ..audit.entry import audit_table
from ..errors import (
    CharterError,
    ConfigurationError,
    InvalidInput,
    PayloadTooLarge,
    ReasonRequired,
    Unauthenticated,
)
from ..gate import Charter
from ..outcome import Outcome
from ..pipeline.stages import MAX_REASON
from ..storage import translate_errors
from .strictjson import loads

__all__ = [
    "MAX_INPUT",
    "Exported",
    "OperatorDirectory",
    "Ran",
    "UnknownOperator",
    "audit_mark",
    "dumps",
    "export_to",
    "find_entry",
    "parse_filters",
    "parse_input",
    "require_reason",
    "run_action",
]

#: The largest ``--input`` (inline or ``@file``) and the largest directory file, in bytes.
MAX_INPUT: Final = 1024 * 1024
MAX_OPERATOR_ID: Final = 128


class UnknownOperator(Unauthenticated):
    """The operator id is not in the operator directory (nothing ran)."""

    code = "unknown_operator"
    status = 401
    title = "Unknown operator"


class _Entry(BaseModel):
    """One operator, as a directory file spells it (unknown keys refused: no silent typo)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    tenant: str = Field(min_length=1, max_length=128)
    roles: list[str] = Field(default_factory=list, max_length=64)
    scopes: list[str] = Field(max_length=256)  # required: fail closed
    attributes: dict[str, Any] = Field(default_factory=dict)


Lookup = Callable[[str], "Actor | None"]


class OperatorDirectory:
    """Who may act from the command line: operator id -> an :class:`Actor` of kind ``operator``.

    ``source``: a mapping of id to an entry (``{"tenant", "roles", "scopes",
    "attributes"}``) or to an :class:`Actor`, or a callable returning the
    actor (or ``None``). An actor it yields must be of kind ``operator``, carry
    the id asked for and a set of scopes; anything else is a configuration error.
    """

    def __init__(self, source: Mapping[str, Any] | Lookup) -> None:
        if callable(source) and not isinstance(source, Mapping):
            self._lookup: Lookup = source
        elif isinstance(source, Mapping):
            actors = {str(k): _actor_of(str(k), v) for k, v in source.items()}
            self._lookup = actors.get
        else:
            raise ConfigurationError(
                "an operator directory is a mapping of operator id to entry, or a callable"
            )

    @classmethod
    def of(cls, value: Any) -> OperatorDirectory:
        """An :class:`OperatorDirectory` from a directory, a mapping or a callable."""
        return value if isinstance(value, OperatorDirectory) else cls(value)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> OperatorDirectory:
        """Read a JSON (``.json``) or TOML (``.toml``) file: operator id -> entry."""
        file = Path(path)
        try:
            with file.open("rb") as handle:
                raw = handle.read(MAX_INPUT + 1)
        except OSError as exc:
            raise ConfigurationError(f"cannot read the operator directory {file}: {exc}") from exc
        if len(raw) > MAX_INPUT:
            raise ConfigurationError(f"the operator directory {file} is larger than 1 MiB")
        try:
            if file.suffix == ".toml":
                data: Any = tomllib.loads(raw.decode("utf-8"))
            elif file.suffix == ".json":
                data = loads(raw)
            else:
                raise ConfigurationError(
                    f"the operator directory {file} must be a .json or .toml file"
                )
        except (CharterError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            if isinstance(exc, ConfigurationError):
                raise
            raise ConfigurationError(f"the operator directory {file} is not valid: {exc}") from exc
        if not isinstance(data, Mapping):
            raise ConfigurationError(f"the operator directory {file} must map ids to entries")
        return cls(data)

    def resolve(self, operator_id: str) -> Actor:
        """The operator's actor; :class:`UnknownOperator` if the directory does not know it."""
        if not _valid_id(operator_id):
            raise UnknownOperator("--as must name an operator of the operator directory")
        actor = self._lookup(operator_id)
        if actor is None:
            raise UnknownOperator(
                f"{operator_id!r} is not in the operator directory: nothing was run"
            )
        return _checked(operator_id, actor)


def _valid_id(value: Any) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_OPERATOR_ID
        and value.isprintable()
        and value.strip() == value
    )


def _actor_of(operator_id: str, entry: Any) -> Actor:
    if not _valid_id(operator_id):
        raise ConfigurationError(f"operator id {operator_id[:64]!r} is not a valid id")
    if isinstance(entry, Actor):
        return _checked(operator_id, entry)
    if not isinstance(entry, Mapping):
        raise ConfigurationError(f"operator {operator_id!r}: an entry is a table of fields")
    try:
        parsed = _Entry.model_validate(dict(entry))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '(entry)'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigurationError(f"operator {operator_id!r}: {problems}") from exc
    return Actor.make(
        operator_id, parsed.tenant, kind=ActorKind.OPERATOR, roles=parsed.roles,
        scopes=parsed.scopes, attributes=parsed.attributes,
    )  # fmt: skip


def _checked(operator_id: str, actor: Any) -> Actor:
    if not isinstance(actor, Actor):
        raise ConfigurationError(f"the operator directory gave {type(actor).__name__}, not Actor")
    if actor.kind is not ActorKind.OPERATOR or actor.id != operator_id:
        raise ConfigurationError(
            f"the operator directory must give an actor of kind 'operator' with id "
            f"{operator_id!r} (got kind {actor.kind.value!r}, id {actor.id!r})"
        )
    if actor.scopes is None or actor.on_behalf_of is not None:
        raise ConfigurationError(
            f"operator {operator_id!r} must carry its scopes (an explicit set; ['*'] for all)"
        )
    return actor


# -- the command line's values ------------------------------------------------------------


def require_reason(reason: str | None) -> str:
    """The reason, stripped; :class:`ReasonRequired` when empty, too long or holding NUL."""
    text = (reason or "").strip()
    if not text:
        raise ReasonRequired("an operator must say why (--reason): it is recorded in the audit")
    if len(text) > MAX_REASON:
        raise ReasonRequired(f"the reason is longer than {MAX_REASON} characters")
    if "\x00" in text:  # PostgreSQL cannot store it; refused on every database alike
        raise ReasonRequired("the reason must not hold a NUL character")
    return text


def parse_input(value: str | None, *, stdin: IO[bytes] | None = None) -> Any:
    """``--input``: JSON text, ``@file`` or ``@-`` (stdin), at most 1 MiB, parsed strictly.

    Strictly: duplicate members, ``NaN``/``Infinity``, absurd numbers and deep
    nesting are refused (:mod:`charter.integrations.strictjson`), as over HTTP.
    """
    if value is None:
        return None
    if value.startswith("@"):
        name = value[1:]
        if name == "-":
            raw = (stdin or sys.stdin.buffer).read(MAX_INPUT + 1)
        else:
            try:
                with open(name, "rb") as handle:
                    raw = handle.read(MAX_INPUT + 1)
            except OSError as exc:
                raise InvalidInput(f"cannot read --input {value}: {exc.strerror}") from exc
    else:
        raw = value.encode("utf-8", "surrogateescape")
    if len(raw) > MAX_INPUT:
        raise PayloadTooLarge("--input is larger than 1 MiB")
    return loads(raw)


def parse_filters(pairs: Iterable[str]) -> dict[str, str] | None:
    """``--filter field=value`` (repeatable) as the export's equality filters, as HTTP's."""
    where: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise InvalidInput(f"--filter {pair[:64]!r}: write it as field=value")
        if name in where:
            raise InvalidInput(f"--filter names {name[:64]!r} twice")
        where[name] = value
    return where or None


# -- running one action ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ran:
    """What ``charter run`` did: the outcome, or the refusal, and its audit entry."""

    outcome: Outcome | None
    error: CharterError | None
    audit: dict[str, Any] | None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_json(self) -> dict[str, Any]:
        if self.outcome is not None:
            o = self.outcome
            result: dict[str, Any] = {
                "ok": True, "action": o.action, "status": o.status, "replayed": o.replayed,
                "resource_id": o.resource_id, "version": o.version, "body": o.body,
                "request_id": o.request_id,
            }  # fmt: skip
        else:
            assert self.error is not None
            result = {"ok": False, **self.error.problem()}
        result["audit_entry"] = self.audit
        return to_jsonable_python(result, fallback=str)  # type: ignore[no-any-return]


def run_action(
    charter: Charter,
    actor: Actor,
    action: str,
    input: Any = None,
    *,
    reason: str | None,
    target: Any = None,
    key: str | None = None,
    channel: Channel | str = Channel.CLI,
) -> Ran:
    """Run ``action`` through the gate as ``actor`` with a mandatory reason; never raises a
    refusal (it is in :attr:`Ran.error`), only :class:`ReasonRequired` before anything ran."""
    why = require_reason(reason)
    request_id = os.urandom(16).hex()
    mark = audit_mark(charter)
    try:
        outcome = charter.execute(
            actor, action, input, target=target, key=key, reason=why, channel=channel,
            request_id=request_id,
        )  # fmt: skip
    except CharterError as exc:
        return Ran(None, exc, find_entry(charter, request_id, mark))
    return Ran(outcome, None, find_entry(charter, request_id, mark))


def audit_mark(charter: Charter) -> int:
    """The newest audit entry's id now: a call's own entries come after it."""
    with translate_errors(), charter.engine.connect() as connection:
        return int(connection.execute(select(func.max(audit_table.c.id))).scalar() or 0)


def find_entry(charter: Charter, request_id: str, after: int) -> dict[str, Any] | None:
    """The last audit entry of ``request_id`` written after entry ``after`` (None: none)."""
    a = audit_table
    stmt = (
        select(a.c.id, a.c.stream, a.c.seq, a.c.outcome, a.c.decision, a.c.channel)
        .where(a.c.id > after, a.c.request_id == request_id)
        .order_by(a.c.id.desc())
        .limit(1)
    )
    with translate_errors(), charter.engine.connect() as connection:
        row = connection.execute(stmt).first()
    return None if row is None else dict(row._mapping)


# -- exports --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Exported:
    """What ``charter export`` sent: rows, the digest of their ids, and how it ended."""

    rows: int
    digest: str
    status: str
    request_id: str


def export_to(
    charter: Charter,
    actor: Actor,
    action: str,
    out: IO[bytes],
    *,
    reason: str | None,
    format: str = "csv",
    sort: str | None = None,
    where: Mapping[str, Any] | None = None,
    channel: Channel | str = Channel.CLI,
) -> Exported:
    """Stream ``action``'s export into ``out`` through :meth:`Charter.export` (the HTTP path).

    Refusals (403, 429) are raised before the first byte; the stream is closed
    however it ends, so its end is audited (completed, or aborted with the rows sent).
    """
    why = require_reason(reason)
    request_id = os.urandom(16).hex()
    stream = charter.export(
        actor, action, format=format, sort=sort, where=where, channel=channel,
        request_id=request_id, reason=why,
    )  # fmt: skip
    with stream:
        for chunk in stream:
            out.write(chunk)
        out.flush()
    return Exported(stream.rows, stream.digest, stream.status, request_id)


def dumps(value: Any) -> str:
    """One JSON line for the terminal (Decimal and datetime as text)."""
    return json.dumps(to_jsonable_python(value, fallback=str), ensure_ascii=False)
