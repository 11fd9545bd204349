"""What a bulk request is and what it answers: items, their results, the batch's errors.

The driver that runs a batch is :mod:`charter.data.bulk`; this module holds
the values it reads and returns, which every channel renders the same way:

* an **item** of an action whose target is the call's argument (the URL's id) is
  a record id, or ``{"target": id, "input": {...}}``; an item of any other
  action is that action's input object;
* a :class:`BatchOutcome` is a :class:`BatchItem` per item, in request order,
  each ``applied``, ``refused`` (with the error's code, status and message, as
  the single call would have answered) or ``replayed`` (its derived key had
  already completed), and the counts that state a partial success;
* the **batch fingerprint** covers every item, in order: a key reused with
  other items, or the same items in another order, is another request (422).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

from ..actions import ActionSpec, BulkMode
from ..errors import CharterError, InvalidInput, PayloadTooLarge
from ..idempotency.keys import MAX_KEY_LENGTH, fingerprint
from ..idempotency.store import stored_error
from ..outcome import Outcome

__all__ = [
    "MAX_BATCH_KEY",
    "BatchEmpty",
    "BatchFailed",
    "BatchItem",
    "BatchOutcome",
    "BatchTooLarge",
    "BulkUnsupported",
    "batch_fingerprint",
    "batch_items",
    "item_fingerprint",
    "split_item",
]

#: A batch key leaves room for ``#<position>``: every derived key fits the key column.
MAX_BATCH_KEY = MAX_KEY_LENGTH - 8

Status = Literal["applied", "refused", "replayed"]


class BatchEmpty(InvalidInput):
    """A bulk request with no items: nothing to do is a mistake, not a success."""

    code = "batch_empty"
    status = 400
    title = "The batch has no items"


class BatchTooLarge(PayloadTooLarge):
    """More items than the action's largest batch (``max``); nothing was applied."""

    code = "batch_too_large"
    status = 413
    title = "The batch has too many items"


class BulkUnsupported(InvalidInput):
    """The action was not declared with a bulk form (``bulk=``): it takes one item per call."""

    code = "bulk_unsupported"
    status = 400
    title = "This action takes no batch"


class BatchFailed(CharterError):
    """An all-or-nothing batch failed: nothing was applied.

    ``failures`` lists every failing item (``position``, ``code``, ``status``,
    ``message``), ``size`` the batch's item count. When a failure is transient
    (rate limited, a lock held), ``Retry-After`` says when to send the batch again.
    """

    code = "batch_failed"
    status = 422
    title = "The batch failed; nothing was applied"

    def __init__(
        self, action: str, size: int, failures: Sequence[tuple[int, CharterError]]
    ) -> None:
        listed = [{"position": position, **_error(error)} for position, error in failures]
        super().__init__(
            f"{action}: {len(listed)} of {size} items failed, so none was applied; "
            "each failure is listed with its position",
            action=action,
            size=size,
            failures=listed,
        )
        waits = [int(e.headers["Retry-After"]) for _, e in failures if "Retry-After" in e.headers]
        if waits or any(e.transient for _, e in failures):
            self.headers["Retry-After"] = str(max(waits, default=1))


def _error(error: CharterError) -> dict[str, Any]:
    """An item's error as its single call would have answered it (code, status, message)."""
    stored = stored_error(error)
    out: dict[str, Any] = {
        "code": stored["code"],
        "status": stored["status"],
        "message": stored["message"],
    }
    for name, value in stored["attrs"].items():
        out.setdefault(name, value)
    return out


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One item's result: ``applied``, ``refused`` (``error``) or ``replayed``.

    ``http_status`` is what the single call would have answered; ``body``,
    ``resource_id`` and ``version`` its outcome's (an applied or replayed item).
    ``error`` is a refused item's code, status and message (and the error's
    public details). ``replayed`` on a refused item: its stored refusal, replayed.
    """

    position: int
    status: Status
    http_status: int
    body: Any = None
    resource_id: str | None = None
    version: int | None = None
    error: Mapping[str, Any] | None = None
    replayed: bool = False

    @classmethod
    def of(cls, position: int, outcome: Outcome) -> BatchItem:
        """An item that ran: ``applied``, or ``replayed`` from its own key."""
        return cls(
            position,
            "replayed" if outcome.replayed else "applied",
            outcome.status,
            outcome.body,
            outcome.resource_id,
            outcome.version,
        )

    @classmethod
    def refused(cls, position: int, error: CharterError) -> BatchItem:
        return cls(
            position,
            "refused",
            error.status,
            error=_error(error),
            replayed=bool(getattr(error, "replayed", False)),
        )

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "position": self.position,
            "status": self.status,
            "http_status": self.http_status,
        }
        if self.error is not None:
            out["error"] = dict(self.error)
            if self.replayed:
                out["replayed"] = True
        else:
            out.update(body=self.body, resource_id=self.resource_id, version=self.version)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BatchItem:
        return cls(
            position=int(data["position"]),
            status=data["status"],
            http_status=int(data["http_status"]),
            body=data.get("body"),
            resource_id=data.get("resource_id"),
            version=data.get("version"),
            error=data.get("error"),
            replayed=bool(data.get("replayed", False)),
        )


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """The result of :meth:`Charter.execute_many`: one :class:`BatchItem` per item, in order.

    ``replayed``: the whole result was stored by an earlier request with the same
    batch key (its JSON is the stored one, byte for byte the same content).
    ``partial``: some items were applied and some refused (per-item mode only;
    an all-or-nothing batch that fails raises :class:`BatchFailed` instead).
    """

    action: str
    mode: BulkMode
    items: tuple[BatchItem, ...]
    request_id: str = ""
    replayed: bool = False
    rate_limit: tuple[Any, ...] = field(default=(), compare=False)

    def count(self, status: Status) -> int:
        return sum(1 for item in self.items if item.status == status)

    @property
    def applied(self) -> int:
        return self.count("applied")

    @property
    def refused(self) -> int:
        return self.count("refused")

    @property
    def partial(self) -> bool:
        return self.refused > 0 and self.refused < len(self.items)

    def as_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "mode": str(self.mode),
            "size": len(self.items),
            "applied": self.applied,
            "replayed": self.count("replayed"),
            "refused": self.refused,
            "partial": self.partial,
            "items": [item.as_json() for item in self.items],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, request_id: str, replayed: bool) -> BatchOutcome:
        return cls(
            action=str(data["action"]),
            mode=BulkMode(data["mode"]),
            items=tuple(BatchItem.from_json(item) for item in data["items"]),
            request_id=request_id,
            replayed=replayed,
        )


def batch_items(body: Any) -> list[Any]:
    """The items of a bulk request's body, ``{"items": [...]}``; any other member is refused."""
    if not isinstance(body, dict) or set(body) != {"items"} or not isinstance(body["items"], list):
        raise InvalidInput(
            'a bulk request\'s body is {"items": [...]}, with no other member',
            errors=[{"loc": ["items"], "type": "missing", "msg": "a list of items is required"}],
        )
    return body["items"]


def split_item(spec: ActionSpec, item: Any) -> tuple[Any, Any]:
    """An item as the single call's ``(target, input)`` (see the module docstring)."""
    if spec.target != "argument":
        return None, item
    if isinstance(item, Mapping):
        unknown = sorted(str(k) for k in item if k not in ("target", "input"))
        if unknown or "target" not in item:
            raise InvalidInput(
                f"an item of {spec.name} is a record id or "
                '{"target": <id>, "input": {...}}'
                + (f"; unknown member {unknown[0]!r}" if unknown else "; it has no target"),
                errors=[],
            )
        return item["target"], item.get("input")
    if isinstance(item, str | int) and not isinstance(item, bool):
        return item, None
    raise InvalidInput(
        f'an item of {spec.name} is a record id or {{"target": <id>, "input": {{...}}}}',
        errors=[],
    )


def item_fingerprint(
    spec: ActionSpec, target: Any, data: BaseModel | None, raw: Any, *, key: bytes
) -> str:
    """The item's part of the batch fingerprint: the single call's, or its raw form if invalid
    (keyed too: it may hold a secret)."""
    if data is not None:
        return fingerprint(spec.name, target, data, key=key)
    try:
        canonical = json.dumps(raw, sort_keys=True, separators=(",", ":"), default=str)
    except (TypeError, ValueError):  # keys of mixed types: still a stable, distinct form
        canonical = repr(raw)
    return "invalid:" + hmac.new(key, canonical.encode(), hashlib.sha256).hexdigest()


def batch_fingerprint(spec: ActionSpec, mode: BulkMode, items: Sequence[str]) -> str:
    """Hash of the whole batch: the action, its mode and every item's fingerprint, in order."""
    canonical = json.dumps(["bulk", spec.name, str(mode), list(items)], separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
