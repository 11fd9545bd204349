"""A small typed client for the payment provider (the stub, or a real one with its API)."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from types import TracebackType
from typing import Any, Self

import httpx

from charter.errors import CharterError, NotFound

__all__ = ["Charge", "PaymentClient", "PaymentProviderError", "PaymentProviderUnavailable"]


# --------------------------------------------------------------------------- errors


class PaymentProviderError(CharterError):
    """The payment provider answered something unexpected (a 4xx, a malformed body)."""

    code = "payment_provider_error"
    status = 502
    title = "Payment provider error"


class PaymentProviderUnavailable(PaymentProviderError):
    """The provider did not answer usefully (5xx, timeout, connection); retry with the same key.

    The charge may have been made: only a retry with the same idempotency key is safe.
    """

    code = "payment_provider_unavailable"
    status = 503
    title = "Payment provider unavailable"
    retryable = True

    def __init__(self, message: str | None = None, *, retry_after: int = 1, **attrs: Any) -> None:
        super().__init__(message, **attrs)
        self.headers["Retry-After"] = str(retry_after)


@dataclass(frozen=True, slots=True)
class Charge:
    """A charge as the provider reports it; ``replayed`` if it was answered from a stored key."""

    id: str
    amount: Decimal
    currency: str
    reference: str
    status: str
    replayed: bool = False


class PaymentClient:
    """A small typed client for the provider; transport problems become :class:`CharterError`.

    5xx answers, timeouts and connection errors raise
    :class:`PaymentProviderUnavailable` (retry with the *same* idempotency key);
    other unexpected answers raise :class:`PaymentProviderError`.
    """

    def __init__(
        self, base_url: str, *, timeout: float = 5.0, transport: httpx.BaseTransport | None = None
    ) -> None:
        self._http = httpx.Client(base_url=base_url, timeout=timeout, transport=transport)

    def __repr__(self) -> str:
        return f"PaymentClient(base_url={str(self._http.base_url)!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def charge(
        self, amount: Decimal | str, currency: str, reference: str, idempotency_key: str
    ) -> Charge:
        """Create (or, with a key already used, replay) a charge."""
        body = {
            "amount": format(amount, "f") if isinstance(amount, Decimal) else amount,
            "currency": currency,
            "reference": reference,
        }
        response = self._send(
            "POST", "/v1/charges", json=body, headers={"Idempotency-Key": idempotency_key}
        )
        return self._charge(response)

    def get_charge(self, charge_id: str) -> Charge:
        """The charge with this id; :class:`~charter.errors.NotFound` if there is none."""
        response = self._send("GET", f"/v1/charges/{charge_id}")
        return self._charge(response)

    def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, url, **kwargs)
        except httpx.TimeoutException as exc:
            raise PaymentProviderUnavailable("the payment provider timed out") from exc
        except httpx.HTTPError as exc:
            raise PaymentProviderUnavailable("the payment provider cannot be reached") from exc
        if response.status_code >= 500:
            raise PaymentProviderUnavailable(
                "the payment provider failed", provider_status=response.status_code
            )
        if response.status_code == 404 and method == "GET":
            raise NotFound("no such charge at the payment provider")
        if response.status_code >= 400:
            raise PaymentProviderError(
                "the payment provider refused the request",
                provider_status=response.status_code,
                provider_code=_error_code(response),
            )
        return response

    @staticmethod
    def _charge(response: httpx.Response) -> Charge:
        try:
            data = response.json()
            return Charge(
                id=str(data["id"]),
                amount=Decimal(str(data["amount"])),
                currency=str(data["currency"]),
                reference=str(data["reference"]),
                status=str(data["status"]),
                replayed=response.headers.get("idempotent-replayed") == "true",
            )
        except (ValueError, KeyError, TypeError, InvalidOperation) as exc:
            raise PaymentProviderError("the payment provider sent a malformed charge") from exc


def _error_code(response: httpx.Response) -> str | None:
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
    return code if isinstance(code, str) else None


# --------------------------------------------------------------------------- entry point
