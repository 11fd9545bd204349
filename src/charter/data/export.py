"""Streaming exports: CSV or JSON lines of every record an actor may act on, memory flat.

:func:`start_export` does, before the first byte is sent, what the action's
own pipeline would: the ``rate_limit`` stage (the ``export`` class: stricter,
with its in-flight slot held for as long as the stream runs), the credential
gate (a scope or impersonation refusal is a 403, audited, as for lists), then
in one transaction the ``charge`` stage (the action's period quota: 429
``quota_exceeded``, audited) and the audit entry that the export **started**:
who, the format, the fields, the sort and the filter. The stages are the
action pipeline's own objects, so an export is counted and charged exactly as
the action is everywhere else.

The rows are selected by the action's policy compiled to SQL (tenant
included) with the sort and filter of :class:`~charter.data.lists.ListQuery`,
and streamed: a server-side cursor on PostgreSQL (``yield_per``: the driver
holds one chunk at a time), chunks of the same size from SQLite's cursor. A
field the actor may not see is not selected at all. The connection is opened
when the first chunk is asked for and closed when the stream ends, however it
ends — the last row, an error, or :meth:`ExportStream.close` (the HTTP
adapter calls it when the client disconnects, which ends the query). Then an
entry records the end: ``export_completed`` or ``export_aborted``, the row
count and a SHA-256 digest of the exported ids, one per line in export order
(``sha256("1\\n2\\n3\\n")``), so an export cut off midway is on record too,
with what it had sent.

CSV cells written as text that a spreadsheet would run as a formula (leading
``=``, ``+``, ``-``, ``@``, tab or CR: OWASP "CSV injection") are prefixed
with ``'``: in SQL for a plain text column, so the stream stays as fast as the
database; in Python for any other column whose value is not a number, a
boolean or a date (an enum, JSON, a ``TypeDecorator`` over text: what it
returns is only known once it has run). An enum is written as its value, as
the JSON of a single read shows it, in both formats.

Every JSON line is RFC 8259 JSON, which has no NaN or infinity: a float that
is not finite (PostgreSQL stores ``'NaN'``, ``'Infinity'`` and
``'-Infinity'`` in a float column, and a JSON column may hold them) is written
as the string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"`` — what a ``Decimal``
column's same values are written as, and what ``float()``, ``Decimal()`` and a
Pydantic ``float`` or ``Decimal`` field (``charter import``) read back as the
same value. A finite float is written as a JSON number, as it always was.
"""

from __future__ import annotations

import csv
import enum
import hashlib
import io
import json
import logging
import weakref
from collections.abc import Generator, Iterator, Mapping, Sequence
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy import String
from sqlalchemy import inspect as sa_inspect

from ..actions import ActionSpec
from ..context import ActionContext
from ..decision import Decision
from ..errors import ConfigurationError, Forbidden, InvalidPage
from ..pipeline.build import Pipeline
from ..pipeline.call import Call, Refusal, entry_for
from ..pipeline.run import audit_refusal
from ..policy import ActionPolicy
from ..policy.visibility import hidden_fields
from ..resources import ResourceSpec
from ..storage import translate_errors
from .lists import ListQuery

__all__ = ["CHUNK_ROWS", "FORMATS", "ExportStream", "start_export"]

log = logging.getLogger("charter.export")

#: Media type of each format (JSON lines: one JSON object per line, https://jsonlines.org).
FORMATS: Final = {"csv": "text/csv; charset=utf-8", "jsonl": "application/jsonl"}
#: Rows fetched, encoded and sent at a time.
CHUNK_ROWS: Final = 1000
STARTED, COMPLETED, ABORTED = "export_started", "export_completed", "export_aborted"
_FORMULA: Final = ("=", "+", "-", "@", "\t", "\r")


class ExportStream(Iterator[bytes]):
    """An export being sent: iterate it for its encoded chunks; :meth:`close` ends it early.

    ``status`` is ``"ready"`` until the first chunk, then ``"streaming"``, then
    ``"completed"`` or ``"aborted"``; ``rows`` and ``digest`` say what was sent.
    ``rate_limit`` holds the states of the ``RateLimit`` fields of the start.
    """

    def __init__(self, export: _Export) -> None:
        self._export = export
        self._chunks = export.chunks()
        self.media_type = FORMATS[export.format]
        self.format = export.format
        self.fields = export.fields
        self.rate_limit = export.call.rate_limit
        # Dropped without close() or the end: its slot and its end's entry are not lost.
        weakref.finalize(self, export.finish).atexit = False

    @property
    def status(self) -> str:
        return self._export.status

    @property
    def rows(self) -> int:
        return self._export.rows

    @property
    def digest(self) -> str:
        return "sha256:" + self._export.ids.hexdigest()

    def __next__(self) -> bytes:
        return next(self._chunks)

    def close(self) -> None:
        """End the stream: the query stops, the slot is freed, the end is audited (once)."""
        self._chunks.close()
        self._export.finish()  # a stream closed before its first chunk never ran its body

    def __enter__(self) -> ExportStream:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def start_export(
    pipeline: Pipeline,
    spec: ActionSpec,
    policy: ActionPolicy,
    ctx: ActionContext,
    *,
    format: str = "csv",
    sort: str | None = None,
    where: Mapping[str, Any] | None = None,
    fields: Sequence[str] | None = None,
) -> ExportStream:
    """Check, count, charge and audit the start of an export of ``spec``'s records (see module)."""
    resource = spec.resource
    if resource is None or not spec.listable:
        raise ConfigurationError(f"{spec.name} is not declared listable=True: it cannot export")
    if format not in FORMATS:
        raise InvalidPage(f"format must be one of {', '.join(FORMATS)}", parameter="format")
    stages = {stage.name: stage for stage in pipeline.stages}
    call = Call(spec, ctx)
    try:
        _count(stages.get("rate_limit"), call)
        export = _Export(pipeline, policy, call, format, sort, where, fields)
        export.begin(stages.get("charge"))
    except BaseException:
        _release(call)
        raise
    return ExportStream(export)


class _Export:
    """One export's state: its statement, what it sent, and how it ended."""

    def __init__(
        self,
        pipeline: Pipeline,
        policy: ActionPolicy,
        call: Call,
        format: str,
        sort: str | None,
        where: Mapping[str, Any] | None,
        fields: Sequence[str] | None,
    ) -> None:
        resource = call.spec.resource
        assert resource is not None  # checked by start_export
        self.pipeline, self.policy, self.call, self.format = pipeline, policy, call, format
        actor = call.ctx.actor
        hidden = hidden_fields(resource, actor, call.ctx)
        self.query = ListQuery.parse(resource, hidden, sort=sort, where=where)
        self.fields = _fields(resource, hidden, fields)
        self.status, self.rows, self.ids = "ready", 0, hashlib.sha256()
        self._finished = False

    def begin(self, charge: Any) -> None:
        """The credential gate, then the charge and the start's audit entry, committed together."""
        call, committer = self.call, self.pipeline.committer
        spec, ctx = call.spec, call.ctx
        denial = self.policy.credential_denial(ctx.actor)
        if denial is not None:
            committer.alone(entry_for(spec, ctx, None, None, denial, "forbidden", None,
                                      detail={"explanation": denial.reason}))  # fmt: skip
            raise Forbidden(denial.public_reason, decision=denial)
        call.decision = Decision.allow("filter", "rows selected by the policy in SQL")
        try:
            with committer.transaction() as (session, lease):
                call.session, call.connection, call.lease = session, session.connection(), lease
                if charge is not None:
                    charge.run(call)  # the period quota (429) or credits (402), ledgered
                entry = self._entry(STARTED, {"format": self.format, "fields": self.fields,
                                              **self.query.describe()})  # fmt: skip
                committer.write(session, lease, [entry], None, call.connection)
        except Refusal as refusal:
            audit_refusal(self.pipeline, call, refusal)
            raise refusal.error from None
        finally:
            call.session = call.connection = call.lease = None

    def chunks(self) -> Generator[bytes, None, None]:
        """The encoded rows, a chunk at a time; the connection lives exactly as long."""
        self.status = "streaming"
        outcome, error = ABORTED, None
        try:
            with translate_errors(), self.pipeline.runtime.engine.connect() as connection:
                stmt, params = self._statement()
                result = connection.execution_options(yield_per=CHUNK_ROWS).execute(stmt, params)
                try:
                    encode = self._encoder()
                    if self.format == "csv":
                        yield _csv_rows([self.fields])
                    for rows in result.partitions():
                        self.ids.update("".join(f"{row[0]}\n" for row in rows).encode())
                        self.rows += len(rows)
                        yield encode(rows)
                finally:
                    result.close()  # PostgreSQL: CLOSE the server-side cursor, ending the query
            outcome = COMPLETED
        except GeneratorExit:
            raise
        except Exception as exc:
            error = type(exc).__name__
            raise
        finally:
            self.finish(outcome, error)

    def finish(self, outcome: str = ABORTED, error: str | None = None) -> None:
        """Give back the slot and audit the end, once, however the stream ended."""
        if self._finished:
            return
        self._finished = True
        self.status = "completed" if outcome == COMPLETED else "aborted"
        _release(self.call)
        detail: dict[str, Any] = {"rows": self.rows, "digest": "sha256:" + self.ids.hexdigest(),
                                  "format": self.format}  # fmt: skip
        if error is not None:
            detail["error"] = error
        try:
            self.pipeline.committer.alone(self._entry(outcome, detail))
        except Exception:  # the stream's own outcome stands; the operator must know
            log.exception("the end of export %s could not be audited", self.call.spec.name)

    def _entry(self, outcome: str, detail: dict[str, Any]) -> Any:
        call = self.call
        return entry_for(call.spec, call.ctx, None, None, call.decision, outcome, None,
                         detail=detail)  # fmt: skip

    def _encoder(self) -> Any:
        if self.format == "jsonl":
            return _jsonl(self.fields)
        resource = self.query.resource
        dates = [i for i, name in enumerate(self.fields) if _is_date(resource, name)]
        texts = [i for i, name in enumerate(self.fields) if _needs_cell_check(resource, name)]
        if not dates and not texts:
            return _csv_rows

        def encode(rows: Sequence[Sequence[Any]]) -> bytes:
            out = []
            for row in rows:
                cells = list(row)
                for i in dates:
                    if cells[i] is not None:
                        cells[i] = cells[i].isoformat()
                for i in texts:
                    cells[i] = _csv_cell(cells[i])
                out.append(cells)
            return _csv_rows(out)

        return encode

    def _statement(self) -> tuple[Any, dict[str, Any]]:
        resource = self.query.resource
        columns = [_column(resource, name, csv=self.format == "csv") for name in self.fields]
        where, params = self.policy.bound_where(self.call.ctx.actor, self.call.ctx)
        return self.query.apply(sa.select(*columns).where(where), None), params


def _count(limited: Any, call: Call) -> None:
    """The ``rate_limit`` stage, its count read at once (:meth:`Call.count`); a concurrency
    slot joins ``call.releases``."""
    if limited is not None:
        call.count(limited)


def _release(call: Call) -> None:
    releases, call.releases = call.releases, ()
    for release in releases:
        try:
            release()
        except Exception:  # pragma: no cover - a slot frees at its expiry anyway
            log.exception("releasing a rate-limit slot failed")


def _fields(
    resource: ResourceSpec, hidden: frozenset[str], wanted: Sequence[str] | None
) -> list[str]:
    """The exported columns: the id first, then those asked for (default: every visible one)."""
    columns = [c.key for c in sa_inspect(resource.model).column_attrs]
    if wanted is None:
        chosen = [c for c in columns if c not in hidden]
    else:
        if isinstance(wanted, str) or len(wanted) > len(columns):
            raise InvalidPage("fields: a list of field names", parameter="fields")
        chosen = []
        for name in wanted:
            if not isinstance(name, str) or name in hidden or name not in columns:
                shown = ", ".join(c for c in columns if c not in hidden)
                raise InvalidPage(f"fields: no such field (fields: {shown})", parameter="fields")
            if name not in chosen:
                chosen.append(name)
    return [resource.id, *(c for c in chosen if c != resource.id)]


def _column(resource: ResourceSpec, name: str, *, csv: bool) -> Any:
    column: Any = resource.column(name)
    if csv and _plain_text(column.type):
        # Neutralize spreadsheet formulas in SQL (see the module docstring).
        first = sa.func.substr(column, 1, 1)
        column = sa.case((first.in_(_FORMULA), sa.literal("'") + column), else_=column)
    return column.label(name)


def _plain_text(sql_type: Any) -> bool:
    """A text column read as it is stored: neutralized in SQL (an Enum is a String too)."""
    return isinstance(sql_type, String) and not isinstance(sql_type, sa.Enum)


#: Types whose values csv writes as numbers, booleans or dates: never a formula.
_NOT_TEXT: Final = (sa.Integer, sa.Numeric, sa.Float, sa.Boolean, sa.Date, sa.DateTime, sa.Time)


def _needs_cell_check(resource: ResourceSpec, name: str) -> bool:
    """A column whose cells are checked in Python: not plain text, not a number or date."""
    sql_type = resource.column(name).type
    return not _plain_text(sql_type) and not isinstance(sql_type, _NOT_TEXT)


def _csv_cell(value: Any) -> Any:
    """A cell as csv writes it, with a leading formula character neutralized (OWASP)."""
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None or isinstance(value, bool | int | float | Decimal):
        return value
    text = value if isinstance(value, str) else str(value)
    return "'" + text if text[:1] in _FORMULA else text


def _is_date(resource: ResourceSpec, name: str) -> bool:
    return isinstance(resource.column(name).type, sa.DateTime | sa.Date)


def _csv_rows(rows: Sequence[Sequence[Any]]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerows(rows)  # RFC 4180 line ends
    return buffer.getvalue().encode()


def _json_value(value: Any) -> Any:
    """What ``json`` cannot write: as the JSON of a single read shows it."""
    if isinstance(value, enum.Enum):
        return value.value  # json calls this again if the value needs it
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    return str(value)  # a UUID, or any other type: never a failure mid-stream


def _finite(value: Any) -> Any:
    """``value`` with each float that is not finite as a string: ``"NaN"``, ``"Infinity"``..."""
    if isinstance(value, float):
        if value != value:
            return "NaN"
        return ("Infinity" if value > 0 else "-Infinity") if value in _INFINITIES else value
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    if isinstance(value, enum.Enum):
        return _finite(value.value)
    return value


_INFINITIES: Final = (float("inf"), float("-inf"))


def _jsonl(fields: list[str]) -> Any:
    """The JSON-lines encoder: strict JSON, a non-finite float as a string (module doc)."""

    def encode(rows: Sequence[Sequence[Any]]) -> bytes:
        docs = [dict(zip(fields, row, strict=True)) for row in rows]
        try:
            lines = [_json_line(doc) for doc in docs]
        except ValueError:  # a NaN or an infinity somewhere in the chunk: rare, so looked for then
            lines = [_json_line(_finite(doc)) for doc in docs]
        return ("\n".join(lines) + "\n").encode()

    return encode


def _json_line(doc: dict[str, Any]) -> str:
    return json.dumps(doc, default=_json_value, ensure_ascii=False, allow_nan=False)
