"""Charter's reference service: multi-tenant invoicing, served over HTTP.

``charter.demo:app`` is the ASGI application (built on first access, so that
importing this package has no side effects); ``charter demo`` migrates the
embedded SQLite database and serves it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["app"]


def __getattr__(name: str) -> Any:
    if name == "app":
        from .app import create_app

        application = create_app()
        globals()["app"] = application
        return application
    raise AttributeError(name)
