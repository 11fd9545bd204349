"""Strict input fields for money and counts: what a client sends is what it meant.

Pydantic's default (lax) mode is made for convenience, not for money: it reads
``" 5 "`` as 5, ``"1e2"`` as 100, ``"١٢"`` (Arabic-Indic digits) as 12, a JSON
``5.5`` float as an exact decimal, and for an ``int`` field ``true`` as 1. An
amount is a contract, so these fields accept one spelling only::

    class Redeem(BaseModel):
        model_config = ConfigDict(extra="forbid")
        amount: Amount                         # "12.50" or 12; never 12.5, true, " 12 "
        cards: Count = 1                       # 3; never "3", 3.0, true

* :data:`Amount` is a :class:`~decimal.Decimal` given as a JSON string of
  ASCII digits with at most two decimals (``"12.50"``) or as a JSON integer;
  it must be positive and has at most 12 digits. A float, a boolean,
  surrounding spaces, an exponent, a sign, non-ASCII digits or a third
  decimal is refused with a message saying how to send it. For other bounds,
  build one with :func:`amount`.
* :data:`Count` is a non-negative JSON integer, strictly (no string, float or
  boolean).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any

from pydantic import Field, GetCoreSchemaHandler
from pydantic_core import core_schema

__all__ = ["Amount", "Count", "StrictAmount"]


@dataclass(frozen=True, slots=True)
class StrictAmount:
    """The strict spelling of an amount, as ``Annotated`` metadata on a ``Decimal``.

    ``Annotated[Decimal, StrictAmount(max_digits=10, decimal_places=0)]`` for
    other bounds than :data:`Amount`'s; the value must be above ``minimum``.
    """

    max_digits: int = 12
    decimal_places: int = 2
    minimum: int = 0

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        whole = self.max_digits - self.decimal_places
        fraction = rf"(\.[0-9]{{1,{self.decimal_places}}})?" if self.decimal_places else ""
        spelling = re.compile(rf"(0|[1-9][0-9]{{0,{whole - 1}}}){fraction}", re.ASCII)
        places, floor = self.decimal_places, Decimal(self.minimum)

        def parse(value: Any) -> Decimal:
            if isinstance(value, bool | float):
                raise ValueError(
                    'send the amount as a string of digits, such as "12.50", or as an integer'
                )
            if isinstance(value, int):
                value = str(value)
            if not isinstance(value, str) or not spelling.fullmatch(value):
                raise ValueError(
                    f"the amount must be digits with at most {places} decimals and {whole} "
                    'before the point, such as "12.50" (no spaces, sign or exponent)'
                )
            number = Decimal(value)
            if number <= floor:
                raise ValueError(f"the amount must be more than {floor}")
            return number

        # What the JSON Schema says is what parse accepts: the spelling, and above the floor
        # (exactly for a floor of 0; other floors are checked by parse alone).
        text = core_schema.str_schema(pattern=f"^{spelling.pattern}$")
        if self.minimum == 0:
            text["metadata"] = {"pydantic_js_updates": {"not": {"pattern": r"^0(\.0*)?$"}}}
        whole_number = core_schema.int_schema(gt=self.minimum, le=10**whole - 1)
        return core_schema.no_info_plain_validator_function(
            parse,
            json_schema_input_schema=core_schema.union_schema([text, whole_number]),
            serialization=core_schema.to_string_ser_schema(),
        )


#: A positive amount of at most 12 digits, 2 of them decimals, sent as "12.50" or 12.
Amount = Annotated[Decimal, StrictAmount()]
#: A non-negative count, sent as a JSON integer (no string, float or boolean).
Count = Annotated[int, Field(strict=True, ge=0)]
