"""Metadata filters: which documents a search may draw from, by their metadata.

A filter is a JSON object. Each key names a field of the documents' metadata, and its
value says what that field must hold; every condition must hold:

    {"source_type": "pdf"}                      equal to (for a list field: containing)
    {"tags": {"in": ["faq", "howto"]}}          any of these (for a list: containing any)
    {"year": {"gte": 2020, "lt": 2025}}         a range of numbers
    {"published": {"gte": "2024-01-01"}}        a range of ISO 8601 dates, compared as text
    {"draft": {"eq": false}}                    the long form of equality

It becomes one SQL/JSON path predicate (``metadata @@ '…'``) in the search's own
statement, so it is applied in SQL, before the k chunks are taken. A document without
the field, or with a value of another type, does not match: nothing raises in SQL.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Operator → SQL/JSON path comparison ("in" is a disjunction of ==).
_COMPARISONS = {"eq": "==", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
OPERATORS = (*_COMPARISONS, "in")
MAX_CONDITIONS = 20
MAX_IN_VALUES = 100
_FORM = 'a JSON object such as {"tags": "faq", "year": {"gte": 2020}}'


class FilterError(ValueError):
    """A filter that cannot be applied; the message says how to write it."""


@dataclass(frozen=True, slots=True)
class MetadataFilter:
    """A validated filter, as the path predicate the search applies (hashable: searches
    with the same filter share a compiled statement)."""

    jsonpath: str

    @classmethod
    def parse(cls, spec: Any) -> MetadataFilter | None:
        """A filter from its JSON form (a dict, or its text); None or {} filters nothing.
        Raises FilterError, whose message can be shown to whoever wrote the filter."""
        if isinstance(spec, MetadataFilter):
            return spec
        if isinstance(spec, (str, bytes)):
            try:
                spec = json.loads(spec) if spec.strip() else None
            except ValueError as exc:
                raise FilterError(f"The filter is not valid JSON ({exc}); write it as {_FORM}.") from None
        if spec is None or spec == {}:
            return None
        if not isinstance(spec, Mapping):
            raise FilterError(f"The filter must be {_FORM}.")
        if len(spec) > MAX_CONDITIONS:
            raise FilterError(f"The filter has {len(spec)} fields; at most {MAX_CONDITIONS} are allowed.")
        return cls(" && ".join(_condition(key, value) for key, value in spec.items()))


def _condition(key: Any, value: Any) -> str:
    if not isinstance(key, str) or not key or len(key) > 200 or "\x00" in key:
        raise FilterError(f"A filter's field name must be a non-empty string (at most 200 characters), not {key!r}.")
    # Quoted, the key is taken literally (a dot in it is not a path): $."a.b".
    field = "$." + _literal(key)
    if not isinstance(value, Mapping):
        return f"{field} == {_scalar(key, value)}"
    if not value:
        raise FilterError(f"The condition on {key!r} is empty: give a value or one of {', '.join(OPERATORS)}.")
    parts = []
    for operator, operand in value.items():
        if operator == "in":
            if not isinstance(operand, list) or not operand or len(operand) > MAX_IN_VALUES:
                raise FilterError(f"'in' on {key!r} takes a list of 1 to {MAX_IN_VALUES} values.")
            parts.append("(" + " || ".join(f"{field} == {_scalar(key, v)}" for v in operand) + ")")
        elif operator in _COMPARISONS:
            if operator != "eq" and (isinstance(operand, bool) or not isinstance(operand, (int, float, str))):
                raise FilterError(f"'{operator}' on {key!r} compares with a number or a date (a string).")
            parts.append(f"{field} {_COMPARISONS[operator]} {_scalar(key, operand)}")
        else:
            raise FilterError(f"Unknown operator {operator!r} on {key!r}: use one of {', '.join(OPERATORS)}.")
    return " && ".join(parts)


def _scalar(key: str, value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        raise FilterError(f"The value for {key!r} must be a finite number.")
    if value is None or isinstance(value, (bool, int, float, str)):
        if isinstance(value, str) and "\x00" in value:
            raise FilterError(f"The value for {key!r} contains a NUL character.")
        return _literal(value)
    raise FilterError(f"The value for {key!r} must be a string, a number, true, false or null, not {value!r}.")


def _literal(value: Any) -> str:
    # JSON's literals are SQL/JSON path's: strings in double quotes with the same escapes
    # (non-ASCII as \\uXXXX), numbers, true, false, null.
    return json.dumps(value)
