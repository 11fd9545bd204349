"""A stub card payment provider: an HTTP service on 127.0.0.1 for tests and the reference service.

It behaves like a real provider where retries matter:

- ``POST /v1/charges`` needs an ``Idempotency-Key`` header. The same key with
  the same body returns the same charge (``Idempotent-Replayed: true``)
  without creating another; the same key with another body is ``422``
  (draft-ietf-httpapi-idempotency-key-header, section 2.7). One lock makes
  concurrent duplicates create exactly one charge.
- ``GET /v1/charges/{id}``; ``GET /v1/stats`` gives ``{"charges_created", "requests"}``
  (``requests`` counts every ``POST /v1/charges`` received).
- ``POST /v1/faults`` ``{"fail_next": n}`` answers the next ``n`` successful
  charge requests with ``503`` *after* the charge is recorded (the provider
  charged but the answer was lost); ``{"delay_ms": d}`` delays every charge
  answer by ``d`` ms, also after recording (a client timeout). ``0`` clears.
- With ``webhook_url`` and ``webhook_secret``, every new charge sends a
  ``payment.settled`` event signed with Standard Webhooks from a background
  thread, once the charge's answer is sent. Like a real provider it retries a
  delivery that is not answered 2xx (a 4xx, a 5xx, no answer), on the schedule
  ``webhook_retry_delays`` (honouring ``Retry-After`` up to its longest delay),
  and stops at the first 2xx. ``POST /v1/webhooks/redeliver`` sends the last
  event again with the *same* ``webhook-id`` (and a fresh timestamp, as
  providers do on retries); with ``{"new_id": true}`` as a new message (a fresh
  id, as a provider's "resend" does).

Use :class:`PaymentProviderStub` as a context manager in tests, talk to it
with :class:`PaymentClient`, or run ``python -m charter.demo.payments --port 8100``
(the webhook secret is read from ``$CHARTER_DEMO_WEBHOOK_SECRET``, never argv).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import re
import secrets
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from charter.errors import ConfigurationError
from charter.webhooks import StandardWebhookSigner

from .loopback import LoopbackServer
from .payment_client import Charge, PaymentClient, PaymentProviderError, PaymentProviderUnavailable

__all__ = [
    "Charge",
    "PaymentClient",
    "PaymentProviderError",
    "PaymentProviderStub",
    "PaymentProviderUnavailable",
    "WebhookDelivery",
    "main",
]

MAX_BODY_BYTES = 16 * 1024
MAX_DELAY_MS = 60_000
#: Seconds between a delivery's attempts (the first attempt is immediate).
WEBHOOK_RETRY_DELAYS = (0.5, 2.0, 5.0, 15.0)
WEBHOOK_SECRET_ENV = "CHARTER_DEMO_WEBHOOK_SECRET"  # noqa: S105 (a variable name)
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    """One attempt to deliver an event: the receiver's status, or the transport error."""

    webhook_id: str
    status_code: int | None
    error: str | None = None
    attempt: int = 1
    retry_after: float | None = None  # the receiver's Retry-After, in seconds

    @property
    def acknowledged(self) -> bool:
        """A 2xx: the receiver has the event, and the sender stops retrying."""
        return self.status_code is not None and 200 <= self.status_code < 300


class _ChargeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    amount: str = Field(pattern=r"^[0-9]{1,12}(\.[0-9]{1,8})?$")
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    reference: str = Field(min_length=1, max_length=200)

    def fingerprint(self) -> tuple[Decimal, str, str]:
        # "10.0" and "10.00" are the same request.
        return Decimal(self.amount), self.currency, self.reference


class _Redeliver(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    new_id: bool = False


class _Faults(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    fail_next: int | None = Field(default=None, ge=0, le=1_000_000)
    delay_ms: int | None = Field(default=None, ge=0, le=MAX_DELAY_MS)


@dataclass(slots=True)
class _Event:
    webhook_id: str
    body: bytes


@dataclass(slots=True)
class _State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    charges: dict[str, dict[str, str]] = field(default_factory=dict)
    by_key: dict[str, tuple[tuple[Decimal, str, str], str]] = field(default_factory=dict)
    requests: int = 0
    fail_next: int = 0
    delay_ms: int = 0
    last_event: _Event | None = None


# --------------------------------------------------------------------------- webhooks


class _WebhookSender:
    """Delivers events in order from one background thread; redelivery is synchronous.

    Each event is retried until a 2xx or the end of ``retry_delays``; every
    attempt is recorded in ``deliveries``.
    """

    def __init__(
        self,
        url: str,
        secret: str,
        *,
        timeout: float = 5.0,
        retry_delays: Sequence[float] = WEBHOOK_RETRY_DELAYS,
    ) -> None:
        if any(d < 0 for d in retry_delays):
            raise ConfigurationError("webhook retry delays cannot be negative")
        self._url = url
        self._signer = StandardWebhookSigner(secret)
        self._timeout = timeout
        self._delays = tuple(retry_delays)
        self._queue: queue.Queue[_Event | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.deliveries: list[WebhookDelivery] = []

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="payment-stub-webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)  # after the pending events: they are still delivered once
            self._stopping.set()  # ... but no longer retried
            self._thread.join(timeout=self._timeout * 2 + 1)
            self._thread = None

    def enqueue(self, event: _Event) -> None:
        self._queue.put(event)

    def deliver(self, event: _Event) -> WebhookDelivery:
        """Deliver ``event`` until it is acknowledged (2xx) or the retries run out."""
        delivery = self._attempt(event, 1)
        for attempt, delay in enumerate(self._delays, start=2):
            if delivery.acknowledged:
                break
            if self._stopping.wait(self._wait(delay, delivery)):
                break
            delivery = self._attempt(event, attempt)
        return delivery

    def _wait(self, delay: float, delivery: WebhookDelivery) -> float:
        # Retry-After (seconds) is honoured, up to the schedule's longest delay.
        if delivery.retry_after is None:
            return delay
        return max(delay, min(delivery.retry_after, max(self._delays)))

    def _attempt(self, event: _Event, attempt: int) -> WebhookDelivery:
        headers = self._signer.sign(event.webhook_id, int(time.time()), event.body)
        headers["content-type"] = "application/json"
        try:
            response = httpx.post(
                self._url, content=event.body, headers=headers, timeout=self._timeout
            )
            retry_after = response.headers.get("retry-after", "")
            delivery = WebhookDelivery(
                event.webhook_id,
                response.status_code,
                attempt=attempt,
                retry_after=float(retry_after) if retry_after.isdigit() else None,
            )
        except httpx.HTTPError as exc:
            delivery = WebhookDelivery(event.webhook_id, None, type(exc).__name__, attempt)
        with self._lock:
            self.deliveries.append(delivery)
        return delivery

    def _run(self) -> None:
        while (event := self._queue.get()) is not None:
            self.deliver(event)


def _settled_event(charge: dict[str, str]) -> _Event:
    body = {
        "type": "payment.settled",
        "timestamp": datetime.now(UTC).isoformat(),
        "data": charge,
    }
    return _Event("msg_" + secrets.token_hex(12), json.dumps(body).encode("utf-8"))


# --------------------------------------------------------------------------- the service


def _problem(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


class _BodyTooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise _BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _create_app(state: _State, sender: _WebhookSender | None, max_body_bytes: int) -> Starlette:
    async def create_charge(request: Request) -> Response:
        with state.lock:
            state.requests += 1
        key = request.headers.get("idempotency-key")
        if key is None or not _IDEMPOTENCY_KEY.fullmatch(key):
            return _problem(400, "idempotency_key_required", "send an Idempotency-Key header")
        try:
            data = _ChargeRequest.model_validate_json(await _read_body(request, max_body_bytes))
        except _BodyTooLarge:
            return _problem(
                413, "payload_too_large", f"bodies are limited to {max_body_bytes} bytes"
            )
        except ValidationError as exc:
            return _problem(400, "invalid_request", exc.errors()[0]["msg"])

        with state.lock:  # no await inside: check, create and count are one step
            stored = state.by_key.get(key)
            if stored is not None and stored[0] != data.fingerprint():
                return _problem(
                    422, "idempotency_key_reused", "this key was used with a different request"
                )
            replayed = stored is not None
            event: _Event | None = None
            if stored is None:
                charge_id = "ch_" + secrets.token_hex(12)
                state.charges[charge_id] = {
                    "id": charge_id,
                    "amount": data.amount,
                    "currency": data.currency,
                    "reference": data.reference,
                    "status": "succeeded",
                }
                state.by_key[key] = (data.fingerprint(), charge_id)
                if sender is not None:
                    event = state.last_event = _settled_event(state.charges[charge_id])
            else:
                charge_id = stored[1]
            charge = dict(state.charges[charge_id])
            fail = state.fail_next > 0
            if fail:
                state.fail_next -= 1
            delay_ms = state.delay_ms

        # The charge is recorded before any fault: the client cannot tell.
        if delay_ms:
            await asyncio.sleep(delay_ms / 1000)
        if fail:
            response = _problem(503, "unavailable", "injected fault: the answer was lost")
        else:
            headers = {"Idempotent-Replayed": "true"} if replayed else {}
            response = JSONResponse(charge, status_code=201, headers=headers)
        if sender is not None and event is not None:
            # Once the answer is sent, as providers do (the event may still overtake it).
            response.background = BackgroundTask(sender.enqueue, event)
        return response

    async def get_charge(request: Request) -> Response:
        with state.lock:
            charge = state.charges.get(request.path_params["charge_id"])
        if charge is None:
            return _problem(404, "not_found", "no such charge")
        return JSONResponse(charge)

    async def stats(request: Request) -> Response:
        with state.lock:
            return JSONResponse({"charges_created": len(state.charges), "requests": state.requests})

    async def faults(request: Request) -> Response:
        try:
            data = _Faults.model_validate_json(await _read_body(request, max_body_bytes))
        except _BodyTooLarge:
            return _problem(
                413, "payload_too_large", f"bodies are limited to {max_body_bytes} bytes"
            )
        except ValidationError as exc:
            return _problem(400, "invalid_request", exc.errors()[0]["msg"])
        with state.lock:
            if data.fail_next is not None:
                state.fail_next = data.fail_next
            if data.delay_ms is not None:
                state.delay_ms = data.delay_ms
            return JSONResponse({"fail_next": state.fail_next, "delay_ms": state.delay_ms})

    async def redeliver(request: Request) -> Response:
        if sender is None:
            return _problem(409, "webhooks_not_configured", "no webhook_url is configured")
        try:
            raw = await _read_body(request, max_body_bytes)
            options = _Redeliver.model_validate_json(raw) if raw else _Redeliver()
        except _BodyTooLarge:
            return _problem(
                413, "payload_too_large", f"bodies are limited to {max_body_bytes} bytes"
            )
        except ValidationError as exc:
            return _problem(400, "invalid_request", exc.errors()[0]["msg"])
        with state.lock:
            event = state.last_event
        if event is None:
            return _problem(404, "not_found", "no event has been sent yet")
        if options.new_id:
            event = _Event("msg_" + secrets.token_hex(12), event.body)
        # In a worker thread: the blocking POSTs (and their retries) do not stall the loop.
        delivery = await run_in_threadpool(sender.deliver, event)
        return JSONResponse(
            {
                "webhook_id": delivery.webhook_id,
                "status_code": delivery.status_code,
                "attempts": delivery.attempt,
            }
        )

    return Starlette(
        routes=[
            Route("/v1/charges", create_charge, methods=["POST"]),
            Route("/v1/charges/{charge_id}", get_charge, methods=["GET"]),
            Route("/v1/stats", stats, methods=["GET"]),
            Route("/v1/faults", faults, methods=["POST"]),
            Route("/v1/webhooks/redeliver", redeliver, methods=["POST"]),
        ]
    )


class PaymentProviderStub(LoopbackServer):
    """The stub provider, served by uvicorn on 127.0.0.1 from a background thread.

    ::

        with PaymentProviderStub() as stub:      # starts on a free port
            client = PaymentClient(stub.base_url)
    """

    def __init__(
        self,
        *,
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
        webhook_retry_delays: Sequence[float] = WEBHOOK_RETRY_DELAYS,
        max_body_bytes: int = MAX_BODY_BYTES,
        startup_timeout: float = 10.0,
    ) -> None:
        if (webhook_url is None) != (webhook_secret is None):
            raise ConfigurationError("webhook_url and webhook_secret go together")
        self._state = _State()
        self._sender = (
            _WebhookSender(webhook_url, webhook_secret, retry_delays=webhook_retry_delays)
            if webhook_url is not None and webhook_secret is not None
            else None
        )
        super().__init__(
            _create_app(self._state, self._sender, max_body_bytes),
            name="payment provider stub",
            startup_timeout=startup_timeout,
        )

    def __repr__(self) -> str:
        return f"PaymentProviderStub(base_url={self.base_url!r})"

    def start(self, port: int = 0) -> str:
        """Serve on ``127.0.0.1:port`` (``0``: a free port); return the base URL once it answers."""
        if self._sender is None or self.running:
            return super().start(port)  # (running: refused, the sender left alone)
        self._sender.start()
        try:
            return super().start(port)
        except BaseException:
            if self._sender is not None:
                self._sender.stop()
            raise

    def stop(self) -> None:
        """Stop serving, deliver pending webhooks, release the port. Safe to call twice."""
        super().stop()
        if self._sender is not None:
            self._sender.stop()

    def serve_forever(self, port: int) -> None:
        """Serve until SIGINT/SIGTERM, then stop cleanly (the ``python -m`` entry point).

        Must run in the main thread (signal handlers can only be set there).
        """
        received: list[int] = []
        previous = {
            sig: signal.signal(sig, lambda signum, _frame: received.append(signum))
            for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            print(f"payment provider stub on {self.start(port)}", flush=True)
            while not received:
                time.sleep(0.1)  # a flag polled, not a wait a signal could race
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # In-process views and controls, for tests (the HTTP endpoints do the same).

    def stats(self) -> dict[str, int]:
        with self._state.lock:
            return {"charges_created": len(self._state.charges), "requests": self._state.requests}

    def inject_faults(self, *, fail_next: int | None = None, delay_ms: int | None = None) -> None:
        faults = _Faults(fail_next=fail_next, delay_ms=delay_ms)
        with self._state.lock:
            if faults.fail_next is not None:
                self._state.fail_next = faults.fail_next
            if faults.delay_ms is not None:
                self._state.delay_ms = faults.delay_ms

    @property
    def webhook_deliveries(self) -> list[WebhookDelivery]:
        return [] if self._sender is None else list(self._sender.deliveries)


# --------------------------------------------------------------------------- the client


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m charter.demo.payments --port 8100 [--webhook-url URL]``."""
    parser = argparse.ArgumentParser(
        prog="python -m charter.demo.payments",
        description="Stub card payment provider on 127.0.0.1 (tests and the reference service).",
    )
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument(
        "--webhook-url",
        help=f"where to POST payment.settled events (secret from ${WEBHOOK_SECRET_ENV})",
    )
    args = parser.parse_args(argv)
    secret = os.environ.get(WEBHOOK_SECRET_ENV) if args.webhook_url else None
    if args.webhook_url and not secret:
        parser.error(f"--webhook-url needs ${WEBHOOK_SECRET_ENV}")
    PaymentProviderStub(webhook_url=args.webhook_url, webhook_secret=secret).serve_forever(
        args.port
    )


if __name__ == "__main__":
    main()
