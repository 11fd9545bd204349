"""Amounts of money or credits: positive integers in an account's minor units, bounded.

An account names its currency and that currency's minor-unit exponent (EUR: 2,
so 12.34 EUR is 1234; prepaid credits: 0). Every amount that reaches the
ledger is checked here first: an ``int`` (never a ``bool``, a float or a
decimal with a fraction), above zero and at most :data:`MAX_AMOUNT`. Anything
else is :class:`~charter.errors.InvalidAmount` (422), before any write.
"""

from __future__ import annotations

import re
from decimal import Context, Decimal, Inexact, InvalidOperation
from typing import Any

from ..errors import ConfigurationError, InvalidAmount

__all__ = ["MAX_AMOUNT", "MAX_EXPONENT", "check_amount", "check_currency", "to_minor"]

#: The largest amount one movement may carry: 10**15 minor units (10 trillion EUR).
#: Far above any real charge, far below a 64-bit balance's overflow.
MAX_AMOUNT = 10**15
#: ISO 4217 currencies have at most 4 decimals (CLF); a credit unit has 0.
MAX_EXPONENT = 6
#: Digits of the largest amount: a decimal whose leading digit, in minor units, lies
#: beyond them is refused before it is scaled (``1e1000000`` costs no time).
_DIGITS = len(str(MAX_AMOUNT))
#: Scaling within the bound is exact: a digit it would round away is a fraction.
_EXACT = Context(prec=_DIGITS, traps=[Inexact, InvalidOperation])
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
        raise _not_positive(what)
    if amount > MAX_AMOUNT:
        raise _too_large(what)
    return amount


def _not_positive(what: str) -> InvalidAmount:
    return InvalidAmount(
        f"{what} must be more than zero (a refund or a release is its own movement)",
        errors=[{"loc": ["amount"], "type": "greater_than", "msg": "must be positive"}],
    )


def _too_large(what: str) -> InvalidAmount:
    return InvalidAmount(
        f"{what} is larger than the largest single movement ({MAX_AMOUNT} minor units)",
        errors=[{"loc": ["amount"], "type": "less_than_equal", "msg": "too large"}],
    )


def to_minor(value: Decimal | str | int, exponent: int) -> int:
    """A decimal amount in major units (``Decimal("12.34")``) as minor units (1234).

    Refuses (:class:`InvalidAmount`) a value with more decimals than the
    currency has: 12.345 EUR is no amount, and rounding it would invent money.
    Its magnitude is checked before any arithmetic, so an absurd exponent
    (``"1e1000000"``) is refused at once.
    """
    number = _decimal(value)
    if number <= 0:
        raise _not_positive("the amount")
    leading = number.adjusted() + exponent  # the power of ten of its first digit, in minor units
    if leading >= _DIGITS:
        raise _too_large("the amount")
    try:
        if leading < 0:  # less than one minor unit
            raise Inexact
        minor = number.scaleb(exponent, context=_EXACT).to_integral_exact(context=_EXACT)
    except Inexact:
        raise InvalidAmount(f"{_shown(value)} has more than {exponent} decimals") from None
    return check_amount(int(minor))


def _decimal(value: Any) -> Decimal:
    if isinstance(value, bool | float):
        raise InvalidAmount("give a decimal amount as a Decimal or a string, not a float")
    try:
        number = Decimal(value)
    except (InvalidOperation, TypeError, ValueError) as exc:
        raise InvalidAmount(f"{_shown(value)} is not a decimal amount") from exc
    if not number.is_finite():
        raise InvalidAmount(f"{_shown(value)} is not a finite amount")
    return number


def _shown(value: Any) -> str:
    """``value`` for a message, at most 40 characters (it may be a client's megabyte)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


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
