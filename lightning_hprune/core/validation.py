"""Argument validation helpers with uniform messages (``Expected argument `x` to be ..., but got ...``)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal, overload


def _fmt(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_fraction(name: str, value: Any, *, allow_zero: bool = False, allow_one: bool = False) -> float:
    """Check that ``value`` is a real number inside (0, 1), with optional closed ends.

    Raises:
        ValueError: if the value is not a finite number in the expected interval.

    """
    low = "[0" if allow_zero else "(0"
    high = "1]" if allow_one else "1)"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value >= 0 if allow_zero else value > 0) and (value <= 1 if allow_one else value < 1)
    if not ok:
        raise ValueError(f"Expected argument `{name}` to be a float in {low}, {high}, but got {_fmt(value)}.")
    return float(value)


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """Check that ``value`` is a finite real number > 0 (or >= 0)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = value >= 0 if allow_zero else value > 0
    if not ok:
        what = "a non-negative number" if allow_zero else "a positive number"
        raise ValueError(f"Expected argument `{name}` to be {what}, but got {_fmt(value)}.")
    return float(value)


@overload
def check_int(name: str, value: Any, *, minimum: int = 0, allow_none: Literal[False] = False) -> int: ...


@overload
def check_int(name: str, value: Any, *, minimum: int = 0, allow_none: Literal[True]) -> int | None: ...


def check_int(name: str, value: Any, *, minimum: int = 0, allow_none: bool = False) -> int | None:
    """Check that ``value`` is an integer >= ``minimum`` (or None when allowed)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        extra = " or None" if allow_none else ""
        raise ValueError(
            f"Expected argument `{name}` to be an integer >= {minimum}{extra}, but got {_fmt(value)}."
        )
    return value


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """Check that ``value`` is one of ``choices``."""
    options = sorted(choices)
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"Expected argument `{name}` to be one of {options}, but got {_fmt(value)}.")
    return value


def check_str_list(name: str, value: Any) -> tuple[str, ...]:
    """Check that ``value`` is a sequence of strings (a single string is accepted as one item)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"Expected argument `{name}` to be a list of strings, but got {_fmt(value)}.")
    return tuple(value)
