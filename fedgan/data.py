"""Datasets as uint8 tensors: found on disk (a read-only folder, Kaggle's inputs) before any download."""
from __future__ import annotations

import contextlib
import gzip
import io
import math
import os
import pickle
import struct
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from fedgan.config import DATASETS, FedConfig

Tensor = torch.Tensor


MNIST_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CSV_FILES = {  # (train, test) as Kaggle's MNIST and Fashion-MNIST datasets name them: a header row, label first
    "mnist": ("mnist_train.csv", "mnist_test.csv"),
    "fashion_mnist": ("fashion-mnist_train.csv", "fashion-mnist_test.csv"),
}
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_BATCHES = {True: tuple(f"data_batch_{i}" for i in range(1, 6)), False: ("test_batch",)}
SEARCH_DEPTH = 4  # folders below a search root that are looked into (Kaggle nests a dataset two or three deep)


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


def _folders_under(root: Path) -> Iterator[Path]:
    """`root` and the folders below it, shallowest first, SEARCH_DEPTH deep, hidden ones skipped."""
    level = [root]
    for _ in range(SEARCH_DEPTH + 1):
        below = []
        for folder in level:
            yield folder
            with contextlib.suppress(OSError):
                below += sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        level = below


def _idx_names(stem: str) -> list[str]:
    """The names one idx file goes by: train-images-idx3-ubyte or train-images.idx3-ubyte, raw or .gz."""
    dotted = stem.replace("-idx", ".idx")
    return [name + ending for name in (stem, dotted) for ending in ("", ".gz")]


def _idx_file(folder: Path, stem: str) -> Path | None:
    """The idx file `stem` in `folder`, under any of its names, or alone in a folder of that name (as on Kaggle)."""
    for name in _idx_names(stem):
        path = folder / name
        if path.is_file():
            return path
        if path.is_dir():
            inside = [p for p in path.iterdir() if p.is_file() and p.name in _idx_names(stem)]
            if len(inside) == 1:
                return inside[0]
    return None


def _idx_folder_matches(folder: Path, name: str) -> bool:
    """MNIST and Fashion-MNIST share file names: the folder path tells which one it holds."""
    says_fashion = "fashion" in str(folder.resolve()).lower()
    return says_fashion == (name == "fashion_mnist")


def _find_files(roots: Iterable[Path], name: str) -> tuple[str, Path] | None:
    """Where dataset `name` lies: ("idx" | "csv" | "cifar", folder), from the first root that holds it."""
    stems = MNIST_FILES[True] + MNIST_FILES[False]
    for root in roots:
        if not root.is_dir():
            continue
        for folder in _folders_under(root):
            if name == "cifar10":
                if folder.name == CIFAR_FOLDER and (folder / CIFAR_BATCHES[True][0]).is_file():
                    return "cifar", folder
                continue
            if _idx_folder_matches(folder, name) and all(_idx_file(folder, stem) for stem in stems):
                return "idx", folder
            if all((folder / file).is_file() for file in CSV_FILES[name]):
                return "csv", folder
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


def read_csv_images(path: Path, image_size: tuple[int, int] = (28, 28)) -> tuple[np.ndarray, np.ndarray]:
    """A CSV of labelled images, a row each: the label, then the pixel values 0-255 row by row (Kaggle's MNIST and
    Fashion-MNIST form; a header row is skipped). Returns uint8 images [N, H, W] and int64 labels [N]; a malformed
    file is a ValueError naming it and the row."""
    with open(path, "rb") as f:
        first = f.readline().split(b",")[0].strip()
    header = 0 if first.isdigit() else 1
    try:
        rows = np.loadtxt(path, delimiter=",", skiprows=header, dtype=np.int64, ndmin=2)
    except ValueError as error:  # a non-number, or a row of another length: numpy names the row
        raise ValueError(f"{path} is not a CSV of a label and {math.prod(image_size)} pixel values a row: "
                         f"{error}") from error
    pixels = math.prod(image_size)
    if rows.shape[1] != 1 + pixels:
        raise ValueError(f"{path} holds {rows.shape[1] - 1} pixel values a row where a {image_size[0]}x"
                         f"{image_size[1]} image needs {pixels} (after the label)")
    wrong = np.nonzero((rows[:, 1:] < 0) | (rows[:, 1:] > 255))
    if len(wrong[0]):
        row, column = int(wrong[0][0]), int(wrong[1][0])
        raise ValueError(f"{path}, data row {row + 1}: pixel {column} is {rows[row, column + 1]}; pixel values are "
                         "0 to 255")
    return rows[:, 1:].astype(np.uint8).reshape(-1, *image_size), rows[:, 0]


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR-10's python batches are pickles: let through only the numpy arrays they hold, never other code."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
        ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode")}  # how Python 3's protocol 2 writes bytes

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR-10 batch does not hold")
        return super().find_class(module, name)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file of CIFAR-10's python version: uint8 images [N, 3, 32, 32] and int64 labels [N]."""
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as error:  # any unpickling failure, a missing key: the file is not a batch
        raise ValueError(f"{path} is not a batch of CIFAR-10's python version ({type(error).__name__}: {error})"
                         ) from error
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: its data is {data.dtype} of shape {data.shape}, where a CIFAR-10 batch holds "
                         "uint8 rows of 3,072 values (32x32 red, then green, then blue)")
    check_counts(data, labels, path)
    return data.reshape(-1, 3, 32, 32), labels  # (N, 3072) -> (N, C, H, W): the planes are stored one after another


def _as_tensors(images: np.ndarray, labels: np.ndarray, name: str, source: object) -> tuple[Tensor, Tensor]:
    """Arrays read from `source` as load_dataset's tensors, checked against dataset `name`."""
    images = images[:, None] if images.ndim == 3 else images  # (N, H, W) -> (N, 1, H, W)
    expected = DATASETS[name].image_shape
    if tuple(images.shape[1:]) != expected:
        raise ValueError(f"{source} holds images of shape {tuple(images.shape[1:])}: {name} has {expected}")
    check_counts(images, labels, source)
    labels = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    check_labels(labels, name, source)
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)), labels


def _read_found(kind: str, folder: Path, name: str, train: bool) -> tuple[Tensor, Tensor]:
    if kind == "idx":
        return _read_idx_dataset(folder, name, train)
    if kind == "csv":
        path = folder / CSV_FILES[name][0 if train else 1]
        return _as_tensors(*read_csv_images(path, DATASETS[name].image_shape[1:]), name, path)
    batches = [read_cifar_batch(folder / batch) for batch in CIFAR_BATCHES[train]]
    return _as_tensors(np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]), name,
                       f"the CIFAR-10 batches in {folder}")


def _download(name: str, train: bool) -> tuple[Tensor, Tensor]:
    import torchvision

    dataset = getattr(torchvision.datasets, DATASETS[name].torchvision_class)(root="data", train=train, download=True)
    images = np.asarray(dataset.data)
    if images.ndim == 4:  # CIFAR: (N, H, W, C) -> (N, C, H, W)
        images = images.transpose(0, 3, 1, 2)
    return _as_tensors(images, np.asarray(dataset.targets), name, f"the {name} download in ./data")


def load_dataset(name: str = "mnist", root: str | os.PathLike | None = None, train: bool = True,
                 download: bool = True) -> tuple[Tensor, Tensor]:
    """Images as uint8 [N, C, H, W] and labels as int64 [N].

    Looks in `root`, $FEDGAN_DATA, ./data and /kaggle/input and the folders below each (SEARCH_DEPTH deep), then
    tries torchvision's download into ./data (skipped when `download` is False or $FEDGAN_OFFLINE is set). MNIST and
    Fashion-MNIST are read from their idx files (either naming, raw or .gz, each possibly alone in a folder of its
    name) or Kaggle's CSV files, CIFAR-10 from its python batches; all where they lie (a read-only folder works):
    nothing is copied or cached.
    """
    if name not in DATASETS:
        raise ValueError(f"dataset={name!r} is not known; datasets: {sorted(DATASETS)}")
    roots = _data_search_roots(root)
    found = _find_files(roots, name)
    if found is not None:
        return _read_found(*found, name, train)
    failure = "download skipped (download=False or FEDGAN_OFFLINE set)"
    if download and not os.environ.get("FEDGAN_OFFLINE"):
        captured = io.StringIO()
        try:
            with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
                return _download(name, train)
        except Exception as error:  # urllib, HTTP, checksum: all mean "not downloadable here"
            failure = f"download into ./data failed: {type(error).__name__}: {error}"
    looked = "\n".join(f"  - {r.resolve() if r.exists() else r} ({'exists' if r.exists() else 'missing'})"
                       for r in roots)
    wanted = (f"the folder {CIFAR_FOLDER}/ of the CIFAR-10 python version" if name == "cifar10" else
              "the four idx files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
              "t10k-labels-idx1-ubyte; '-idx' or '.idx', raw or .gz, or each alone in a folder of its name) or "
              f"the two CSV files {' and '.join(CSV_FILES[name])}")
    where = ("a folder (the idx files: one whose path contains 'fashion', as MNIST's have the same names)"
             if name == "fashion_mnist" else "a folder")
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
