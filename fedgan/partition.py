"""Splits of a dataset over clients: IID and the non-IID schemes of the literature."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from fedgan.checks import is_int, require
from fedgan.config import PARTITION_PARAMS, PARTITIONS, check_field

Tensor = torch.Tensor


def _labels_array(labels: Any) -> np.ndarray:
    array = labels.cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got shape {array.shape} and dtype {array.dtype}")
    if array.size and array.min() < 0:
        raise ValueError(f"labels must be >= 0, got {array.min()}")
    return array


def _split_by_counts(indices: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    return np.split(indices, np.cumsum(counts)[:-1])


def _check_min_size(min_size: int, num_clients: int, num_labels: int) -> None:
    if min_size * num_clients > num_labels:
        raise ValueError(f"min_size={min_size} is not allowed: {num_clients} clients x {min_size} > "
                         f"{num_labels} images; use min_size <= {num_labels // num_clients}")


def _partition_iid(labels, num_clients, rng) -> list[np.ndarray]:
    return np.array_split(rng.permutation(len(labels)), num_clients)


def _partition_dirichlet(labels, num_clients, rng, alpha, min_size) -> list[np.ndarray]:
    """Label skew of Hsu et al. (2019): each class is split over clients by Dirichlet(alpha) shares."""
    _check_min_size(min_size, num_clients, len(labels))
    for _ in range(1000):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            counts = np.floor(shares * len(members)).astype(int)
            counts[np.argsort(-(shares * len(members) - counts))[: len(members) - counts.sum()]] += 1
            for client, chunk in enumerate(_split_by_counts(members, counts)):
                parts[client].append(chunk)
        result = [np.concatenate(p) for p in parts]
        if min(len(p) for p in result) >= min_size:
            return result
    raise ValueError(f"alpha={alpha} with min_size={min_size}: no split in 1000 draws gave every client "
                     f"{min_size} images; raise alpha or lower min_size")


def _partition_shards(labels, num_clients, rng, shards_per_client) -> list[np.ndarray]:
    """The FedAvg paper's pathological split: sort by label, cut into shards, deal shards_per_client each."""
    num_shards = num_clients * shards_per_client
    if num_shards > len(labels):
        raise ValueError(f"shards_per_client={shards_per_client} is not allowed: {num_shards} shards > "
                         f"{len(labels)} images")
    order = rng.permutation(len(labels))
    by_label = order[np.argsort(labels[order], kind="stable")]
    shards = np.array_split(by_label, num_shards)
    dealt = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.concatenate([shards[s] for s in row]) for row in dealt]


def _partition_classes(labels, num_clients, rng, classes_per_client) -> list[np.ndarray]:
    """Each client holds `classes_per_client` labels; each label is split evenly among its holders."""
    classes = np.unique(labels)
    if classes_per_client > len(classes):
        raise ValueError(f"classes_per_client={classes_per_client} is not allowed: the labels hold only "
                         f"{len(classes)} classes")
    if num_clients * classes_per_client < len(classes):
        raise ValueError(f"classes_per_client={classes_per_client} is not allowed with {num_clients} clients: "
                         f"{len(classes)} classes need num_clients x classes_per_client >= {len(classes)}")
    order = rng.permutation(classes)
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    for client in range(num_clients):
        for j in range(classes_per_client):
            holders[int(order[(client * classes_per_client + j) % len(classes)])].append(client)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c, owners in holders.items():
        members = rng.permutation(np.flatnonzero(labels == c))
        for client, chunk in zip(owners, np.array_split(members, len(owners))):
            parts[client].append(chunk)
    return [np.concatenate(p) if p else np.empty(0, dtype=np.int64) for p in parts]


def _partition_quantity(labels, num_clients, rng, sigma, min_size) -> list[np.ndarray]:
    """Quantity skew: client sizes proportional to lognormal(0, sigma) draws, each at least min_size."""
    _check_min_size(min_size, num_clients, len(labels))
    shares = rng.lognormal(0.0, sigma, num_clients)
    free = len(labels) - min_size * num_clients
    counts = np.floor(shares / shares.sum() * free).astype(int)
    counts[np.argsort(-(shares / shares.sum() * free - counts))[: free - counts.sum()]] += 1
    return _split_by_counts(rng.permutation(len(labels)), counts + min_size)


_PARTITIONERS = {
    "iid": _partition_iid,
    "dirichlet": _partition_dirichlet,
    "shards": _partition_shards,
    "classes": _partition_classes,
    "quantity": _partition_quantity,
}
_PARTITION_DEFAULTS = {"alpha": 0.5, "min_size": 10, "shards_per_client": 2, "classes_per_client": 2,
                       "sigma": 1.0}


def partition(labels: Any, num_clients: int, scheme: str = "iid", seed: int = 0, **kw: Any) -> list[np.ndarray]:
    """Split dataset indices over clients: a list of `num_clients` sorted int64 arrays holding every index once.

    Schemes: "iid"; "dirichlet" (alpha, min_size); "shards" (shards_per_client); "classes"
    (classes_per_client); "quantity" (sigma, min_size). Deterministic for a seed.
    """
    array = _labels_array(labels)
    require(scheme in PARTITIONS, "scheme", scheme, f"one of {list(PARTITIONS)}")
    require(is_int(num_clients) and 1 <= num_clients <= max(1, len(array)), "num_clients", num_clients,
             f"an integer from 1 to the number of labels ({len(array)})")
    require(is_int(seed) and seed >= 0, "seed", seed, "an integer >= 0")
    allowed = PARTITION_PARAMS[scheme]
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise ValueError(f"scheme={scheme!r} takes {list(allowed) or 'no parameters'}, not {unknown}")
    params = {name: kw.get(name, _PARTITION_DEFAULTS[name]) for name in allowed}
    for name, value in params.items():  # the same rules as FedConfig's fields of the same names
        check_field(name, value)
    rng = np.random.default_rng(seed)
    parts = _PARTITIONERS[scheme](array, num_clients, rng, **params)
    return [np.sort(p).astype(np.int64) for p in parts]


def partition_report(labels: Any, parts: Sequence[np.ndarray], num_classes: int | None = None) -> np.ndarray:
    """Per-client label counts: an int array [num_clients, num_classes]."""
    array = _labels_array(labels)
    num_classes = num_classes or int(array.max()) + 1
    return np.stack([np.bincount(array[p], minlength=num_classes) for p in parts])
