"""What a client sends for its update: float32, top-k sparse or 8-bit, and how many bytes."""
from __future__ import annotations

import math
from typing import Mapping

import torch

from fedgan.checks import is_number, require
from fedgan.config import COMPRESSIONS

Tensor = torch.Tensor


def compress_updates(updates: Mapping[str, Tensor], method: str, fraction: float = 0.01
                     ) -> tuple[dict[str, Tensor], int]:
    """What a client sends for its update, and how many bytes that takes: {key: [K, ...]} -> (same, bytes each).

    "none": float32 values. "topk": the `fraction` largest-magnitude coordinates of the whole update
    (value + int32 index each). "int8": each tensor quantised to 8 bits with one float32 scale
    (round to nearest of 255 levels). Only floating tensors are compressed; others are sent as they are.
    """
    require(method in COMPRESSIONS, "method", method, f"one of {list(COMPRESSIONS)}")
    floats = [k for k, v in updates.items() if v.dtype.is_floating_point]
    other_bytes = sum(v[0].numel() * v.element_size() for k, v in updates.items() if k not in floats)
    if method == "none" or not floats:
        return dict(updates), other_bytes + sum(updates[k][0].numel() * 4 for k in floats)
    count = updates[floats[0]].shape[0]
    sent = dict(updates)
    if method == "int8":
        for k in floats:
            flat = updates[k].reshape(count, -1)  # (K, n)
            scale = (flat.abs().amax(1, keepdim=True) / 127).clamp(min=torch.finfo(flat.dtype).tiny)  # (K, 1)
            sent[k] = ((flat / scale).round().clamp(-127, 127) * scale).view_as(updates[k])
        return sent, other_bytes + sum(updates[k][0].numel() + 4 for k in floats)
    require(is_number(fraction) and 0 < fraction <= 1, "fraction", fraction, "a number in (0, 1]")
    flat = torch.cat([updates[k].reshape(count, -1) for k in floats], 1)  # (K, N): each client's whole update
    kept = max(1, math.ceil(fraction * flat.shape[1]))
    top = flat.abs().topk(kept, dim=1).indices  # (K, kept)
    sparse = torch.zeros_like(flat).scatter_(1, top, flat.gather(1, top))
    for k, piece in zip(floats, sparse.split([updates[k][0].numel() for k in floats], 1)):
        sent[k] = piece.reshape(updates[k].shape)
    return sent, other_bytes + kept * 8
