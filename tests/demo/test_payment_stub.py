"""The stub payment provider behaves like a real one where retries matter."""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from charter.demo.payments import (
    Charge,
    PaymentClient,
    PaymentProviderError,
    PaymentProviderStub,
    PaymentProviderUnavailable,
)
from charter.errors import ConfigurationError, NotFound
from charter.webhooks import StandardWebhookVerifier, WebhookReplayed, claim_once, generate_secret


@pytest.fixture
def stub() -> Iterator[PaymentProviderStub]:
    with PaymentProviderStub() as running:
        yield running


@pytest.fixture
def client(stub: PaymentProviderStub) -> Iterator[PaymentClient]:
    assert stub.base_url is not None
    with PaymentClient(stub.base_url, timeout=5) as c:
        yield c


class Receiver:
    """A tiny webhook receiver: queues (headers, body) of every POST and answers 200."""

    def __init__(self) -> None:
        self.received: queue.Queue[tuple[dict[str, str], bytes]] = queue.Queue()
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.put(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def next(self) -> tuple[dict[str, str], bytes]:
        return self.received.get(timeout=10)


def test_it_listens_on_loopback_only(stub: PaymentProviderStub) -> None:
    assert stub.base_url is not None
    assert stub.base_url.startswith("http://127.0.0.1:")


def test_a_charge_succeeds(client: PaymentClient, stub: PaymentProviderStub) -> None:
    charge = client.charge(Decimal("12.50"), "EUR", "inv-1", "key-1")
    assert (charge.amount, charge.currency, charge.reference, charge.status) == (
        Decimal("12.50"),
        "EUR",
        "inv-1",
        "succeeded",
    )
    assert not charge.replayed
    assert client.get_charge(charge.id) == charge
    assert stub.stats() == {"charges_created": 1, "requests": 1}


def test_the_same_key_and_body_replays_the_same_charge(
    client: PaymentClient, stub: PaymentProviderStub
) -> None:
    first = client.charge("10.00", "EUR", "inv-1", "key-1")
    second = client.charge("10.0", "EUR", "inv-1", "key-1")
    assert second.id == first.id
    assert second.replayed
    assert stub.stats() == {"charges_created": 1, "requests": 2}


def test_the_same_key_with_another_body_is_422(
    client: PaymentClient, stub: PaymentProviderStub
) -> None:
    client.charge("10.00", "EUR", "inv-1", "key-1")
    with pytest.raises(PaymentProviderError) as info:
        client.charge("11.00", "EUR", "inv-1", "key-1")
    assert (info.value.attrs["provider_status"], info.value.attrs["provider_code"]) == (
        422,
        "idempotency_key_reused",
    )
    assert not isinstance(info.value, PaymentProviderUnavailable)
    assert stub.stats()["charges_created"] == 1


def test_the_http_api_speaks_for_itself(stub: PaymentProviderStub) -> None:
    body = {"amount": "5.00", "currency": "USD", "reference": "r"}
    with httpx.Client(base_url=stub.base_url or "") as http:
        created = http.post("/v1/charges", json=body, headers={"Idempotency-Key": "k"})
        replayed = http.post("/v1/charges", json=body, headers={"Idempotency-Key": "k"})
        assert (created.status_code, replayed.status_code) == (201, 201)
        assert "idempotent-replayed" not in created.headers
        assert replayed.headers["idempotent-replayed"] == "true"
        assert replayed.json() == created.json()
        assert http.get(f"/v1/charges/{created.json()['id']}").json() == created.json()
        assert http.get("/v1/charges/ch_nope").status_code == 404
        assert http.get("/v1/stats").json() == {"charges_created": 1, "requests": 2}


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        ({"amount": "5.00", "currency": "USD", "reference": "r"}, {}, 400),
        ({"amount": "5.00", "currency": "USD", "reference": "r"}, {"Idempotency-Key": ""}, 400),
        ({"amount": "-5", "currency": "USD", "reference": "r"}, {"Idempotency-Key": "k"}, 400),
        ({"amount": 5, "currency": "USD", "reference": "r"}, {"Idempotency-Key": "k"}, 400),
        ({"amount": "5", "currency": "usd", "reference": "r"}, {"Idempotency-Key": "k"}, 400),
        (
            {"amount": "5", "currency": "USD", "reference": "r", "extra": 1},
            {"Idempotency-Key": "k"},
            400,
        ),
        (
            {"amount": "5", "currency": "USD", "reference": "x" * 20_000},
            {"Idempotency-Key": "k"},
            413,
        ),
    ],
)
def test_bad_requests_are_refused_without_a_charge(
    stub: PaymentProviderStub, body: object, headers: dict[str, str], status: int
) -> None:
    response = httpx.post(f"{stub.base_url}/v1/charges", json=body, headers=headers)
    assert response.status_code == status
    assert stub.stats()["charges_created"] == 0


def test_twenty_concurrent_duplicates_create_exactly_one_charge(
    stub: PaymentProviderStub,
) -> None:
    workers = 20
    barrier = threading.Barrier(workers)
    results: list[Charge] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def pay() -> None:
        assert stub.base_url is not None
        with PaymentClient(stub.base_url, timeout=10) as c:
            barrier.wait()
            try:
                charge = c.charge("99.99", "EUR", "inv-race", "race-key")
            except BaseException as exc:
                with lock:
                    errors.append(exc)
                return
            with lock:
                results.append(charge)

    threads = [threading.Thread(target=pay) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len({c.id for c in results}) == 1
    assert sum(not c.replayed for c in results) == 1
    assert stub.stats() == {"charges_created": 1, "requests": workers}


def test_fail_next_loses_the_answer_after_charging(
    client: PaymentClient, stub: PaymentProviderStub
) -> None:
    httpx.post(f"{stub.base_url}/v1/faults", json={"fail_next": 1}).raise_for_status()
    with pytest.raises(PaymentProviderUnavailable) as info:
        client.charge("10.00", "EUR", "inv-1", "key-1")
    assert (info.value.status, info.value.code, info.value.retryable) == (
        503,
        "payment_provider_unavailable",
        True,
    )
    assert stub.stats()["charges_created"] == 1  # charged, although the client saw a 503
    retried = client.charge("10.00", "EUR", "inv-1", "key-1")
    assert retried.replayed
    assert stub.stats() == {"charges_created": 1, "requests": 2}


def test_fail_next_counts_down(client: PaymentClient, stub: PaymentProviderStub) -> None:
    stub.inject_faults(fail_next=2)
    for _ in range(2):
        with pytest.raises(PaymentProviderUnavailable):
            client.charge("1", "EUR", "r", "k")
    assert client.charge("1", "EUR", "r", "k").replayed


def test_a_delay_beyond_the_client_timeout_is_unavailable_but_charged(
    stub: PaymentProviderStub,
) -> None:
    response = httpx.post(f"{stub.base_url}/v1/faults", json={"delay_ms": 400})
    assert response.json() == {"fail_next": 0, "delay_ms": 400}
    assert stub.base_url is not None
    with (
        PaymentClient(stub.base_url, timeout=0.05) as impatient,
        pytest.raises(PaymentProviderUnavailable),
    ):
        impatient.charge("10.00", "EUR", "inv-1", "key-1")
    assert stub.stats()["charges_created"] == 1
    stub.inject_faults(delay_ms=0)
    with PaymentClient(stub.base_url) as c:
        assert c.charge("10.00", "EUR", "inv-1", "key-1").replayed


@pytest.mark.parametrize("faults", [{"fail_next": -1}, {"delay_ms": 10**9}, {"other": 1}])
def test_bad_fault_requests_are_refused(stub: PaymentProviderStub, faults: object) -> None:
    assert httpx.post(f"{stub.base_url}/v1/faults", json=faults).status_code == 400


def test_an_unreachable_provider_is_unavailable() -> None:
    with PaymentProviderStub() as stopped:
        url = stopped.base_url
    assert url is not None
    with PaymentClient(url, timeout=1) as c, pytest.raises(PaymentProviderUnavailable):
        c.charge("1", "EUR", "r", "k")


def test_an_unknown_charge_is_not_found(client: PaymentClient) -> None:
    with pytest.raises(NotFound):
        client.get_charge("ch_missing")


def test_webhook_settings_go_together() -> None:
    with pytest.raises(ConfigurationError):
        PaymentProviderStub(webhook_url="http://127.0.0.1:1/")


class MemoryReplayStore:
    def __init__(self) -> None:
        self.seen: set[tuple[str, str]] = set()

    def claim(self, scope: str, webhook_id: str, **_: object) -> bool:
        if (scope, webhook_id) in self.seen:
            return False
        self.seen.add((scope, webhook_id))
        return True


def test_a_settled_webhook_is_signed_and_redelivered_with_the_same_id() -> None:
    secret = generate_secret()
    verifier = StandardWebhookVerifier(secret, tolerance=timedelta(minutes=5))
    store = MemoryReplayStore()
    with (
        Receiver() as receiver,
        PaymentProviderStub(webhook_url=receiver.url, webhook_secret=secret) as stub,
    ):
        assert stub.base_url is not None
        with PaymentClient(stub.base_url) as c:
            charge = c.charge("42.00", "EUR", "inv-9", "key-9")
            c.charge("42.00", "EUR", "inv-9", "key-9")  # a replay sends no second event

        headers, body = receiver.next()
        webhook = verifier.verify(headers, body)
        event = json.loads(webhook.body)
        assert (event["type"], event["data"]["id"], event["data"]["amount"]) == (
            "payment.settled",
            charge.id,
            "42.00",
        )
        claim_once(store, webhook, scope="stub")

        answer = httpx.post(f"{stub.base_url}/v1/webhooks/redeliver")
        assert answer.json() == {"webhook_id": webhook.id, "status_code": 200, "attempts": 1}
        again_headers, again_body = receiver.next()
        again = verifier.verify(again_headers, again_body)
        assert (again.id, again.body) == (webhook.id, webhook.body)
        with pytest.raises(WebhookReplayed):
            claim_once(store, again, scope="stub")
        assert receiver.received.empty()
        assert [d.status_code for d in stub.webhook_deliveries] == [200, 200]


def test_redelivery_needs_a_configured_webhook_and_an_event(stub: PaymentProviderStub) -> None:
    assert httpx.post(f"{stub.base_url}/v1/webhooks/redeliver").status_code == 409
    with PaymentProviderStub(
        webhook_url="http://127.0.0.1:9/", webhook_secret=generate_secret()
    ) as hooked:
        assert httpx.post(f"{hooked.base_url}/v1/webhooks/redeliver").status_code == 404


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_it_runs_as_a_module() -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "CHARTER_DEMO_WEBHOOK_SECRET"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "charter.demo.payments", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                stats = httpx.get(f"http://127.0.0.1:{port}/v1/stats", timeout=1).json()
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        assert stats == {"charges_created": 0, "requests": 0}
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0, stderr.decode(errors="replace")
    assert b"Traceback" not in stderr


class ScriptedReceiver(Receiver):
    """A receiver that answers the scripted statuses (and headers) in turn, then 200."""

    def __init__(self, *answers: tuple[int, dict[str, str]]) -> None:
        super().__init__()
        script = list(answers)
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.put(({k.lower(): v for k, v in self.headers.items()}, body))
                status, headers = script.pop(0) if script else (200, {})
                self.send_response(status)
                for name, value in {**headers, "Content-Length": "0"}.items():
                    self.send_header(name, value)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server.server_close()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)


def test_a_delivery_is_retried_until_a_2xx_then_never_again() -> None:
    with (
        ScriptedReceiver((503, {}), (409, {})) as receiver,
        PaymentProviderStub(
            webhook_url=receiver.url,
            webhook_secret=generate_secret(),
            webhook_retry_delays=(0.01, 0.01, 0.01, 0.01),
        ) as stub,
    ):
        assert stub.base_url is not None
        with PaymentClient(stub.base_url) as c:
            c.charge("1.00", "EUR", "inv-1", "key-1")
        ids = {receiver.next()[0]["webhook-id"] for _ in range(3)}
        time.sleep(0.1)  # longer than the rest of the schedule
        assert receiver.received.empty()
    assert 1 == len(ids)  # one message, delivered three times under its id
    assert [(503, 1), (409, 2), (200, 3)] == [
        (d.status_code, d.attempt) for d in stub.webhook_deliveries
    ]


def test_retry_after_is_honoured_up_to_the_longest_delay_of_the_schedule() -> None:
    with (
        ScriptedReceiver((503, {"Retry-After": "120"})) as receiver,
        PaymentProviderStub(
            webhook_url=receiver.url,
            webhook_secret=generate_secret(),
            webhook_retry_delays=(0.01, 0.3),
        ) as stub,
    ):
        assert stub.base_url is not None
        with PaymentClient(stub.base_url) as c:
            c.charge("1.00", "EUR", "inv-1", "key-1")
        receiver.next()
        started = time.monotonic()
        receiver.next()
        waited = time.monotonic() - started
    assert 0.25 <= waited < 5  # 0.3 s (the cap), neither 0.01 s nor 120 s
    assert [(503, 120.0), (200, None)] == [
        (d.status_code, d.retry_after) for d in stub.webhook_deliveries
    ]


def test_a_resend_is_a_new_message_with_the_same_event() -> None:
    with (
        Receiver() as receiver,
        PaymentProviderStub(webhook_url=receiver.url, webhook_secret=generate_secret()) as stub,
    ):
        assert stub.base_url is not None
        with PaymentClient(stub.base_url) as c:
            c.charge("1.00", "EUR", "inv-1", "key-1")
        first_headers, first_body = receiver.next()
        answer = httpx.post(f"{stub.base_url}/v1/webhooks/redeliver", json={"new_id": True})
        headers, body = receiver.next()
        assert (200, 1) == (answer.json()["status_code"], answer.json()["attempts"])
        assert (first_body, answer.json()["webhook_id"]) == (body, headers["webhook-id"])
        assert headers["webhook-id"] != first_headers["webhook-id"]
        bad = httpx.post(f"{stub.base_url}/v1/webhooks/redeliver", json={"new_id": "yes"})
        assert 400 == bad.status_code
