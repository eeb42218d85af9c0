"""Shared fixtures: real MNIST (from $FEDGAN_DATA, or ../shared/data/MNIST beside the repo) and tiny configs."""
import dataclasses
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
REPO = Path(__file__).resolve().parents[1]
if not os.environ.get("FEDGAN_DATA") and (REPO.parent / "shared" / "data" / "MNIST").is_dir():
    os.environ["FEDGAN_DATA"] = str(REPO.parent / "shared" / "data" / "MNIST")

# the metric classifier and staged datasets are cached; keep a test session's cache to itself
os.environ.setdefault("FEDGAN_CACHE", tempfile.mkdtemp(prefix="fedgan-test-cache-"))

# $FEDGAN_TEST_DEVICE=cuda runs the tiny federations on a GPU (benchmarks/gpu_session.sh); equivalence with the
# reference loop is then checked in full float32, TF32 off
TEST_DEVICE = os.environ.get("FEDGAN_TEST_DEVICE", "cpu")
if TEST_DEVICE == "cpu":  # the Triton convolution kernels then run on Triton's interpreter, set before they are made
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fedgan_utils as fu  # noqa: E402

if TEST_DEVICE.startswith("cuda"):
    import torch
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(scope="session")
def mnist():
    """The real MNIST training set: uint8 [60000, 1, 28, 28] and int64 [60000]."""
    return fu.load_dataset("mnist", train=True)


@pytest.fixture(scope="session")
def mnist_small(mnist):
    """The first 1,200 MNIST training images, for runs that must take a second."""
    images, labels = mnist
    return images[:1200], labels[:1200]


def with_engine(config, **options):
    """`config` with other EngineOptions: with_engine(config, client_map="vmap")."""
    return dataclasses.replace(config, engine=dataclasses.replace(config.engine, **options))


@pytest.fixture
def tiny_config(tmp_path):
    """A federation small enough for a unit test, writing into a temporary folder."""
    def make(**overrides):
        values = dict(num_clients=3, rounds=2, local_steps=3, batch_size=8, ngf=8, ndf=8, z_dim=8, embed_dim=4,
                      device=TEST_DEVICE, eval_every=None, out_dir=str(tmp_path / "outputs"),
                      checkpoint_dir=str(tmp_path / "checkpoints"))
        values.update(overrides)
        return fu.FedConfig(**values)
    return make
