"""The webhook channel: verify a partner's callback, then run the mapped action through the gate.

A webhook is one more channel, with no weaker rules: after its signature and
timestamp are verified (:mod:`charter.webhooks`), the event runs an ordinary
action as the *partner actor*, on channel ``webhook``, audited like any call.

Replay protection is the gate's idempotency: the message id (``webhook-id``)
is the idempotency key of the partner actor, claimed in the same transaction
as the effect. The key is ``webhook:<id>`` while that fits a key's 255
characters (an id of up to 247), ``webhook-sha256:<hex SHA-256 of the id>``
for a longer one (:func:`webhook_key`): one key per id, never one key for two.
Every mapped action must declare ``idempotency="required"`` or ``"optional"``;
that is checked when the receiver is built.

Senders retry every delivery that is not answered 2xx, so the answer says
whether sending it again could change anything (Standard Webhooks, "Retries"):

* ``applied`` (200) — the action ran; ``result`` is its response body.
* ``refused`` (200) — the gate refused it for good (denied, not found, invalid
  input, the record's state, a business rule: :attr:`CharterError.permanent
  <charter.errors.CharterError.permanent>`); ``refusal`` carries the stable
  ``code`` and the public ``reason``, never the internal explanation. The
  refusal is audited and stored as the message id's outcome.
* ``duplicate`` (200) — this message id was answered before: its stored
  ``result``, or its ``refusal``. Runs nothing; audited as a replay. Also for N
  concurrent deliveries of one id: one runs, the others are duplicates.
* ``ignored`` (200) — an event type the receiver does not subscribe to.
* 503 ``webhook_retry_later`` or the error's own 5xx/429, with ``Retry-After`` —
  a transient failure (:attr:`CharterError.transient
  <charter.errors.CharterError.transient>`: storage unavailable, a key still in
  progress, a conflict that persisted, a rate limit); a 500 for a crash.
  Nothing was recorded, so the sender's retry is processed.
* 4xx — unauthenticated (bad or missing signature, stale timestamp: checked
  before anything else, even with a fresh id) or malformed (not strict JSON, no
  message id, a field the route needs is missing).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from ..actions import ActionSpec
from ..actor import Actor, Channel
from ..context import ActionContext
from ..errors import CharterError, ConfigurationError, InvalidInput
from ..gate import Charter, Outcome
from ..idempotency import IdempotencyMode
from ..idempotency.keys import MAX_KEY_LENGTH, ReplayedError, fingerprint, fingerprint_key
from ..idempotency.store import (
    claim_statement,
    claim_values,
    completion_params,
    completion_statement,
    idempotency_table,
    stored_error,
)
from ..pipeline.call import entry_for
from ..resources import request_id_or_new
from ..storage import translate_errors
from ..webhooks import VerifiedWebhook, WebhookMalformed, WebhookRetryLater, WebhookVerifier
from . import strictjson

log = logging.getLogger("charter.webhooks")

__all__ = ["WebhookReceiver", "WebhookRefusal", "WebhookResult", "WebhookRoute", "webhook_key"]

_KEY_PREFIX = "webhook:"
_DIGEST_PREFIX = "webhook-sha256:"


def webhook_key(message_id: str) -> str:
    """The idempotency key of a webhook message id: a different key for every different id.

    ``webhook:<id>`` when it fits a key (:data:`~charter.idempotency.keys.MAX_KEY_LENGTH`,
    so an id of up to 247 characters: the keys stored before stay valid); for a longer
    id, ``webhook-sha256:`` and the hex SHA-256 of the whole id. The two forms cannot
    meet (``webhook:`` against ``webhook-``), and a digest, unlike a cut, tells ids
    that share their first characters apart (a cut key made the second a "reused key",
    refused for good, its event lost).
    """
    key = _KEY_PREFIX + message_id
    if len(key) <= MAX_KEY_LENGTH:
        return key
    digest = hashlib.sha256(message_id.encode("utf-8", "surrogatepass")).hexdigest()
    return _DIGEST_PREFIX + digest


def _cut_key(message_id: str) -> str | None:
    """The key an id longer than 247 characters had before :func:`webhook_key` (its first
    247 characters); ``None`` for a shorter one, whose key did not change."""
    key = _KEY_PREFIX + message_id
    return key[:MAX_KEY_LENGTH] if len(key) > MAX_KEY_LENGTH else None


@dataclass(frozen=True, slots=True)
class WebhookRoute:
    """How one event type becomes an action call."""

    action: str
    input: Callable[[Mapping[str, Any]], Mapping[str, Any]]
    target: Callable[[Mapping[str, Any]], Any] | None = None


@dataclass(frozen=True, slots=True)
class WebhookRefusal:
    """Why the gate refused a delivery: the error's stable code and its public message."""

    code: str
    reason: str

    @classmethod
    def of(cls, error: CharterError) -> WebhookRefusal:
        return cls(error.code, error.message)


@dataclass(frozen=True, slots=True)
class WebhookResult:
    """The acknowledgement of one authentic delivery (always answered 200)."""

    status: str  # applied | duplicate | refused | ignored
    event_type: str
    message_id: str | None = None
    outcome: Outcome | None = None
    refusal: WebhookRefusal | None = None  # refused, or a duplicate of a refused delivery

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "type": self.event_type}
        if self.message_id is not None:
            out["id"] = self.message_id
        if self.outcome is not None:
            out["result"] = self.outcome.body
        if self.refusal is not None:
            out["refusal"] = {"code": self.refusal.code, "reason": self.refusal.reason}
        return out


@dataclass(frozen=True, slots=True)
class _Delivery:
    """One verified delivery of a routed event, as the gate call it becomes."""

    event_type: str
    message_id: str
    spec: ActionSpec
    actor: Actor
    input: Mapping[str, Any]
    target: Any
    request_id: str
    key: str

    def context(self, now: Any) -> ActionContext:
        return ActionContext(
            action=self.spec.name,
            actor=self.actor,
            channel=Channel.WEBHOOK,
            now=now,
            request_id=self.request_id,
            idempotency_key=self.key,
        )

    def result(self, status: str, error: CharterError) -> WebhookResult:
        return WebhookResult(
            status, self.event_type, self.message_id, refusal=WebhookRefusal.of(error)
        )


class WebhookReceiver:
    """Verify, de-duplicate and dispatch one partner's webhooks (see the module docstring)."""

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
        self,
        headers: Mapping[str, str],
        body: bytes,
        *,
        request_id: str | None = None,
        on_verified: Callable[[], None] | None = None,
    ) -> WebhookResult:
        """Verify and process one delivery; raise a Charter error only for one to send again.

        A 4xx error: unauthenticated or malformed; a 5xx (or 429): transient, or a
        crash. Every other outcome is a :class:`WebhookResult`. ``on_verified`` is
        called once the signature verified (the HTTP adapters: the sender's
        credential was accepted, so the per-address limit does not count it).
        """
        verified = self.verifier.verify(headers, body)
        if on_verified is not None:
            on_verified()
        payload = _payload(verified)
        kind = self.event_type(payload)
        route = self.routes.get(kind)
        if route is None:
            # Acknowledge events we do not subscribe to, so the sender stops retrying.
            return WebhookResult("ignored", kind, verified.id)
        delivery = self._delivery(kind, route, verified, payload, request_id)
        try:
            data = delivery.spec.validate(dict(delivery.input))
        except InvalidInput as exc:  # refused before the gate's transaction: audit it here
            return self._refused(_stored_under_cut_key(self.charter, delivery, None), exc, None)
        delivery = _stored_under_cut_key(self.charter, delivery, data)
        try:
            outcome = self.charter.execute(
                delivery.actor,
                delivery.spec.name,
                dict(delivery.input),
                target=delivery.target,
                key=delivery.key,
                channel=Channel.WEBHOOK,
                request_id=delivery.request_id,
            )
        except CharterError as exc:
            return self._refused(delivery, exc, data)
        status = "duplicate" if outcome.replayed else "applied"
        return WebhookResult(status, kind, delivery.message_id, outcome=outcome)

    def _delivery(
        self,
        kind: str,
        route: WebhookRoute,
        verified: VerifiedWebhook,
        payload: dict[str, Any],
        request_id: str | None,
    ) -> _Delivery:
        message_id = verified.id or str(payload.get("id") or "")
        if not message_id:
            raise WebhookMalformed("the webhook carries no message id to guard against replay")
        spec = self.charter.spec(route.action)
        try:
            actor = self.partner(payload)
            data = route.input(payload)
            target = route.target(payload) if route.target is not None else None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # The exception's text is Python's ("'int' object is not subscriptable"): logged
            # for the operator, never sent to the sender.
            log.info("webhook %s: malformed %s event: %r", message_id, kind, exc)
            raise WebhookMalformed(
                f"the {kind} event does not have the fields and types this receiver reads"
            ) from exc
        if not isinstance(actor, Actor) or actor.scopes is None:
            # scopes=None is "built in code, not narrowed": never a partner's delivery.
            raise ConfigurationError(
                "the webhook receiver's partner() must return an Actor with a scope set "
                "(the partner's credential: Actor.make(..., scopes={...}))"
            )
        if spec.target == "argument" and target is None:
            raise WebhookMalformed(f"the {kind} event names no record for {spec.name}")
        return _Delivery(
            kind, message_id, spec, actor, data, target, request_id_or_new(request_id),
            webhook_key(message_id),
        )  # fmt: skip

    def _refused(
        self, delivery: _Delivery, error: CharterError, data: BaseModel | None
    ) -> WebhookResult:
        """Answer an error of the gate: a refusal (remembered, audited), or raise it to retry.

        ``data`` is the validated input; ``None`` when the input itself was refused
        (before the gate: not audited yet).
        """
        if isinstance(error, ReplayedError):  # the gate replayed this id's stored refusal
            return delivery.result("duplicate", error)
        if error.transient:
            if error.status >= 500 or error.status == 429:
                raise error
            raise WebhookRetryLater.of(error) from error
        if not error.permanent:
            raise error  # a crash or a broken store: nothing was decided, let the sender retry
        refused_now = _remember(self.charter, delivery, error, data)
        return delivery.result("refused" if refused_now else "duplicate", error)


def _payload(verified: VerifiedWebhook) -> dict[str, Any]:
    try:
        payload = strictjson.loads(verified.body)
    except strictjson.MalformedBody as exc:  # authentic, but not strict JSON: 400
        raise WebhookMalformed(f"the webhook body is malformed: {exc.message}") from exc
    if not isinstance(payload, dict):
        raise WebhookMalformed("the webhook body must be a JSON object")
    return payload


def _remember(
    charter: Charter, delivery: _Delivery, error: CharterError, data: BaseModel | None
) -> bool:
    """Store ``error`` as the outcome of the delivery's key; ``False`` if this is a duplicate.

    The gate stores a handler's refusal under its key, but not a denial, a
    missing record or refused input: for a sender that retries on its own, the
    receiver stores those, so that a redelivery is answered by the gate's replay
    (``duplicate``, audited as a replay) instead of being refused, and audited,
    forever. The fingerprint is the gate's, so the replay recognises the request.
    Refused input (``data=None``, which the gate refuses before its transaction,
    unaudited) gets its audit entry here, in the same transaction. A key already
    taken means another delivery of this id got there first: with the same
    request, this one is its duplicate.
    """
    pipeline = charter.pipeline_of(delivery.spec.name)
    runtime, committer = pipeline.runtime, pipeline.committer
    ctx = delivery.context(charter.clock())
    fp = _fingerprint(delivery, data, fingerprint_key(runtime.audit_trail.keyring))
    values = claim_values(
        tenant=delivery.actor.tenant_id, subject=delivery.actor.subject.id, key=delivery.key,
        fp=fp, action=delivery.spec.name, now=ctx.now, retention=runtime.idempotency_retention,
    )  # fmt: skip
    resource_id = None if delivery.target is None else str(delivery.target)[:128]
    with translate_errors(), committer.transaction() as (session, lease):
        claimed = session.execute(claim_statement(runtime.engine.dialect.name, values))
        refused_now = claimed.scalar_one_or_none() is not None
        if refused_now:
            params = completion_params(
                ctx.idempotency_scope, status=error.status, body=None, error=stored_error(error),
                outcome=error.code, resource_id=resource_id, now=ctx.now,
            )  # fmt: skip
            session.execute(completion_statement(), params)
        else:
            refused_now = _taken_by_another_request(session, ctx.idempotency_scope, fp)
        if data is None:
            entry = entry_for(
                delivery.spec, ctx, None, None, None, error.code, None,
                target=delivery.target, detail={"message": error.message},
            )  # fmt: skip
            entry.replayed = not refused_now
            committer.write(session, lease, [entry], None)
    return refused_now


def _stored_under_cut_key(
    charter: Charter, delivery: _Delivery, data: BaseModel | None
) -> _Delivery:
    """The delivery, keyed by its old, cut key if this very request is stored under it.

    Before :func:`webhook_key`, an id longer than 247 characters was keyed by its
    first 247. A redelivery of such a message, processed before the upgrade and still
    within retention, must replay (``duplicate``), not run again under its new key: if
    the cut key holds a claim with this request's fingerprint, the delivery keeps
    the cut key, so the gate replays that claim. With another fingerprint the claim
    is another message's (the ids only shared their start), and the new key is used.
    One read, only for ids this long.
    """
    cut = _cut_key(delivery.message_id)
    if cut is None:
        return delivery
    runtime = charter.pipeline_of(delivery.spec.name).runtime
    fp = _fingerprint(delivery, data, fingerprint_key(runtime.audit_trail.keyring))
    t = idempotency_table
    tenant, subject = delivery.actor.tenant_id, delivery.actor.subject.id
    with translate_errors(), runtime.engine.connect() as conn:
        stored = conn.execute(
            select(t.c.fingerprint).where(
                t.c.tenant == tenant, t.c.subject == subject, t.c.key == cut
            )
        ).scalar_one_or_none()
    return replace(delivery, key=cut) if stored == fp else delivery


def _fingerprint(delivery: _Delivery, data: BaseModel | None, key: bytes) -> str:
    """The gate's fingerprint of the call (as its replay stage computes it); for input it
    refused, one of the raw input (the gate never replays that: it refuses it first)."""
    spec = delivery.spec
    if data is not None:
        by_field = spec.target not in (None, "argument")
        target = getattr(data, str(spec.target)) if by_field else delivery.target
        return fingerprint(spec.name, target, data, key=key)
    raw = json.dumps(
        [spec.name, None if delivery.target is None else str(delivery.target), delivery.input],
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(raw.encode()).hexdigest()


def _taken_by_another_request(session: Session, scope: tuple[str, str, str], fp: str) -> bool:
    """Whether the key's claim holds another request (a reused id: this one is no duplicate)."""
    t = idempotency_table
    tenant, subject, key = scope
    stored = session.execute(
        select(t.c.fingerprint).where(t.c.tenant == tenant, t.c.subject == subject, t.c.key == key)
    ).scalar_one_or_none()
    return stored is not None and stored != fp
