"""Type predicates for constructor argument checks (the layers raise ValueError at construction, house style 4)."""

from __future__ import annotations

import math


def is_int(value) -> bool:
    """A Python int that is not a bool (``True`` is an int to ``isinstance``, never a size)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    """A number that is neither NaN nor ±inf (a NaN passes every comparison check silently)."""
    return is_number(value) and math.isfinite(value)
