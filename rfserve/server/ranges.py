"""Numeric fields and their ranges. NaN compares false with everything and infinity passes a one-sided bound,
so a check like `x >= 0` lets one or the other through, and pydantic's bound errors name only the side that
failed ("greater than or equal to 0" for a NaN). Every float range the API checks goes through `range_error`,
so any refusal, of a NaN as of a number just past a bound, says the whole rule."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic_core import core_schema


def range_error(value: float, low: float, high: float | None = None, *, above: bool = False) -> str | None:
    """Why `value` is refused, or None when it is finite, at least `low` (above it with `above`) and at most
    `high`."""
    if math.isfinite(value) and (value > low if above else value >= low) and (high is None or value <= high):
        return None
    if high is None:
        return f"must be a finite number {'above' if above else 'of at least'} {low:g}"
    if above:
        return f"must be a finite number above {low:g} and at most {high:g}"
    return f"must be a finite number between {low:g} and {high:g}"


@dataclass(frozen=True)
class Range:
    """`Annotated[float, Range(...)]`: pydantic refuses the field (a 400 naming it) unless `range_error` passes
    it, and the schema shows the bounds. With `later`, the upper bound is the served model's or the server's:
    the route checks the whole range with `range_error` where that bound is known (server/contract.py
    publishes it), and only the lower bound appears here."""
    low: float
    high: float | None = None
    above: bool = False
    later: bool = False

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        schema = handler(source)
        return schema if self.later else core_schema.no_info_after_validator_function(self._check, schema)

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema,
                                     handler: GetJsonSchemaHandler) -> dict[str, Any]:
        out = handler(schema)
        out["exclusiveMinimum" if self.above else "minimum"] = self.low
        if self.high is not None:
            out["maximum"] = self.high
        return out

    def _check(self, value: float) -> float:
        why = range_error(value, self.low, self.high, above=self.above)
        if why is not None:
            raise ValueError(why)
        return value
