"""Argument checks shared by every module, so that a bad value always gets the same kind of error:
a ValueError naming the argument, the value and what is allowed."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

Tensor = torch.Tensor


def require(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is not allowed: {allowed}")


def is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def positive_int(v: Any) -> bool:
    return is_int(v) and v >= 1


def non_negative_int(v: Any) -> bool:
    return is_int(v) and v >= 0


def finite(v: Any) -> bool:
    return is_int(v) or math.isfinite(v)  # math.isfinite overflows on ints beyond float range


def positive_number(v: Any) -> bool:
    return is_number(v) and finite(v) and v > 0
