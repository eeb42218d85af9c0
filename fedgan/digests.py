"""Digests that name a result by what decides it: the cell store finds a grid's cells by them and the metric
classifier's cache its weights, so nothing is read back that the same inputs would not compute again."""
from __future__ import annotations

import hashlib

import torch


def digest(*parts: bytes) -> str:
    """A BLAKE2b digest of byte strings, each preceded by its length: ("ab", "c") is not ("a", "bc")."""
    hasher = hashlib.blake2b(digest_size=20)
    for part in parts:
        hasher.update(len(part).to_bytes(8, "little"))
        hasher.update(part)
    return hasher.hexdigest()


def tensor_digest(*tensors: torch.Tensor) -> str:
    """The digest of the tensors' bytes, in order."""
    return digest(*(t.detach().cpu().contiguous().numpy().tobytes() for t in tensors))
