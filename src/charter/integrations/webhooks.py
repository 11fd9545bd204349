"""The webhook channel: verify a partner's callback, then run the mapped action through the gate.

A webhook is one more channel, with no weaker rules: after its signature and
timestamp are verified (:mod:`charter.webhooks`), the event runs an ordinary
action as the *partner actor*, on channel ``webhook``, audited like any call.

Replay protection is the gate's idempotency: the message id (``webhook-id``)
is the idempotency key of the partner actor, claimed in the same transaction
as the effect. A redelivered or replayed message therefore answers 2xx with
the stored outcome and runs nothing, also for N concurrent deliveries of one
id; a message whose handler failed is not recorded, so the sender's retry is
processed. A stale timestamp is refused before any of this, even with a fresh
id. Every mapped action must declare ``idempotency="required"`` or
``"optional"``; that is checked when the receiver is built.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..actor import Actor, Channel
from ..errors import ConfigurationError
from ..gate import Charter, Outcome
from ..idempotency import IdempotencyMode
from ..webhooks import WebhookMalformed, WebhookVerifier
from . import strictjson

__all__ = ["WebhookReceiver", "WebhookResult", "WebhookRoute"]


@dataclass(frozen=True, slots=True)
class WebhookRoute:
    """How one event type becomes an action call."""

    action: str
    input: Callable[[Mapping[str, Any]], Mapping[str, Any]]
    target: Callable[[Mapping[str, Any]], Any] | None = None


@dataclass(frozen=True, slots=True)
class WebhookResult:
    status: str  # processed | duplicate | ignored
    event_type: str
    outcome: Outcome | None = None

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "type": self.event_type}
        if self.outcome is not None:
            out["result"] = self.outcome.body
        return out


class WebhookReceiver:
    """Verify, de-duplicate and dispatch one partner's webhooks."""

    def __init__(
        self,
        charter: Charter,
        verifier: WebhookVerifier,
        *,
        partner: Callable[[Mapping[str, Any]], Actor],
        routes: Mapping[str, WebhookRoute],
        event_type: Callable[[Mapping[str, Any]], str] = lambda payload: str(payload.get("type")),
    ) -> None:
        for name, route in routes.items():
            spec = charter.spec(route.action)
            if spec.idempotency is IdempotencyMode.NONE:
                raise ConfigurationError(
                    f"webhook event {name!r} maps to {route.action}, which must declare "
                    "idempotency='required' (the message id is its replay guard)"
                )
        self.charter = charter
        self.verifier = verifier
        self.partner = partner
        self.routes = dict(routes)
        self.event_type = event_type

    def handle(
        self, headers: Mapping[str, str], body: bytes, *, request_id: str | None = None
    ) -> WebhookResult:
        """Verify and process one delivery; raises a Charter error for a bad one."""
        verified = self.verifier.verify(headers, body)
        try:
            payload = strictjson.loads(verified.body)
        except strictjson.MalformedBody as exc:  # authentic, but not strict JSON: 400
            raise WebhookMalformed(f"the webhook body is malformed: {exc.message}") from exc
        if not isinstance(payload, dict):
            raise WebhookMalformed("the webhook body must be a JSON object")
        kind = self.event_type(payload)
        route = self.routes.get(kind)
        if route is None:
            # Acknowledge events we do not subscribe to, so the sender stops retrying.
            return WebhookResult("ignored", kind)
        message_id = verified.id or str(payload.get("id") or "")
        if not message_id:
            raise WebhookMalformed("the webhook carries no message id to guard against replay")
        try:
            data = route.input(payload)
            target = route.target(payload) if route.target is not None else None
        except (KeyError, TypeError, ValueError) as exc:
            raise WebhookMalformed(f"the {kind} event lacks a field: {exc}") from exc
        outcome = self.charter.execute(
            self.partner(payload),
            route.action,
            dict(data),
            target=target,
            key=f"webhook:{message_id}"[:255],
            channel=Channel.WEBHOOK,
            request_id=request_id,
        )
        return WebhookResult("duplicate" if outcome.replayed else "processed", kind, outcome)
