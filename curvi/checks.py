"""Argument checks shared by curvi's public functions.

One home for the checks that every entry point makes of its options, so
that the same mistake raises the same exception everywhere: a
:class:`TypeError` for a value of the wrong type, a :class:`ValueError` for
a value of the right type outside its range, each naming the argument.

Usage::

    from curvi.checks import check_count, check_positive

    check_count("steps", 10, 1)          # fine
    check_positive("lr", 0.5)            # fine
    try:
        check_count("steps", 0, 1)
    except ValueError as error:
        print(error)                     # steps must be an integer >= 1, got 0
"""

from __future__ import annotations

import math
import numbers

__all__ = ["check_count", "check_positive"]


def check_count(name: str, value: object, least: int) -> None:
    """``value`` must be an integer (not a bool) of at least ``least``.

    :raises TypeError: for a non-integer.
    :raises ValueError: for an integer below ``least``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= {least}, got {value!r}")
    if value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def check_positive(name: str, value: object, *, allow_inf: bool = False, allow_zero: bool = False) -> None:
    """``value`` must be a real number (not a bool) above 0 (or at least 0
    with ``allow_zero``), finite unless ``allow_inf``.

    :raises TypeError: for a non-number.
    :raises ValueError: for a number out of range, or NaN.
    """
    bound = ">= 0" if allow_zero else "> 0"
    expected = f"a number {bound}" + (" (math.inf allowed)" if allow_inf else ", finite")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    ok = value >= 0 if allow_zero else value > 0
    if math.isnan(value) or not ok or (not allow_inf and math.isinf(value)):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
