"""Reading through the rules: filtered lists (later: exports, bulk actions)."""

from .lists import DEFAULT_PAGE, MAX_PAGE, list_records

__all__ = ["DEFAULT_PAGE", "MAX_PAGE", "list_records"]
