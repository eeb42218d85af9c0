"""Helpers shared by the test files: state comparisons, a one-round local training, a convolution counter, small
MNIST-like idx files."""
import gzip
from pathlib import Path

import numpy as np
import torch

import fedgan_utils as fu


def assert_states_close(actual, expected, atol=2e-5):
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        torch.testing.assert_close(actual[key], expected[key], atol=atol, rtol=1e-4, msg=key)


def local_training(config, prox_mu=0.0):
    return fu.LocalTraining(lr_g=config.lr_g, lr_d=config.lr_d, betas=config.betas, prox_mu=prox_mu)


def train_tiny(config, images, labels):
    torch.manual_seed(0)
    generator, discriminator = (m.to(images.device) for m in fu.build_models(config))
    plan = fu.plan_round(config, fu.partition(labels.cpu().numpy(), config.num_clients, seed=config.seed), 1)
    count = config.num_clients
    return fu.train_clients(generator, discriminator, fu.broadcast(generator.state_dict(), count),
                            fu.broadcast(discriminator.state_dict(), count), images, labels, plan,
                            local_training(config), config.engine)


class ConvolutionGroups(torch.utils._python_dispatch.TorchDispatchMode):
    """The groups of every convolution run, by (transposed, number of input channels)."""

    def __init__(self):
        super().__init__()
        self.groups = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.groups.setdefault((args[6], args[0].shape[1]), set()).add(args[8])
        return func(*args, **(kwargs or {}))


def states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def stacked_rows(*rows):
    return {"w": torch.tensor(rows, dtype=torch.float64)}


class BestHalf(fu.Strategy):
    """A custom rule as the notebook writes one: FedAvg of the clients whose update is no larger than the median."""

    def aggregate(self, global_state, client_states, weights, info=None):
        keys = [k for k, v in client_states.items() if v.dtype.is_floating_point]
        norms = fu.update_norms(global_state, client_states, keys)
        keep = norms <= norms.median()
        self.last_log = {"kept": int(keep.sum())}
        return fu.fedavg_stacked({k: v[keep] for k, v in client_states.items()}, np.asarray(weights)[keep.numpy()])


def random_states(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(3, 4, generator=generator), "b": torch.randn(5, generator=generator),
             "num_batches_tracked": torch.tensor(i)} for i in range(count)]


STEMS = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """An idx file of unsigned bytes as the MNIST distribution writes them: magic, big-endian dims, the bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def write_mnist(folder: Path, images: np.ndarray, labels: np.ndarray, *, gz: bool = False) -> Path:
    """The four idx files of a small MNIST-like dataset: the same images and labels as train and test split."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "t10k"):
        write_idx(folder / f"{split}-images-idx3-ubyte", images, gz)
        write_idx(folder / f"{split}-labels-idx1-ubyte", labels, gz)
    return folder


def small_mnist(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, 28, 28), dtype=np.uint8), rng.integers(0, 10, count, dtype=np.uint8)
