"""A stub reminder sender: an outside service on 127.0.0.1 that sends invoice reminders.

The reference service's ``invoice.remind`` costs credits and goes through it,
so the credits are *held* while the message is out (:mod:`charter.credits.holds`):

- ``POST /v1/messages`` ``{"to": ..., "text": ...}`` needs an ``Idempotency-Key``
  header; the same key returns the same message (``Idempotent-Replayed: true``)
  without sending another. Answers ``201 {"id": ...}``.
- ``POST /v1/faults`` ``{"fail_next": n}`` refuses the next ``n`` messages with
  ``503`` *without* sending them (the sender is down: the hold is released).
- ``GET /v1/stats`` gives ``{"sent", "requests"}``.

Use :class:`ReminderSenderStub` as a context manager and talk to it with
:class:`SenderClient`, or run ``python -m charter.demo.sender --port 8101``.
"""

from __future__ import annotations

import argparse
import re
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from charter.errors import CharterError, DomainError

from .loopback import LoopbackServer

__all__ = ["ReminderSenderStub", "SenderClient", "SenderFailed", "SenderNotConfigured", "main"]

MAX_BODY_BYTES = 16 * 1024
_KEY = re.compile(r"[\x21-\x7e]{1,255}")


class SenderFailed(CharterError):
    """The reminder sender did not take the message (down, refused, unreachable)."""

    code = "sender_failed"
    status = 502
    title = "The reminder sender failed"


class SenderNotConfigured(DomainError):
    """The service runs without a reminder sender: nothing was held, charged or sent."""

    code = "sender_not_configured"
    title = "No reminder sender is configured"


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: str = Field(min_length=1, max_length=200)
    text: str = Field(min_length=1, max_length=2000)


class _Faults(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fail_next: int = Field(ge=0, le=1000)


@dataclass
class _State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    messages: dict[str, str] = field(default_factory=dict)  # idempotency key -> message id
    requests: int = 0
    fail_next: int = 0


def _create_app(state: _State) -> Starlette:
    async def send(request: Request) -> Response:
        body = await request.body()
        key = request.headers.get("idempotency-key", "")
        with state.lock:
            state.requests += 1
        if len(body) > MAX_BODY_BYTES or not _KEY.fullmatch(key):
            return JSONResponse({"code": "bad_request"}, status_code=400)
        try:
            _Message.model_validate_json(body)
        except ValidationError:
            return JSONResponse({"code": "invalid_message"}, status_code=422)
        with state.lock:
            if key in state.messages:
                return JSONResponse(
                    {"id": state.messages[key]}, status_code=201,
                    headers={"Idempotent-Replayed": "true"},
                )  # fmt: skip
            if state.fail_next:
                state.fail_next -= 1
                return JSONResponse({"code": "unavailable"}, status_code=503)
            message = state.messages[key] = f"msg_{secrets.token_hex(8)}"
        return JSONResponse({"id": message}, status_code=201)

    async def faults(request: Request) -> Response:
        try:
            wanted = _Faults.model_validate_json(await request.body())
        except ValidationError:
            return JSONResponse({"code": "invalid_faults"}, status_code=422)
        with state.lock:
            state.fail_next = wanted.fail_next
        return JSONResponse({"fail_next": wanted.fail_next})

    async def stats(request: Request) -> Response:
        with state.lock:
            return JSONResponse({"sent": len(state.messages), "requests": state.requests})

    return Starlette(
        routes=[
            Route("/v1/messages", send, methods=["POST"]),
            Route("/v1/faults", faults, methods=["POST"]),
            Route("/v1/stats", stats, methods=["GET"]),
        ]
    )


class ReminderSenderStub(LoopbackServer):
    """The stub sender, served by uvicorn on 127.0.0.1 from a background thread."""

    def __init__(self, *, startup_timeout: float = 10.0) -> None:
        self._state = _State()
        super().__init__(
            _create_app(self._state), name="reminder sender stub", startup_timeout=startup_timeout
        )

    def stats(self) -> dict[str, int]:
        with self._state.lock:
            return {"sent": len(self._state.messages), "requests": self._state.requests}

    def inject_faults(self, *, fail_next: int) -> None:
        with self._state.lock:
            self._state.fail_next = _Faults(fail_next=fail_next).fail_next


class SenderClient:
    """A small client for the sender; any failure to send is :class:`SenderFailed`."""

    def __init__(self, base_url: str, *, timeout: float = 5.0) -> None:
        self._http = httpx.Client(base_url=base_url, timeout=timeout)

    def send(self, to: str, text: str, *, idempotency_key: str) -> str:
        """Send one message (deduplicated by ``idempotency_key``); its id."""
        try:
            response = self._http.post(
                "/v1/messages", json={"to": to, "text": text},
                headers={"Idempotency-Key": idempotency_key},
            )  # fmt: skip
        except httpx.HTTPError as exc:
            raise SenderFailed("the reminder sender could not be reached") from exc
        if response.status_code != 201:
            raise SenderFailed(f"the reminder sender answered {response.status_code}")
        try:
            return str(response.json()["id"])
        except (ValueError, KeyError, TypeError) as exc:
            raise SenderFailed("the reminder sender answered a malformed body") from exc

    def close(self) -> None:
        self._http.close()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m charter.demo.sender --port 8101``."""
    parser = argparse.ArgumentParser(
        prog="python -m charter.demo.sender", description="Stub reminder sender on 127.0.0.1."
    )
    parser.add_argument("--port", type=int, default=8101)
    args = parser.parse_args(argv)
    stub = ReminderSenderStub()
    print(f"reminder sender stub on {stub.start(args.port)}", flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        stub.stop()


if __name__ == "__main__":
    main()
