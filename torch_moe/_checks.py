"""Type predicates for constructor argument checks (the layers raise ValueError at construction, house style 4),
and the check of a layer's token input shared by the layers."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def is_int(value) -> bool:
    """A Python int that is not a bool (``True`` is an int to ``isinstance``, never a size)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    """A number that is neither NaN nor ±inf (a NaN passes every comparison check silently)."""
    return is_number(value) and math.isfinite(value)


def flat_tokens(owner: str, x: Tensor, width_name: str, width: int,
                padding_mask: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """x [..., width] -> (tokens [T, width], valid [T] bool or None); ValueError naming ``owner`` for an x of the
    wrong width or dtype, or a padding_mask that is not bool of x's shape without its last dim."""
    if x.dim() == 0 or x.shape[-1] != width:
        raise ValueError(f"{owner}: the last dim of x must be {width_name}={width}, got x of shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{owner}: x must be a floating-point tensor, got {x.dtype}")
    valid = None
    if padding_mask is not None:
        lead_shape = x.shape[:-1]
        if padding_mask.shape != lead_shape or padding_mask.dtype != torch.bool:
            raise ValueError(f"{owner}: padding_mask must be a bool tensor of shape {tuple(lead_shape)} (x without "
                             f"its last dim), got {padding_mask.dtype} of shape {tuple(padding_mask.shape)}")
        valid = padding_mask.reshape(-1)
    return x.reshape(-1, width), valid
