"""Batch imports: every row of a CSV or JSON-lines file through the gate, once, resumable.

``charter import FILE --action ACTION --as OPERATOR --reason TEXT`` runs each row
as its own :meth:`Charter.execute` call on channel ``batch`` — its own
transaction, rate limit, lock, workflow step, rule, charge and audit entry — so
a bad row is refused whole and the others are not touched.

**Exactly once, across interruptions.** Each row carries an idempotency key
derived from the import id (``--import-id``; by default the file's name), the
row's number and a hash of its content::

    imp:<sha256(import id)[:16]>:<row number>:<sha256(canonical row)[:32]>

Run the same file again after a crash (``kill -9`` at any row) and every row
that had committed replays — its stored outcome, nothing runs — while the row
that was in flight (rolled back with its transaction) and the rest run once.
Fix a bad row and run again: unchanged rows replay and only the changed row,
whose key is new, runs. The key is scoped to the tenant and the operator, like
any key: the same operator must run the retry. Because the row number is part
of the key, **fix rows in place**: inserting, deleting or reordering rows
between runs of one import id gives the moved rows new keys, and they would
run again.

**Rows are read as the JSON a client would send.** A JSON-lines row is one
JSON object, parsed strictly (:mod:`charter.integrations.strictjson`). A CSV
file has a header row; its cells are text, and are turned into the JSON value
of their field: an integer field takes digits only (``-?[0-9]+``: never
``" 5 "``, ``"1_0"`` or ``"5.0"``), a boolean field ``true`` or ``false``, a
number field a JSON number; every other field (strings, money as
:data:`~charter.fields.Amount`, dates) receives the text and the action's
input model decides as it does for an HTTP body. An empty cell is an absent
field (its default applies). The record id of an action on a record is the
``--target-column`` (``id`` by default), not part of the input.

**Streamed and bounded.** The file is read a line at a time (a CSV record may
span lines), no row may exceed :data:`MAX_ROW` bytes, and results are written
as each row finishes: memory does not grow with the file. A malformed file
(no header, a row too large, bad quoting, not UTF-8) stops the import at that
row with :class:`ImportFileInvalid`; the rows before it stand, and a rerun
replays them.

**Transient refusals wait.** A row refused for now (429 ``rate_limited``, a
conflict or a store with ``Retry-After``) is tried again after the time it
names (at most ``max_wait`` seconds, ``attempts`` times): an import respects
the rate limits, it does not bypass them.

Each row's result — ``applied``, ``replayed``, ``refused`` (code and message),
``invalid`` (the validation errors) or ``failed`` (a server-side failure,
nothing applied) — goes to the results file, JSON lines or CSV.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import time
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import IO, Any, Final

from pydantic import BaseModel

from ..actions import ActionSpec
from ..actor import Actor, Channel
from ..errors import CharterError, ConfigurationError, InvalidInput
from ..gate import Charter
from ..idempotency.keys import IdempotencyMode
from .operator import require_reason
from .strictjson import loads

__all__ = [
    "MAX_ROW",
    "ImportFileInvalid",
    "ImportSummary",
    "Importer",
    "ResultsWriter",
    "Row",
    "RowResult",
    "import_file",
    "read_rows",
    "row_key",
    "terminal_progress",
]

#: The largest row, in bytes (a CSV record across its lines, a JSON line).
MAX_ROW: Final = 64 * 1024
MAX_IMPORT_ID: Final = 200
FORMATS: Final = (".csv", ".jsonl", ".ndjson")
#: What can become of a row, in the results file's words.
STATUSES: Final = ("applied", "replayed", "refused", "invalid", "failed")
_INT = re.compile(r"-?(0|[1-9][0-9]{0,49})", re.ASCII)
_NUMBER = re.compile(r"-?(0|[1-9][0-9]{0,49})(\.[0-9]{1,50})?([eE][-+]?[0-9]{1,3})?", re.ASCII)

Progress = Callable[[int], None]


class ImportFileInvalid(InvalidInput):
    """The import file cannot be read as rows (format, header, size, encoding): it stops there."""

    code = "import_file_invalid"
    status = 400
    title = "The import file is not valid"


@dataclass(frozen=True, slots=True)
class Row:
    """One record of the file: its number (1-based, data rows only), first line, raw content."""

    number: int
    line: int
    data: Any
    digest: str
    problem: str | None = None  # a row that cannot be a call (wrong cell count, not an object)
    errors: list[dict[str, Any]] | None = None  # the problem, field by field


def row_key(import_id: str, row: Row) -> str:
    """The row's idempotency key: import id, row number and content (see the module docstring)."""
    scope = hashlib.sha256(import_id.encode()).hexdigest()[:16]
    return f"imp:{scope}:{row.number}:{row.digest[:32]}"


def _digest(value: Any) -> str:
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


# -- reading ----------------------------------------------------------------------------------


class _Lines:
    """The file's decoded lines, each read with a bound, counting a record's bytes and lines."""

    def __init__(self, file: IO[bytes], limit: int, progress: Progress | None) -> None:
        self.file, self.limit, self.progress = file, limit, progress
        self.record_bytes = 0
        self.lines = 0

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        raw = self.file.readline(self.limit + 1)
        if not raw:
            raise StopIteration
        self.lines += 1
        self.record_bytes += len(raw)
        if self.progress is not None:
            self.progress(len(raw))
        if self.record_bytes > self.limit:
            raise ImportFileInvalid(
                f"line {self.lines}: a row is larger than {self.limit} bytes; the import stopped"
            )
        try:
            text = raw.decode("utf-8-sig" if self.lines == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise ImportFileInvalid(f"line {self.lines} is not UTF-8; the import stopped") from exc
        return text


def read_rows(
    path: str | Path, *, max_row: int = MAX_ROW, progress: Progress | None = None
) -> Iterator[Row]:
    """The file's rows, streamed: CSV (a header row first) or JSON lines, by the file's suffix."""
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in FORMATS:
        raise ImportFileInvalid(f"{file.name}: the file must be .csv or .jsonl")
    try:
        handle = file.open("rb")
    except OSError as exc:
        raise ImportFileInvalid(f"cannot read {file}: {exc.strerror}") from exc
    with handle:
        lines = _Lines(handle, max_row, progress)
        yield from _csv_rows(lines) if suffix == ".csv" else _jsonl_rows(lines)


def _csv_rows(lines: _Lines) -> Iterator[Row]:
    reader = csv.reader(lines, strict=True)
    try:
        header = next(reader, None)
        if not header:
            raise ImportFileInvalid("the CSV file has no header row (the field names)")
        if any(not name for name in header) or len(set(header)) != len(header):
            raise ImportFileInvalid("the CSV header names a field twice or has an empty name")
        number, first = 0, lines.lines + 1
        lines.record_bytes = 0
        for cells in reader:
            if cells:  # a blank line is no row
                number += 1
                data: dict[str, Any] = dict(zip(header, cells, strict=False))
                problem = None
                if len(cells) != len(header):
                    data = {"cells": cells}
                    problem = f"the row has {len(cells)} cells, the header {len(header)}"
                yield Row(number, first, data, _digest(data), problem)
            first, lines.record_bytes = lines.lines + 1, 0
    except csv.Error as exc:
        raise ImportFileInvalid(f"line {lines.lines}: {exc}; the import stopped") from exc


def _jsonl_rows(lines: _Lines) -> Iterator[Row]:
    number = 0
    for text in lines:
        lines.record_bytes = 0
        if not text.strip():
            continue
        number += 1
        try:
            data = loads(text)
        except InvalidInput as exc:
            yield Row(number, lines.lines, None, _digest(text), exc.message)
            continue
        if not isinstance(data, dict):
            yield Row(number, lines.lines, None, _digest(data), "the row is not a JSON object")
            continue
        yield Row(number, lines.lines, data, _digest(data))


# -- CSV cells as JSON values --------------------------------------------------------------------


def _kind(annotation: Any) -> str:
    """How a CSV cell of a field with ``annotation`` becomes a JSON value."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _kind(args[0]) if len(args) == 1 else "str"
    if annotation is bool:
        return "bool"
    if isinstance(annotation, type) and (annotation is int or issubclass(annotation, IntEnum)):
        return "int"
    if annotation is float:
        return "float"
    return "str"


def _cell_kinds(model: type[BaseModel]) -> dict[str, str]:
    kinds: dict[str, str] = {}
    for name, info in model.model_fields.items():
        kind = _kind(info.annotation)
        kinds[name] = kind
        if isinstance(info.alias, str):
            kinds[info.alias] = kind
    return kinds


def _json_cells(kinds: dict[str, str], cells: dict[str, str]) -> dict[str, Any]:
    """CSV cells as the JSON object a client would send (see the module docstring)."""
    data: dict[str, Any] = {}
    errors: list[dict[str, Any]] = []
    for name, cell in cells.items():
        if cell == "":
            continue  # an absent field
        kind = kinds.get(name, "str")
        if kind == "int" and _INT.fullmatch(cell):
            data[name] = int(cell)
        elif kind == "float" and _NUMBER.fullmatch(cell):
            data[name] = float(cell)
        elif kind == "bool" and cell in ("true", "false"):
            data[name] = cell == "true"
        elif kind == "str":
            data[name] = cell
        else:
            spelled = {"int": "digits only, such as 42", "float": "a number, such as 4.5",
                       "bool": "true or false"}[kind]  # fmt: skip
            errors.append({"loc": [name], "type": f"csv_{kind}", "msg": f"write {spelled}"})
    if errors:
        raise InvalidInput(
            "the row is invalid: " + "; ".join(f"{e['loc'][0]}: {e['msg']}" for e in errors),
            errors=errors,
        )
    return data


# -- results ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RowResult:
    """What became of one row."""

    row: int
    line: int
    status: str  # applied, replayed, refused, invalid, failed
    key: str
    resource_id: str | None = None
    code: str | None = None
    message: str | None = None
    errors: list[dict[str, Any]] | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "row": self.row, "line": self.line, "status": self.status, "key": self.key,
            "resource_id": self.resource_id, "code": self.code, "message": self.message,
            "errors": self.errors,
        }  # fmt: skip


_COLUMNS: Final = ("row", "line", "status", "key", "resource_id", "code", "message", "errors")


class ResultsWriter:
    """Each row's result, written (and flushed) as it finishes: JSON lines, or CSV by suffix."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.csv = self.path.suffix.lower() == ".csv"
        try:
            self._file = self.path.open("w", encoding="utf-8", newline="")
        except OSError as exc:
            raise ImportFileInvalid(
                f"cannot write the results to {self.path}: {exc.strerror}"
            ) from exc
        self._csv = csv.writer(self._file, lineterminator="\r\n") if self.csv else None
        if self._csv is not None:
            self._csv.writerow(_COLUMNS)

    def write(self, result: RowResult) -> None:
        values = result.as_json()
        if self._csv is not None:
            errors = values["errors"]
            values["errors"] = "" if errors is None else json.dumps(errors, ensure_ascii=False)
            self._csv.writerow(["" if values[c] is None else values[c] for c in _COLUMNS])
        else:
            self._file.write(json.dumps(values, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


@dataclass(slots=True)
class ImportSummary:
    """The counts of one run, and why it stopped early (``stopped``), if it did."""

    import_id: str
    results: str
    rows: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))
    stopped: str | None = None

    @property
    def ok(self) -> bool:
        """Every row applied or replayed, and the file read to its end."""
        return (
            self.stopped is None and self.rows == self.counts["applied"] + self.counts["replayed"]
        )

    def as_json(self) -> dict[str, Any]:
        return {"import_id": self.import_id, "rows": self.rows, **self.counts,
                "results": self.results, "stopped": self.stopped, "ok": self.ok}  # fmt: skip

    def text(self) -> str:
        counts = ", ".join(f"{n} {status}" for status, n in self.counts.items() if n)
        line = f"{self.rows} rows: {counts or 'none'}; results in {self.results}"
        return line + (f"\nstopped: {self.stopped}" if self.stopped else "")


# -- running ----------------------------------------------------------------------------------


class Importer:
    """Runs rows through ``action`` as ``actor``: one gate call per row, keyed (see module)."""

    def __init__(
        self,
        charter: Charter,
        actor: Actor,
        action: str,
        *,
        reason: str | None,
        import_id: str,
        target_column: str | None = None,
        channel: Channel | str = Channel.BATCH,
        sleep: Callable[[float], None] = time.sleep,
        max_wait: float = 60.0,
        attempts: int = 10,
    ) -> None:
        self.charter, self.actor, self.channel = charter, actor, Channel(channel)
        self.spec: ActionSpec = charter.spec(action)
        self.reason = require_reason(reason)
        if not (import_id and len(import_id) <= MAX_IMPORT_ID and import_id.isprintable()):
            raise ConfigurationError(f"--import-id is 1 to {MAX_IMPORT_ID} printable characters")
        self.import_id = import_id
        if self.spec.idempotency is IdempotencyMode.NONE:
            raise ConfigurationError(
                f"{action} takes no idempotency key (idempotency='none'): an import through it "
                "could apply a row twice after an interruption, so it is refused; declare the "
                "action with idempotency='optional' or 'required'"
            )
        takes_target = self.spec.target == "argument"
        if target_column is not None and not takes_target:
            raise ConfigurationError(f"{action} acts on no given record: drop --target-column")
        self.target_column = (target_column or "id") if takes_target else None
        self.kinds = _cell_kinds(self.spec.input)
        self.sleep, self.max_wait, self.attempts = sleep, max_wait, attempts

    def run(self, rows: Iterator[Row], results: ResultsWriter) -> ImportSummary:
        """Every row, in order, its result written as it finishes; stops at a malformed file."""
        summary = ImportSummary(self.import_id, str(results.path))
        try:
            for row in rows:
                result = self.run_row(row)
                results.write(result)
                summary.rows += 1
                summary.counts[result.status] += 1
        except ImportFileInvalid as exc:
            summary.stopped = exc.message
        return summary

    def run_row(self, row: Row) -> RowResult:
        """One row through the gate; a refusal is its result, never an exception."""
        key = row_key(self.import_id, row)

        def result(status: str, error: CharterError | None = None, **more: Any) -> RowResult:
            if error is not None:
                more.update(code=error.code, message=error.message)
                if isinstance(error, InvalidInput):
                    more["errors"] = error.attrs.get("errors")
            return RowResult(row.number, row.line, status, key, **more)

        try:
            target, data = self._call(row)
        except InvalidInput as exc:
            return result("invalid", exc)
        for attempt in range(1, self.attempts + 1):
            try:
                outcome = self.charter.execute(
                    self.actor, self.spec.name, data, target=target, key=key,
                    reason=self.reason, channel=self.channel,
                )  # fmt: skip
            except InvalidInput as exc:
                return result("invalid", exc)
            except CharterError as exc:
                wait = _retry_after(exc)
                if exc.transient and wait <= self.max_wait and attempt < self.attempts:
                    self.sleep(wait)
                    continue
                return result("refused" if 400 <= exc.status < 500 else "failed", exc)
            status = "replayed" if outcome.replayed else "applied"
            return result(status, resource_id=outcome.resource_id)
        raise AssertionError("unreachable: the last attempt returns")  # pragma: no cover

    def _call(self, row: Row) -> tuple[Any, Any]:
        if row.problem is not None:
            errors = row.errors or [{"loc": [], "type": "row", "msg": row.problem}]
            raise InvalidInput(row.problem, errors=errors)
        data = dict(row.data)
        target = None
        if self.target_column is not None:
            target = data.pop(self.target_column, None)
            if target in (None, ""):
                message = f"the {self.target_column!r} column (the record's id) is empty"
                raise InvalidInput(
                    message, errors=[{"loc": [self.target_column], "type": "missing",
                                      "msg": message}],
                )  # fmt: skip
        return target, data


def _retry_after(error: CharterError) -> float:
    value = error.headers.get("Retry-After", "")
    return float(value) if value.isascii() and value.isdigit() else 1.0


def import_file(
    charter: Charter,
    actor: Actor,
    action: str,
    path: str | Path,
    *,
    reason: str | None,
    import_id: str | None = None,
    target_column: str | None = None,
    results: str | Path | None = None,
    progress: Callable[[int], AbstractContextManager[Progress | None]] | None = None,
    **options: Any,
) -> ImportSummary:
    """Import ``path`` through ``action`` as ``actor`` (see the module docstring).

    ``results``: where each row's result goes (default ``<file>.results.jsonl``);
    ``progress``: given the file's size, a context manager yielding a callback
    that receives the bytes read (:func:`terminal_progress`).
    """
    source = Path(path)
    if not source.is_file():
        raise ImportFileInvalid(f"{source}: no such file")
    out = Path(results) if results is not None else source.with_name(source.name + ".results.jsonl")
    if out.exists() and out.resolve() == source.resolve():
        raise ImportFileInvalid("the results file cannot be the import file itself")
    importer = Importer(charter, actor, action, reason=reason,
                        import_id=import_id or source.name, target_column=target_column,
                        **options)  # fmt: skip
    meter = progress(source.stat().st_size) if progress is not None else nullcontext(None)
    with meter as advance, ResultsWriter(out) as writer:
        rows = read_rows(source, progress=advance)
        if source.suffix.lower() == ".csv":
            rows = _as_json(importer, rows)
        return importer.run(rows, writer)


def _as_json(importer: Importer, rows: Iterator[Row]) -> Iterator[Row]:
    """CSV rows with their cells as JSON values; a cell that cannot be one makes the row invalid."""
    for row in rows:
        if row.problem is not None:
            yield row
            continue
        try:
            data = _json_cells(importer.kinds, row.data)
        except InvalidInput as exc:
            yield Row(
                row.number, row.line, row.data, row.digest, exc.message, exc.attrs.get("errors")
            )
            continue
        if importer.target_column is not None and importer.target_column in row.data:
            data[importer.target_column] = row.data[importer.target_column]
        yield Row(row.number, row.line, data, row.digest)


@contextmanager
def terminal_progress(total: int) -> Iterator[Progress]:
    """A Rich progress bar over the file's bytes (for a terminal; the CLI uses it on a TTY)."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("importing"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("import", total=total)
        yield lambda n: bar.advance(task, n)
