"""HTTP pieces of lists and exports: the query a client may send, and a streamed export body.

Shared by the framework adapters; nothing here decides anything (the gate's
:mod:`charter.data` does). ``?limit=`` is ASCII digits only (``int()`` also
reads ``"1_0"`` and Arabic-Indic digits), ``?after=`` at most
:data:`~charter.data.cursors.MAX_CURSOR` characters, ``?sort=`` one field
(``-`` for descending) and ``?filter.<field>=<value>`` equality filters.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, Final

import anyio
from starlette.concurrency import run_in_threadpool

from ..data import DEFAULT_PAGE, FORMATS, ExportStream
from ..data.cursors import MAX_CURSOR
from ..data.lists import parse_limit
from ..errors import ConfigurationError, InvalidCursor, InvalidPage
from ..ratelimit import rate_headers

__all__ = [
    "LIST_PARAMETERS",
    "export_format",
    "export_formats",
    "export_headers",
    "list_query",
    "page_limit",
    "stream_body",
]

_FILTER: Final = "filter."
#: The OpenAPI parameters of a list (an export takes the last two).
LIST_PARAMETERS: Final[list[dict[str, Any]]] = [
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}},
    {"name": "after", "in": "query", "schema": {"type": "string", "maxLength": MAX_CURSOR}},
    {"name": "sort", "in": "query", "schema": {"type": "string", "maxLength": 65}},
]


def page_limit(value: str | None) -> int:
    """``?limit=``: ASCII digits only (:func:`~charter.data.lists.parse_limit`); 0 is
    refused by the list, a large value capped."""
    return DEFAULT_PAGE if value is None else parse_limit(value)


def list_query(params: Mapping[str, str], *, page: bool = True) -> dict[str, Any]:
    """A list's (``page``) or an export's query as keyword arguments of the Charter call."""
    where = {k[len(_FILTER) :]: v for k, v in params.items() if k.startswith(_FILTER)}
    query: dict[str, Any] = {"sort": params.get("sort"), "where": where or None}
    if page:
        after = params.get("after")
        if after is not None and len(after) > MAX_CURSOR:
            raise InvalidCursor(
                "the page cursor is not valid for this list", parameter="after", reason="invalid"
            )
        query.update(limit=page_limit(params.get("limit")), after=after)
    return query


def export_formats(formats: Iterable[str], path: str) -> tuple[str, ...]:
    """An export route's formats (the first is the default): some, each one Charter writes."""
    allowed = tuple(formats)
    if not allowed or any(f not in FORMATS for f in allowed):
        raise ConfigurationError(f"route {path}: formats are among {', '.join(FORMATS)}")
    return allowed


def export_format(params: Mapping[str, str], allowed: tuple[str, ...]) -> str:
    """``?format=``: one of the route's formats (400 ``invalid_page`` otherwise)."""
    format = params.get("format", allowed[0])
    if format not in allowed:
        raise InvalidPage(f"format is one of {', '.join(allowed)}", parameter="format")
    return format


def export_headers(path: str, stream: ExportStream, format: str) -> dict[str, str]:
    """An export's response fields: the file's name, and the ``RateLimit`` fields of its start."""
    name = f"{path.strip('/').replace('/', '-')}.{format}"
    return {
        "Content-Disposition": f'attachment; filename="{name}"',
        **rate_headers(stream.rate_limit),
    }


async def stream_body(stream: ExportStream) -> AsyncIterator[bytes]:
    """The export's chunks, each read in a worker thread; closed however the response ends.

    A client that disconnects cancels the response's task: the ``finally``
    closes the stream (shielded, so the close is not cancelled in turn), which
    ends the query and audits the export as aborted. Each chunk is read with
    the thread's default: a cancellation waits for the chunk being read, so
    the close never races a read.
    """
    try:
        while True:
            chunk = await run_in_threadpool(next, stream, None)
            if chunk is None:
                return
            yield chunk
    finally:
        with anyio.CancelScope(shield=True):
            await run_in_threadpool(stream.close)
