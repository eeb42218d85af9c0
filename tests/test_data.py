"""load_dataset: real MNIST from a read-only folder of .gz files, other layouts, and clear offline errors."""
import gzip
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision

import fedgan_utils as fu
from fedgan import data as fedgan_data

STEMS = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDGAN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def shared_mnist() -> Path:
    return Path(os.environ["FEDGAN_DATA"])


def test_mnist_loads_as_uint8_images_and_int64_labels(mnist):
    images, labels = mnist
    assert images.shape == (60000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60000,) and labels.dtype == torch.int64
    assert labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # the well-known first MNIST labels
    assert torch.bincount(labels).tolist()[1] == 6742
    assert abs(images.float().mean().item() / 255 - 0.1307) < 1e-3


def test_test_split_has_ten_thousand_images(private_cache):
    images, labels = fu.load_dataset("mnist", train=False)
    assert images.shape == (10000, 1, 28, 28) and labels[:5].tolist() == [7, 2, 1, 0, 4]


def test_a_read_only_folder_of_gz_files_is_left_untouched(tmp_path, private_cache, monkeypatch):
    folder = tmp_path / "ro" / "MNIST"
    folder.mkdir(parents=True)
    for stem in STEMS:
        shutil.copy(shared_mnist() / f"{stem}.gz", folder)
    before = sorted(p.name for p in folder.iterdir())
    folder.chmod(0o555)
    monkeypatch.delenv("FEDGAN_DATA")
    images, labels = fu.load_dataset("mnist", root=folder, train=False)
    assert len(labels) == 10000
    assert sorted(p.name for p in folder.iterdir()) == before
    assert (private_cache / "mnist" / "MNIST" / "raw" / "t10k-images-idx3-ubyte").is_file()


def test_raw_idx_files_in_torchvisions_layout_work(tmp_path, private_cache, monkeypatch):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in STEMS:
        with gzip.open(shared_mnist() / f"{stem}.gz") as src, open(raw / stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    monkeypatch.delenv("FEDGAN_DATA")
    images, labels = fu.load_dataset("mnist", root=tmp_path / "data", train=False)
    assert images.shape == (10000, 1, 28, 28)


def test_fashion_mnist_is_never_taken_from_an_mnist_folder(tmp_path, private_cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(fu.DatasetNotFoundError) as error:
        fu.load_dataset("fashion_mnist", download=False)
    message = str(error.value)
    assert "fashion_mnist not found. Looked in:" in message
    assert str(shared_mnist().resolve()) in message and "/kaggle/input (missing)" in message
    assert "download skipped" in message and "FEDGAN_DATA=" in message and "contains 'fashion'" in message


def test_a_failed_download_says_where_it_looked_and_how_to_fix_it(tmp_path, private_cache, monkeypatch):
    # the download really runs, against a loopback port where nothing listens, as it would offline
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FEDGAN_DATA")
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(fu.DatasetNotFoundError) as error:
        fu.load_dataset("fashion_mnist", root=tmp_path / "nowhere")
    message = str(error.value)
    assert f"{tmp_path / 'nowhere'} (missing)" in message
    assert "download into ./data failed" in message
    assert "set FEDGAN_DATA=/that/folder" in message


def test_cifar10_offline_names_the_folder_it_needs(tmp_path, private_cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDGAN_OFFLINE", "1")
    with pytest.raises(fu.DatasetNotFoundError, match="cifar-10-batches-py"):
        fu.load_dataset("cifar10")


def test_cifar_arrays_become_channels_first_tensors():
    data = np.arange(2 * 32 * 32 * 3, dtype=np.uint8).reshape(2, 32, 32, 3)  # as torchvision's CIFAR10.data
    images, labels = fedgan_data._as_tensors(SimpleNamespace(data=data, targets=[3, 9]), "cifar10")
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images[1, 2], torch.from_numpy(data[1, :, :, 2]))
    assert labels.tolist() == [3, 9] and labels.dtype == torch.int64


def test_malformed_idx_files_give_an_error_naming_the_folder(tmp_path, private_cache, monkeypatch):
    folder = tmp_path / "broken_mnist"
    folder.mkdir()
    for stem in STEMS:
        (folder / stem).write_bytes(b"not an idx file")
    monkeypatch.delenv("FEDGAN_DATA")
    with pytest.raises(ValueError, match=f"idx files in {folder} could not be read"):
        fu.load_dataset("mnist", root=folder)


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"dataset='svhn' is not known; datasets: \['cifar10', 'fashion_mnist', 'mnist'\]"):
        fu.load_dataset("svhn")


def test_examples_per_label_are_label_major_and_scaled(mnist):
    images, labels = mnist
    grid = fu.examples_per_label(images, labels, per_label=3)
    assert grid.shape == (30, 1, 28, 28)
    assert grid.min() >= -1 and grid.max() <= 1
    first_sevens = torch.nonzero(labels == 7).flatten()[:3]
    torch.testing.assert_close(grid[21:24], fu.to_float_images(images[first_sevens]))
