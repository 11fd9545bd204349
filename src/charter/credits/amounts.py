"""Amounts of money or credits: positive integers in an account's minor units, bounded.

An account names its currency and that currency's minor-unit exponent (EUR: 2,
so 12.34 EUR is 1234; prepaid credits: 0). Every amount that reaches the
ledger is checked here first: an ``int`` (never a ``bool``, a float or a
decimal with a fraction), above zero and at most :data:`MAX_AMOUNT`. Anything
else is :class:`~charter.errors.InvalidAmount` (422), before any write.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

from ..errors import ConfigurationError, InvalidAmount

__all__ = ["MAX_AMOUNT", "MAX_EXPONENT", "check_amount", "check_currency", "to_minor"]

#: The largest amount one movement may carry: 10**15 minor units (10 trillion EUR).
#: Far above any real charge, far below a 64-bit balance's overflow.
MAX_AMOUNT = 10**15
#: ISO 4217 currencies have at most 4 decimals (CLF); a credit unit has 0.
MAX_EXPONENT = 6
_CURRENCY = re.compile(r"[A-Z][A-Z0-9]{1,11}", re.ASCII)


def check_amount(amount: Any, *, what: str = "the amount") -> int:
    """``amount`` as a positive ``int`` of minor units, or :class:`InvalidAmount` saying why."""
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise InvalidAmount(
            f"{what} must be a whole number of minor units (an integer such as 1234 for "
            f"12.34 EUR), not {type(amount).__name__}",
            errors=[{"loc": ["amount"], "type": "int_type", "msg": "not an integer"}],
        )
    if amount <= 0:
        raise InvalidAmount(
            f"{what} must be more than zero (a refund or a release is its own movement)",
            errors=[{"loc": ["amount"], "type": "greater_than", "msg": "must be positive"}],
        )
    if amount > MAX_AMOUNT:
        raise InvalidAmount(
            f"{what} is larger than the largest single movement ({MAX_AMOUNT} minor units)",
            errors=[{"loc": ["amount"], "type": "less_than_equal", "msg": "too large"}],
        )
    return amount


def to_minor(value: Decimal | str | int, exponent: int) -> int:
    """A decimal amount in major units (``Decimal("12.34")``) as minor units (1234).

    Refuses (:class:`InvalidAmount`) a value with more decimals than the
    currency has: 12.345 EUR is no amount, and rounding it would invent money.
    """
    if isinstance(value, bool | float):
        raise InvalidAmount("give a decimal amount as a Decimal or a string, not a float")
    try:
        number = Decimal(value)
    except (InvalidOperation, TypeError, ValueError) as exc:
        raise InvalidAmount(f"{value!r} is not a decimal amount") from exc
    if not number.is_finite():
        raise InvalidAmount(f"{value!r} is not a finite amount")
    minor = number.scaleb(exponent)
    if minor != minor.to_integral_value():
        raise InvalidAmount(f"{value} has more than {exponent} decimals")
    return check_amount(int(minor))


def check_currency(currency: Any, exponent: Any) -> tuple[str, int]:
    """A currency code (``EUR``, ``CREDIT``) and its minor-unit exponent (0 to 6)."""
    if not isinstance(currency, str) or not _CURRENCY.fullmatch(currency):
        raise ConfigurationError(
            f"currency {currency!r} must be 2-12 upper-case letters or digits, such as 'EUR'"
        )
    if isinstance(exponent, bool) or not isinstance(exponent, int):
        raise ConfigurationError("the currency's exponent must be an integer")
    if not 0 <= exponent <= MAX_EXPONENT:
        raise ConfigurationError(f"the currency's exponent must be between 0 and {MAX_EXPONENT}")
    return currency, exponent
