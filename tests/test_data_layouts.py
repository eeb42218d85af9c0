"""The data as Kaggle and others ship it: idx files under both namings and nested, CSV files, CIFAR-10's python
batches, each read to the same values as the idx files; malformed files refused naming the file; Fashion-MNIST and
CIFAR-10 end to end (data, partition, a smoke federation, metrics) on files written in their real formats."""
import gzip
import math
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import fedgan_utils as fu
from fedgan import data as fedgan_data
from helpers import STEMS, small_mnist, write_mnist

SHARED_MNIST = Path(os.environ["FEDGAN_DATA"])  # conftest sets it; the fixtures below unset it


@pytest.fixture
def no_default_data(tmp_path, monkeypatch):
    """Only the root a test gives is searched: no $FEDGAN_DATA, an empty ./data, a private cache."""
    monkeypatch.delenv("FEDGAN_DATA", raising=False)
    monkeypatch.setenv("FEDGAN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FEDGAN_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def mnist_test_split():
    return fu.load_dataset("mnist", root=SHARED_MNIST, train=False)


def raw_copy(stem: str, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(SHARED_MNIST / f"{stem}.gz") as src, open(destination, "wb") as dst:
        shutil.copyfileobj(src, dst)


def write_csv(path: Path, images: np.ndarray, labels: np.ndarray, header: bool = True) -> Path:
    """Kaggle's CSV form: a header row (label, then pixel names), then the label and 784 pixel values a row."""
    rows = np.concatenate([labels.reshape(-1, 1), images.reshape(len(images), -1)], axis=1).astype(np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        if header:
            f.write("label," + ",".join(f"pixel{i + 1}" for i in range(rows.shape[1] - 1)) + "\n")
        np.savetxt(f, rows, fmt="%d", delimiter=",")
    return path


def write_cifar(folder: Path, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10's python version: five training batches and a test batch, each a pickled dict with bytes keys
    holding uint8 rows of 3,072 values and a list of labels. Returns the training images [N, 3, 32, 32], labels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    images, labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        batch_labels = rng.integers(0, 10, count).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": batch_labels, b"data": data,
                         b"filenames": [f"{i}.png".encode() for i in range(count)]}, f, protocol=2)
        if name != "test_batch":
            images.append(data.reshape(-1, 3, 32, 32))
            labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels)


@pytest.mark.parametrize("layout", ["dotted", "dotted.gz", "nested", "nested.gz"])
def test_kaggle_namings_read_to_the_idx_files_values(tmp_path, no_default_data, mnist_test_split, layout):
    # Kaggle's most downloaded MNIST: train-images.idx3-ubyte files, and folders named like the files holding one each
    root = tmp_path / "kaggle" / "input" / "mnist-dataset"
    for stem in STEMS:
        name = stem.replace("-idx", ".idx") if layout.startswith("dotted") else stem
        target = root / name if layout.startswith("dotted") else root / stem / stem
        raw_copy(stem, target)
        if layout.endswith(".gz"):
            target.with_name(target.name + ".gz").write_bytes(gzip.compress(target.read_bytes(), compresslevel=1))
            target.unlink()
    images, labels = fu.load_dataset("mnist", root=tmp_path / "kaggle" / "input", train=False)
    assert torch.equal(images, mnist_test_split[0]) and torch.equal(labels, mnist_test_split[1])


def test_a_dataset_three_folders_down_is_found_and_the_shallowest_wins(tmp_path, no_default_data):
    deep_images, deep_labels = small_mnist(30, seed=1)
    write_mnist(tmp_path / "root" / "a" / "versions" / "1", deep_images, deep_labels)
    images, labels = fu.load_dataset("mnist", root=tmp_path / "root", train=False)
    assert torch.equal(images[:, 0], torch.from_numpy(deep_images)) and labels.tolist() == deep_labels.tolist()
    write_mnist(tmp_path / "root" / "b", *small_mnist(20, seed=2))
    assert len(fu.load_dataset("mnist", root=tmp_path / "root", train=False)[1]) == 20


def test_a_dataset_below_the_search_depth_is_not_found(tmp_path, no_default_data):
    write_mnist(tmp_path.joinpath("root", *"abcdefg"), *small_mnist(10))
    with pytest.raises(fu.DatasetNotFoundError, match="mnist_train.csv and mnist_test.csv"):
        fu.load_dataset("mnist", root=tmp_path / "root", download=False)


@pytest.mark.parametrize("header", [True, False])
def test_mnist_csv_files_read_to_the_idx_files_values(tmp_path, no_default_data, mnist_test_split, header):
    images, labels = (t.numpy() for t in mnist_test_split)
    write_csv(tmp_path / "csv" / "mnist_test.csv", images[:, 0], labels, header)
    write_csv(tmp_path / "csv" / "mnist_train.csv", images[:50, 0], labels[:50], header)
    loaded = fu.load_dataset("mnist", root=tmp_path / "csv", train=False)
    assert torch.equal(loaded[0], mnist_test_split[0]) and torch.equal(loaded[1], mnist_test_split[1])
    train_images, train_labels = fu.load_dataset("mnist", root=tmp_path / "csv", train=True)
    assert train_images.shape == (50, 1, 28, 28) and train_labels.dtype == torch.int64


def test_fashion_csv_files_are_fashion_and_not_mnist(tmp_path, no_default_data):
    images, labels = small_mnist(40)
    write_csv(tmp_path / "d" / "fashion-mnist_train.csv", images, labels)
    write_csv(tmp_path / "d" / "fashion-mnist_test.csv", images[:10], labels[:10])
    loaded, loaded_labels = fu.load_dataset("fashion_mnist", root=tmp_path / "d")
    assert torch.equal(loaded[:, 0], torch.from_numpy(images)) and loaded_labels.tolist() == labels.tolist()
    with pytest.raises(fu.DatasetNotFoundError, match="mnist not found"):
        fu.load_dataset("mnist", root=tmp_path / "d", download=False)


@pytest.mark.parametrize("damage,message", [
    (lambda rows: [r[:-1] for r in rows], r"783 pixel values a row where a 28x28 image needs 784"),
    (lambda rows: rows[:3] + [rows[3][:-1]] + rows[4:], r"number of columns changed"),
    (lambda rows: rows[:2] + [rows[2][:100] + ["256"] + rows[2][101:]] + rows[3:], r"data row 3: pixel 99 is 256"),
    (lambda rows: rows[:1] + [["x"] + rows[1][1:]] + rows[2:], r"not a CSV of a label and 784 pixel values"),
])
def test_a_malformed_csv_is_refused_naming_the_file(tmp_path, no_default_data, damage, message):
    images, labels = small_mnist(6)
    good = write_csv(tmp_path / "d" / "mnist_train.csv", images, labels)
    lines = good.read_text().splitlines()
    rows = damage([line.split(",") for line in lines[1:]])
    good.write_text(lines[0] + "\n" + "\n".join(",".join(row) for row in rows) + "\n")
    write_csv(tmp_path / "d" / "mnist_test.csv", images, labels)
    with pytest.raises(ValueError, match=message) as error:
        fu.load_dataset("mnist", root=tmp_path / "d")
    assert str(good) in str(error.value)


def test_a_csv_label_outside_the_classes_is_refused_naming_the_file(tmp_path, no_default_data):
    images, labels = small_mnist(6)
    labels[4] = 11
    path = write_csv(tmp_path / "d" / "mnist_test.csv", images, labels)
    write_csv(tmp_path / "d" / "mnist_train.csv", images, labels)
    with pytest.raises(ValueError, match=rf"{path} holds label 11: mnist has classes 0 to 9"):
        fu.load_dataset("mnist", root=tmp_path / "d", train=False)


def test_a_truncated_nested_idx_file_is_refused_naming_it(tmp_path, no_default_data):
    root = tmp_path / "input"
    for stem in STEMS:
        raw_copy(stem, root / stem / stem)
    broken = root / "t10k-images-idx3-ubyte" / "t10k-images-idx3-ubyte"
    broken.write_bytes(broken.read_bytes()[:5000])
    with pytest.raises(ValueError, match=f"{broken} holds 5,000 bytes where its header needs"):
        fu.load_dataset("mnist", root=root, train=False)


def test_cifar_batches_read_as_channels_first_images(tmp_path, no_default_data):
    images, labels = write_cifar(tmp_path / "x" / "cifar-10-batches-py", 8)
    loaded, loaded_labels = fu.load_dataset("cifar10", root=tmp_path / "x")
    assert loaded.shape == (40, 3, 32, 32) and loaded.dtype == torch.uint8
    assert torch.equal(loaded, torch.from_numpy(images)) and loaded_labels.tolist() == labels.tolist()
    # the first 1,024 values of a row are the red plane, row by row
    row = pickle.load(open(tmp_path / "x" / "cifar-10-batches-py" / "data_batch_1", "rb"), encoding="bytes")[b"data"][0]
    assert torch.equal(loaded[0, 0].flatten(), torch.from_numpy(row[:1024]))
    assert len(fu.load_dataset("cifar10", root=tmp_path / "x", train=False)[1]) == 8


class Payload:
    """What a crafted pickle could run: reading a batch must never call it."""

    def __reduce__(self):
        return (shutil.rmtree, ("/nonexistent-fedgan-test",))


def test_a_pickle_that_would_run_code_is_refused_naming_the_file(tmp_path, no_default_data):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, 4)
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({b"data": Payload(), b"labels": [0]}, f, protocol=2)
    with pytest.raises(ValueError, match=r"data_batch_2 is not a batch of CIFAR-10's python version .*shutil.rmtree"):
        fu.load_dataset("cifar10", root=tmp_path)


def test_a_cifar_batch_of_the_wrong_width_is_refused(tmp_path, no_default_data):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, 4)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 3000), np.uint8), b"labels": [0, 1, 2, 3]}, f, protocol=2)
    with pytest.raises(ValueError, match=r"test_batch: its data is uint8 of shape \(4, 3000\)"):
        fu.load_dataset("cifar10", root=tmp_path, train=False)


def end_to_end(tmp_path: Path, dataset: str, root: Path) -> dict:
    """Data, a Dirichlet partition, a smoke federation with its metrics, on the files under `root`."""
    config = fu.preset("smoke", dataset=dataset, data_root=str(root), partition="dirichlet", alpha=0.5, min_size=5,
                       out_dir=str(tmp_path / "out"), checkpoint_dir=str(tmp_path / "ck"), eval_samples=100,
                       classifier_subset=None, device="cpu")
    images, labels = fu.load_dataset(dataset, root)
    parts = fu.partition(labels, config.num_clients, config.partition, seed=config.seed, alpha=config.alpha,
                         min_size=config.min_size)
    assert sorted(torch.cat([torch.as_tensor(p) for p in parts]).tolist()) == list(range(len(labels)))
    federation = fu.Federation(config, log=False)
    federation.run(progress=False)
    metrics = federation.history[-1]["metrics"]
    assert federation.history[-1]["round"] == config.rounds
    assert all(math.isfinite(metrics[key]) for key in ("fid", "kid", "is", "cond_acc"))
    assert len(metrics["per_class_acc"]) == 10
    grid = fu.generate(fu.load_generator(federation.run_dir / f"round_{config.rounds:04d}.pt"), torch.arange(10))
    assert grid.shape == (10, *fu.DATASETS[dataset].image_shape)
    return metrics


@pytest.mark.parametrize("form", ["idx", "csv"])
def test_fashion_mnist_runs_end_to_end(tmp_path, no_default_data, form):
    images, labels = small_mnist(400, seed=3)
    root = tmp_path / "fashion-data"
    if form == "idx":
        write_mnist(root, images, labels, gz=True)
    else:
        write_csv(root / "fashion-mnist_train.csv", images, labels)
        write_csv(root / "fashion-mnist_test.csv", images[:200], labels[:200])
    end_to_end(tmp_path, "fashion_mnist", root)


def test_cifar10_runs_end_to_end(tmp_path, no_default_data):
    write_cifar(tmp_path / "c" / "cifar-10-batches-py", 80)
    end_to_end(tmp_path, "cifar10", tmp_path / "c")


def test_the_finder_looks_no_deeper_than_its_depth(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    found = list(fedgan_data._folders_under(tmp_path))
    assert found == [tmp_path, tmp_path / "a", tmp_path / "a" / "b"]
