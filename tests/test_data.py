"""load_dataset: real MNIST from a read-only folder of .gz files, other layouts, and clear offline errors."""
import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

import fedgan_utils as fu
from helpers import STEMS, small_mnist, write_idx, write_mnist


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
    assert not private_cache.exists()  # read where they are: nothing staged, nothing to go stale


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


def test_another_folder_gives_its_own_images_and_labels_not_a_cached_copy_of_the_first(tmp_path, private_cache,
                                                                                          monkeypatch):
    shared = shared_mnist()
    monkeypatch.delenv("FEDGAN_DATA")
    first = fu.load_dataset("mnist", root=shared, train=False)
    images, labels = small_mnist(100)
    other = fu.load_dataset("mnist", root=write_mnist(tmp_path / "b" / "MNIST", images, labels), train=False)
    assert other[0].shape == (100, 1, 28, 28) and len(other[1]) == 100
    assert torch.equal(other[0][:, 0], torch.from_numpy(images)) and other[1].tolist() == labels.tolist()
    again = fu.load_dataset("mnist", root=shared, train=False)
    assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


def test_two_processes_loading_one_folder_into_an_empty_cache_at_once_both_get_it(tmp_path, monkeypatch):
    script = ("import sys, fedgan_utils as fu; images, labels = fu.load_dataset('mnist', root=sys.argv[1]); "
              "print(len(labels), int(images.sum()))")
    env = {**os.environ, "FEDGAN_CACHE": str(tmp_path / "empty-cache"), "PYTHONPATH": str(Path(fu.__file__).parent)}
    processes = [subprocess.Popen([sys.executable, "-c", script, str(shared_mnist())], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [err[-500:] for _, err in outputs]
    assert outputs[0][0] == outputs[1][0] and outputs[0][0].split()[0] == "60000"
    assert not list(tmp_path.rglob("*.partial"))


@pytest.mark.parametrize("damage,reason", [
    (lambda data: data[: len(data) // 2], "truncated"),  # a download cut short
    (lambda data: b"\x1f\x8b" + data[2:40], "could not be read"),  # not even a whole gzip header after the magic
])
def test_a_damaged_gz_file_gives_an_error_naming_it_and_leaves_nothing_behind(tmp_path, private_cache, monkeypatch,
                                                                               damage, reason):
    monkeypatch.delenv("FEDGAN_DATA")
    folder = write_mnist(tmp_path / "MNIST", *small_mnist(50), gz=True)
    path = folder / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=f"{path.name}.*{reason}|{reason}.*{path.name}") as error:
        fu.load_dataset("mnist", root=folder, train=False)
    assert str(folder) in str(error.value)
    assert not list(tmp_path.rglob("*.partial"))


def test_images_and_labels_of_different_counts_are_refused_naming_both(tmp_path, private_cache, monkeypatch):
    monkeypatch.delenv("FEDGAN_DATA")
    images, labels = small_mnist(100)
    folder = write_mnist(tmp_path / "MNIST", images, labels)
    write_idx(folder / "t10k-images-idx3-ubyte", images[:60])
    with pytest.raises(ValueError, match="60 images.*100 labels"):
        fu.load_dataset("mnist", root=folder, train=False)


def test_a_label_outside_the_classes_is_refused_naming_the_file(tmp_path, private_cache, monkeypatch):
    monkeypatch.delenv("FEDGAN_DATA")
    images, labels = small_mnist(100)
    labels[7] = 200
    folder = write_mnist(tmp_path / "MNIST", images, labels)
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte holds label 200.*mnist has classes 0 to 9"):
        fu.load_dataset("mnist", root=folder, train=False)


def test_a_wrong_magic_number_is_named_with_the_one_expected(tmp_path, private_cache, monkeypatch):
    monkeypatch.delenv("FEDGAN_DATA")
    folder = write_mnist(tmp_path / "MNIST", *small_mnist(20))
    path = folder / "t10k-images-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x0d\x03" + path.read_bytes()[4:])  # 0x0d: float32, not unsigned bytes
    with pytest.raises(ValueError, match=r"magic number 00000d03.*00000803"):
        fu.load_dataset("mnist", root=folder, train=False)
