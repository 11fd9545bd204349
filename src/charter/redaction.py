"""Which names and values are secrets: never written in clear to an audit entry or a log.

One rule for the whole library. A field or column whose *name* looks secret
(``password``, ``token``, ``api_key``, ``card_number``, ``pin``...) and a value
typed :class:`pydantic.SecretStr` or :class:`pydantic.SecretBytes` are secrets:
the input digest hashes them redacted (:mod:`charter.audit.entry`), and a
policy explanation names the operand but not its value
(``R.pin *** == C.input.pin *** is false``, :mod:`charter.policy.expr`).
"""

from __future__ import annotations

import re
from typing import Any, Final

from pydantic import SecretBytes, SecretStr

__all__ = ["MASK", "SECRET_NAME", "is_secret_name", "is_secret_value"]

#: A name that looks like it holds a secret (searched anywhere in the name, any case).
SECRET_NAME: Final = re.compile(
    r"(pass(word|phrase)?|secret|token|api[_-]?key|private[_-]?key|card[_-]?number|cvc|cvv|pin|"
    r"authorization|credential)",
    re.IGNORECASE,
)
#: What an explanation shows instead of a secret's value.
MASK: Final = "***"


def is_secret_name(name: str) -> bool:
    """True when a field, column or attribute called ``name`` holds a secret."""
    return bool(SECRET_NAME.search(name))


def is_secret_value(value: Any) -> bool:
    """True for a value pydantic keeps secret (``SecretStr``, ``SecretBytes``)."""
    return isinstance(value, SecretStr | SecretBytes)
