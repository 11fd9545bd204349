"""Strict JSON for request bodies: what ``json.loads`` accepts silently, refused with a 400.

``json.loads`` keeps the *last* of two equal keys (``{"amount": 1, "amount": 900}`` is
900: a signature or a review of the first one is bypassed), accepts ``NaN`` and
``Infinity`` (not JSON, RFC 8259 §6), turns a 5,000-digit number into a
``ValueError`` and a deeply nested body into a ``RecursionError`` — both 500s if
nothing catches them. The standard library's hooks handle all of it, so no other
parser is needed: ``object_pairs_hook`` sees every key, ``parse_int``/``parse_float``
see every number's text, ``parse_constant`` every non-standard constant.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import InvalidInput

__all__ = ["MAX_DEPTH", "MAX_NUMBER_DIGITS", "MalformedBody", "loads"]

#: Deepest nesting of objects and arrays a body may have.
MAX_DEPTH = 32
#: Longest number, in characters (a money amount needs about 20).
MAX_NUMBER_DIGITS = 50


class MalformedBody(InvalidInput):
    code = "malformed_body"
    status = 400
    title = "Malformed request body"


def loads(raw: bytes | str) -> Any:
    """Parse ``raw`` as strict JSON, or raise :class:`MalformedBody` saying what is wrong."""
    try:
        value = json.loads(
            raw,
            object_pairs_hook=_unique_keys,
            parse_int=_number(int),
            parse_float=_number(float),
            parse_constant=_no_constant,
        )
    except RecursionError as exc:
        raise MalformedBody(f"The body is nested more than {MAX_DEPTH} levels deep.") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedBody(f"The body is not valid JSON: {exc.__class__.__name__}.") from exc
    if _depth(value) > MAX_DEPTH:
        raise MalformedBody(f"The body is nested more than {MAX_DEPTH} levels deep.")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise MalformedBody(f"The body names the member {key[:64]!r} twice.")
        result[key] = value
    return result


def _number(kind: type[Any]) -> Any:
    def parse(text: str) -> Any:
        if len(text) > MAX_NUMBER_DIGITS:
            raise MalformedBody(f"A number in the body is longer than {MAX_NUMBER_DIGITS} digits.")
        return kind(text)

    return parse


def _no_constant(name: str) -> Any:
    raise MalformedBody(f"{name} is not a JSON value (RFC 8259 §6).")


def _depth(value: Any) -> int:
    """Nesting depth, iteratively (the parse already bounded recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest
