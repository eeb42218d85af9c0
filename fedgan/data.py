"""Datasets as uint8 tensors: found on disk (a read-only folder, Kaggle's inputs) before any download."""
from __future__ import annotations

import contextlib
import gzip
import io
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from fedgan.config import DATASETS, FedConfig

Tensor = torch.Tensor


MNIST_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_FOLDER = "cifar-10-batches-py"


class DatasetNotFoundError(FileNotFoundError):
    """The dataset is in none of the places looked at and could not be downloaded."""


def cache_dir() -> Path:
    """A writable folder for cached weights: the metric classifiers ($FEDGAN_CACHE or ~/.cache/fedgan)."""
    return Path(os.environ.get("FEDGAN_CACHE") or Path.home() / ".cache" / "fedgan")


def _data_search_roots(root: str | os.PathLike | None) -> list[Path]:
    roots = []
    if root is not None:
        roots.append(Path(root))
    if os.environ.get("FEDGAN_DATA"):
        roots.append(Path(os.environ["FEDGAN_DATA"]))
    roots.append(Path("data"))
    roots.append(Path("/kaggle/input"))
    return roots


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _idx_folder_matches(folder: Path, name: str) -> bool:
    """MNIST and Fashion-MNIST share file names: the folder path tells which one it holds."""
    says_fashion = "fashion" in str(folder.resolve()).lower()
    return says_fashion == (name == "fashion_mnist")


def _find_idx_folder(roots: Iterable[Path], name: str) -> Path | None:
    info = DATASETS[name]
    stems = MNIST_FILES[True] + MNIST_FILES[False]
    for root in roots:
        if not root.is_dir():
            continue
        candidates = [root, root / info.torchvision_class / "raw", root / info.torchvision_class, root / "raw"]
        if str(root).startswith("/kaggle/input"):  # attached Kaggle datasets nest freely
            candidates += [p.parent for p in root.glob("**/train-images-idx3-ubyte*")]
        for folder in candidates:
            if all(_idx_file(folder, s) for s in stems) and _idx_folder_matches(folder, name):
                return folder
    return None


def _find_cifar_folder(roots: Iterable[Path]) -> Path | None:
    for root in roots:
        if not root.is_dir():
            continue
        candidates = [root, root / CIFAR_FOLDER]
        if str(root).startswith("/kaggle/input"):
            candidates += list(root.glob(f"**/{CIFAR_FOLDER}"))
        for folder in candidates:
            if folder.name == CIFAR_FOLDER and (folder / "data_batch_1").is_file():
                return folder.parent
    return None


IDX_MAGIC = {1: "00000801", 3: "00000803"}  # unsigned bytes; 1 dim (labels) or 3 (images)


def read_idx(path: Path) -> np.ndarray:
    """An idx file of unsigned bytes (raw or .gz) as a uint8 array of the shape its header gives, read whole:
    a damaged file is a ValueError naming it, never a partial array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except EOFError as error:  # gzip's stream ended early
        raise ValueError(f"{path} is truncated ({error})") from error
    except (OSError, zlib.error) as error:
        raise ValueError(f"{path} could not be read ({type(error).__name__}: {error})") from error
    magic = data[:4].hex()
    if len(data) < 4 or data[:3] != b"\0\0\x08" or data[3] not in IDX_MAGIC:
        raise ValueError(f"{path} is not an idx file of unsigned bytes: its magic number {magic} is not "
                         f"{IDX_MAGIC[3]} (images) or {IDX_MAGIC[1]} (labels)")
    header = 4 + 4 * data[3]
    dims = struct.unpack(f">{data[3]}I", data[4:header]) if len(data) >= header else ()
    needed = header + math.prod(dims) if dims else header
    if len(data) != needed:
        raise ValueError(f"{path} holds {len(data):,} bytes where its header needs {needed:,}: truncated or damaged")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def check_labels(labels: Tensor, name: str, source: object) -> None:
    """Labels of dataset `name` must be 1-D integers in its class range; `source` names where they came from."""
    num_classes = DATASETS[name].num_classes
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{source}: labels must be a 1-D integer tensor, got {labels.dtype} of shape "
                         f"{tuple(labels.shape)}")
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if len(outside):
        raise ValueError(f"{source} holds label {int(outside[0])}: {name} has classes 0 to {num_classes - 1}")


def check_counts(images: Any, labels: Any, source: object) -> None:
    """As many images as labels, or a ValueError saying how many of each `source` holds."""
    if len(images) != len(labels):
        raise ValueError(f"{source}: {len(images):,} images and {len(labels):,} labels; they must be as many")


def check_data(images: Tensor, labels: Tensor, name: str) -> None:
    """Images and labels given for dataset `name` must be what load_dataset gives: uint8 [N, C, H, W] in [0, 255]
    and int labels [N] in its class range (float images in [0, 1] would train on the wrong scale)."""
    shape = DATASETS[name].image_shape
    if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != shape:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"data: images must be a tensor [N, {', '.join(map(str, shape))}] for {name}, got {got}")
    if images.dtype != torch.uint8:
        raise ValueError(f"data: images must be uint8 in [0, 255], as load_dataset gives them, got {images.dtype} in "
                         f"[{images.min().item():.3g}, {images.max().item():.3g}]; e.g. (images * 255).round()"
                         ".to(torch.uint8) for floats in [0, 1]")
    if not isinstance(labels, Tensor):
        raise ValueError(f"data: labels must be a tensor, got {type(labels).__name__}")
    check_labels(labels, name, "data")
    check_counts(images, labels, "data")


def _read_idx_dataset(folder: Path, name: str, train: bool) -> tuple[Tensor, Tensor]:
    """One split of an MNIST-like dataset from its two idx files, checked against each other and the dataset."""
    images_path, labels_path = (_idx_file(folder, stem) for stem in MNIST_FILES[train])
    try:
        images, labels = read_idx(images_path), read_idx(labels_path)
    except ValueError as error:
        raise ValueError(f"the {name} idx files in {folder} could not be read: {error}; "
                         "replace them with the four standard files") from error
    expected = DATASETS[name].image_shape[1:]
    if images.ndim != 3 or images.shape[1:] != expected or labels.ndim != 1:
        raise ValueError(f"{images_path} holds images of shape {images.shape[1:]} and {labels_path} labels of "
                         f"{labels.ndim} dims: {name} has {expected} images and 1-D labels")
    check_counts(images, labels, f"{images_path.name} and {labels_path.name} in {folder} (one split's two files)")
    labels = torch.from_numpy(labels.astype(np.int64))
    check_labels(labels, name, labels_path)
    return torch.from_numpy(images.copy()).unsqueeze(1), labels  # (N, H, W) -> (N, 1, H, W)


def _torchvision_dataset(name: str, root: Path, train: bool, download: bool):
    import torchvision

    cls = getattr(torchvision.datasets, DATASETS[name].torchvision_class)
    return cls(root=str(root), train=train, download=download)


def _as_tensors(dataset, name: str) -> tuple[Tensor, Tensor]:
    images = torch.as_tensor(np.asarray(dataset.data), dtype=torch.uint8)
    if images.dim() == 3:  # MNIST-like: (N, H, W) -> (N, 1, H, W)
        images = images.unsqueeze(1)
    else:  # CIFAR: (N, H, W, C) -> (N, C, H, W)
        images = images.permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(np.asarray(dataset.targets), dtype=torch.int64)
    expected = DATASETS[name].image_shape
    if tuple(images.shape[1:]) != expected:
        raise ValueError(f"{name} images have shape {tuple(images.shape[1:])}, expected {expected}")
    check_counts(images, labels, f"the {name} files in {getattr(dataset, 'root', '?')}")
    check_labels(labels, name, f"the {name} files in {getattr(dataset, 'root', '?')}")
    return images, labels


def load_dataset(name: str = "mnist", root: str | os.PathLike | None = None, train: bool = True,
                 download: bool = True) -> tuple[Tensor, Tensor]:
    """Images as uint8 [N, C, H, W] and labels as int64 [N].

    Looks in `root`, $FEDGAN_DATA, ./data and /kaggle/input (recursively), then tries torchvision's
    download into ./data (skipped when `download` is False or $FEDGAN_OFFLINE is set). MNIST-like
    idx files, raw or .gz, are read where they are (a read-only folder works): nothing is copied or cached.
    """
    if name not in DATASETS:
        raise ValueError(f"dataset={name!r} is not known; datasets: {sorted(DATASETS)}")
    roots = _data_search_roots(root)
    if name == "cifar10":
        found = _find_cifar_folder(roots)
        if found is not None:
            return _as_tensors(_torchvision_dataset(name, found, train, download=False), name)
    else:
        folder = _find_idx_folder(roots, name)
        if folder is not None:
            return _read_idx_dataset(folder, name, train)
    failure = "download skipped (download=False or FEDGAN_OFFLINE set)"
    if download and not os.environ.get("FEDGAN_OFFLINE"):
        captured = io.StringIO()
        try:
            with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
                dataset = _torchvision_dataset(name, Path("data"), train, download=True)
            return _as_tensors(dataset, name)
        except Exception as error:  # urllib, HTTP, checksum: all mean "not downloadable here"
            failure = f"download into ./data failed: {type(error).__name__}: {error}"
    looked = "\n".join(f"  - {r.resolve() if r.exists() else r} ({'exists' if r.exists() else 'missing'})"
                       for r in roots)
    wanted = (f"the folder {CIFAR_FOLDER}/ of the CIFAR-10 python version" if name == "cifar10" else
              "the four idx files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
              "t10k-labels-idx1-ubyte, raw or .gz)")
    where = "a folder whose path contains 'fashion'" if name == "fashion_mnist" else "a folder"
    raise DatasetNotFoundError(
        f"{name} not found. Looked in:\n{looked}\nand the {failure}.\n"
        f"Fix: put {wanted} in {where} and set FEDGAN_DATA=/that/folder (or pass root=...); "
        "on Kaggle, attach a dataset holding them, or turn the notebook's internet on.")


def to_float_images(images: Tensor) -> Tensor:
    """uint8 in [0, 255] -> float in [-1, 1], the range the generator's tanh produces."""
    return images.float().mul_(2.0 / 255.0).sub_(1.0)


def examples_per_label(images: Tensor, labels: Tensor, per_label: int = 10,
                       num_classes: int = 10) -> Tensor:
    """The first `per_label` images of each label, label-major, as float in [-1, 1]:
    [num_classes * per_label, C, H, W]."""
    picks = [torch.nonzero(labels == c).flatten()[:per_label] for c in range(num_classes)]
    return to_float_images(images[torch.cat(picks)])


def training_images(config: FedConfig, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The images a federation of `config` trains on: all, or `train_subset` of them drawn by the seed."""
    if config.train_subset is not None and config.train_subset < len(labels):
        keep = np.sort(np.random.default_rng(config.seed).choice(len(labels), config.train_subset, replace=False))
        images, labels = images[keep], labels[keep]
    return images, labels
