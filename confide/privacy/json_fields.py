"""Typed readers of the fields of a JSON object (a ledger payload, a receipt, a mechanism
event), each raising `PayloadError` that names where the object sits and the field:
`example_dp.sample_rate = 1.5 is above 1.0`.

Canonical JSON has no Infinity: an infinite number (an epsilon without noise) travels as the
string "inf" (`json_number`) and is read back where `allow_inf` says it may be.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


class PayloadError(ValueError):
    """A payload misses a field or has a value of the wrong type or range."""


def required(where: str, data: Mapping[str, Any], key: str) -> Any:
    if key not in data:
        raise PayloadError(f"{where} payload lacks field {key!r}")
    return data[key]


def integer(where: str, key: str, value: Any, lo: int | None = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PayloadError(f"{where}.{key} = {value!r} is not an integer")
    if lo is not None and value < lo:
        raise PayloadError(f"{where}.{key} = {value} is below {lo}")
    return value


def number(where: str, key: str, value: Any, lo: float | None = 0.0, hi: float | None = None,
           allow_inf: bool = False) -> float:
    if isinstance(value, str) and allow_inf and value == "inf":
        return math.inf
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PayloadError(f"{where}.{key} = {value!r} is not a number")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise PayloadError(f"{where}.{key} = {value!r} is not finite")
    if lo is not None and value < lo:
        raise PayloadError(f"{where}.{key} = {value} is below {lo}")
    if hi is not None and value > hi:
        raise PayloadError(f"{where}.{key} = {value} is above {hi}")
    return value


def optional_number(where: str, key: str, value: Any) -> float | None:
    return None if value is None else number(where, key, value, lo=None, allow_inf=True)


def boolean(where: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise PayloadError(f"{where}.{key} = {value!r} is not true or false")
    return value


def text(where: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise PayloadError(f"{where}.{key} = {value!r} is not a non-empty string")
    return value


def text_list(where: str, key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PayloadError(f"{where}.{key} = {value!r} is not a list of strings")
    return list(value)


def obj(where: str, key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PayloadError(f"{where}.{key} = {value!r} is not an object")
    return dict(value)


def hex_digits(where: str, key: str, value: Any, length: int) -> str:
    digits = text(where, key, value)
    if len(digits) != length or any(c not in "0123456789abcdef" for c in digits):
        raise PayloadError(f"{where}.{key} is not {length} lowercase hex digits")
    return digits


def json_number(value: float | None) -> float | str | None:
    """A float as canonical JSON can hold it: infinity as "inf"."""
    if value is None:
        return None
    return "inf" if math.isinf(value) else float(value)
