"""Datasets as uint8 tensors: found on disk (a read-only folder, Kaggle's inputs) before any download."""
from __future__ import annotations

import contextlib
import gzip
import io
import os
import shutil
from pathlib import Path
from typing import Iterable

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
    """A writable folder for decompressed datasets and cached weights ($FEDGAN_CACHE or ~/.cache/fedgan)."""
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


def _stage_idx_files(folder: Path, name: str) -> Path:
    """Copy (decompressing .gz) the idx files into a writable cache laid out as torchvision expects."""
    info = DATASETS[name]
    root = cache_dir() / name
    raw = root / info.torchvision_class / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for stem in MNIST_FILES[True] + MNIST_FILES[False]:
        source, target = _idx_file(folder, stem), raw / stem
        if target.is_file() and target.stat().st_mtime >= source.stat().st_mtime:
            continue
        partial = target.with_suffix(".partial")
        opener = gzip.open if source.suffix == ".gz" else open
        with opener(source, "rb") as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(partial, target)
    return root


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
    return images, labels


def load_dataset(name: str = "mnist", root: str | os.PathLike | None = None, train: bool = True,
                 download: bool = True) -> tuple[Tensor, Tensor]:
    """Images as uint8 [N, C, H, W] and labels as int64 [N].

    Looks in `root`, $FEDGAN_DATA, ./data and /kaggle/input (recursively), then tries torchvision's
    download into ./data (skipped when `download` is False or $FEDGAN_OFFLINE is set). MNIST-like
    idx files, raw or .gz, work from a read-only folder: they are staged into cache_dir().
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
            staged = _stage_idx_files(folder, name)
            try:
                dataset = _torchvision_dataset(name, staged, train, download=False)
            except Exception as error:  # torchvision reads the files: any failure means bad files
                raise ValueError(f"the {name} idx files in {folder} could not be read ({error}); "
                                 "replace them with the four standard files") from error
            return _as_tensors(dataset, name)
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
