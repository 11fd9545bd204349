"""Bulk actions on the test application's documents, for tests/test_bulk.py (and its crash child).

Run as ``python -m tests.bulk_app URL KEY MARKER ID...``: the child process runs one
per-item batch of ``doc.tick`` over the ids under ``KEY``, and its handler stops
for good at the document titled ``hang`` after writing ``MARKER`` — where the test
kills it with SIGKILL, mid-batch, its item's transaction open.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from charter import Actor, Charter
from charter.context import ActionContext
from charter.credits import Quota

from . import app as test_app
from .app import Doc, is_member
from .conftest import AUDIT_KEYS

TICKS_PER_DAY = 3


def build(url: str, *, hang_marker: str | None = None, **options: Any) -> Charter:
    options.setdefault("rate_limits", None)
    charter = test_app.build(Charter(database_url=url, audit_keys=AUDIT_KEYS, **options))

    def tick(ctx: ActionContext, doc: Doc, _: BaseModel) -> dict[str, Any]:
        if hang_marker is not None and doc.title == "hang":
            assert ctx.session is not None
            ctx.session.flush()  # this item's change is in its open transaction
            Path(hang_marker).write_text("hanging")
            threading.Event().wait()  # until SIGKILL
        doc.counter += 1
        return {"id": doc.id, "counter": doc.counter}

    charter.action("doc.tick", on=Doc, allow=is_member, bulk="per_item")(tick)
    charter.action("doc.tick_all", on=Doc, allow=is_member, bulk="all_or_nothing")(tick)
    charter.action("doc.tick_small", on=Doc, allow=is_member, bulk="per_item", max_batch=3)(tick)
    charter.action(
        "doc.tick_keyed", on=Doc, allow=is_member, bulk="per_item", idempotency="required"
    )(tick)
    charter.action(
        "doc.tick_quota", on=Doc, allow=is_member, bulk="per_item",
        cost=Quota("ticks", limit=TICKS_PER_DAY, per="day"),
    )(tick)  # fmt: skip
    charter.action("doc.tick_paid", on=Doc, allow=is_member, bulk="per_item", cost=2)(tick)
    charter.action("doc.tick_paid_all", on=Doc, allow=is_member, bulk="all_or_nothing", cost=2)(
        tick
    )
    return charter


def main(url: str, key: str, marker: str, ids: list[str]) -> None:
    charter = build(url, hang_marker=marker)
    alice = Actor.make("alice", "acme", roles={"member"})
    charter.execute_many(alice, "doc.tick", [int(i) for i in ids], key=key)
    raise SystemExit("the batch finished: the test expected to kill it first")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
