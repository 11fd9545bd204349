"""Reading through the rules: filtered lists, opaque cursors, streaming exports (later: bulk)."""

from .cursors import DEFAULT_TTL, CursorBinding, CursorSealer
from .export import FORMATS, ExportStream, start_export
from .lists import (
    DEFAULT_PAGE,
    HARD_MAX_PAGE,
    MAX_PAGE,
    ListQuery,
    Page,
    check_max_page,
    list_records,
)

__all__ = [
    "DEFAULT_PAGE",
    "DEFAULT_TTL",
    "FORMATS",
    "HARD_MAX_PAGE",
    "MAX_PAGE",
    "CursorBinding",
    "CursorSealer",
    "ExportStream",
    "ListQuery",
    "Page",
    "check_max_page",
    "list_records",
    "start_export",
]
