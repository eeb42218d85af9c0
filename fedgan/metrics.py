"""FID, KID, IS and conditional accuracy in the features of a small classifier trained on the real data."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fedgan.checkpoints import load_checkpoint
from fedgan.checks import positive_int, require
from fedgan.config import DATASETS, FedConfig
from fedgan.data import cache_dir, load_dataset, to_float_images
from fedgan.digests import digest, tensor_digest
from fedgan.environment import pick_device
from fedgan.manifolds import knn_radii, manifold_metrics
from fedgan.models import Generator, generate

Tensor = torch.Tensor


MANIFOLD_K = 5  # k of the k-NN balls of precision, recall, density and coverage (Naeem et al.'s choice)
MANIFOLD_METRICS = ("precision", "recall", "density", "coverage")


# The standard FID needs Inception weights downloaded at run time; for MNIST-like data the field computes the
# same statistics in the feature space of a classifier trained on the real data ("Frechet LeNet distance").


class Classifier(nn.Module):
    """A small CNN on images in [-1, 1]; its penultimate layer (`features`) is the metric space."""

    def __init__(self, *, image_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10, width: int = 32,
                 num_features: int = 128):
        super().__init__()
        channels, height, width_px = image_shape
        self.config = dict(image_shape=tuple(image_shape), num_classes=num_classes, width=width,
                           num_features=num_features)
        self.num_features = num_features
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 5, padding=2), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 5, padding=2), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),  # (B, 2w, H/4, W/4) -> (B, 2w * H/4 * W/4)
            nn.Linear(2 * width * (height // 4) * (width_px // 4), num_features), nn.ReLU(), nn.Dropout(0.3))
        self.head = nn.Linear(num_features, num_classes)

    def features(self, images: Tensor) -> Tensor:
        return self.body(images)  # (B, num_features)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.body(images))  # (B, num_classes) logits


@torch.no_grad()
def classifier_outputs(classifier: Classifier, images: Tensor, batch_size: int = 1000) -> tuple[Tensor, Tensor]:
    """Penultimate features [N, F] and logits [N, classes] (float64, CPU) of float images in [-1, 1] or uint8."""
    expected = tuple(classifier.config["image_shape"])
    if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != expected:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images of shape {shape} given; the classifier takes a tensor "
                         f"[N, {', '.join(map(str, expected))}]")
    device = next(classifier.parameters()).device
    classifier.eval()
    features, logits = [], []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size].to(device)
        chunk = to_float_images(chunk) if chunk.dtype == torch.uint8 else chunk.float()
        f = classifier.features(chunk)
        features.append(f.double().cpu())
        logits.append(classifier.head(f).double().cpu())
    return torch.cat(features), torch.cat(logits)


def train_classifier(dataset: str = "mnist", device: str | torch.device | None = None, *, epochs: int = 3,
                     batch_size: int = 128, lr: float = 1e-3, seed: int = 0, train_subset: int | None = None,
                     data_root: str | None = None, cache: bool = True, log: bool = True) -> tuple[Classifier, float]:
    """Train (or load from the cache) the metric classifier; returns it in eval mode and its test accuracy.

    Cached in cache_dir()/classifiers/, found by everything that decides its weights: the dataset's train and test
    images and labels as found (another folder's data is another classifier), the training's settings and the
    architecture.
    """
    require(dataset in DATASETS, "dataset", dataset, f"one of {sorted(DATASETS)}")
    require(positive_int(epochs), "epochs", epochs, "an integer >= 1")
    require(train_subset is None or positive_int(train_subset), "train_subset", train_subset,
            "None (every image) or an integer >= 1")
    device = pick_device() if device is None else torch.device(device)
    info = DATASETS[dataset]
    images, labels = load_dataset(dataset, data_root, train=True)
    test_images, test_labels = load_dataset(dataset, data_root, train=False)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # leave the caller's RNG be
        torch.manual_seed(seed)
        classifier = Classifier(image_shape=info.image_shape, num_classes=info.num_classes).to(device)
        settings = dict(dataset=dataset, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                        train_subset=train_subset, classifier=classifier.config)
        key = digest(json.dumps(settings, sort_keys=True).encode(),
                     tensor_digest(images, labels, test_images, test_labels).encode())
        path = cache_dir() / "classifiers" / f"{dataset}_e{epochs}_n{train_subset or 'all'}_s{seed}-{key[:16]}.pt"
        if cache and path.is_file():
            saved = load_checkpoint(path, device)
            if saved.get("key") == key:  # not merely the first 16 digits of the same key
                classifier.load_state_dict(saved["classifier"])
                return classifier.eval(), saved["test_accuracy"]
        rng = np.random.default_rng(seed)
        if train_subset is not None:
            keep = torch.from_numpy(rng.choice(len(labels), min(train_subset, len(labels)), replace=False))
            images, labels = images[keep], labels[keep]
        optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
        decay = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.3)  # lr / 3.3 each epoch
        images, labels = images.to(device), labels.to(device)
        for _ in range(epochs):
            classifier.train()
            order = torch.from_numpy(rng.permutation(len(labels))).to(device)
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                loss = F.cross_entropy(classifier(to_float_images(images[idx])), labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            decay.step()
    _, logits = classifier_outputs(classifier, test_images)
    accuracy = (logits.argmax(1) == test_labels).double().mean().item()
    if log:
        print(f"metric classifier for {dataset}: {epochs} epochs on {len(labels):,} images, "
              f"test accuracy {accuracy:.4f}")
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + f".{os.getpid()}.partial")
        torch.save({"key": key, "classifier": classifier.state_dict(), "test_accuracy": accuracy}, partial)
        os.replace(partial, path)
    return classifier.eval(), accuracy


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets [N, F], in float64."""
    a, b = features_a.double(), features_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    # Tr((S_a S_b)^(1/2)) is the sum of the square roots of the eigenvalues of S_a S_b (real, >= 0)
    eigenvalues = torch.linalg.eigvals(cov_a @ cov_b).real.clamp(min=0)
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * eigenvalues.sqrt().sum())


def kernel_distance(features_a: Tensor, features_b: Tensor, *, subsets: int = 50, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """KID (Binkowski et al., 2018): unbiased MMD^2 with the kernel (x.y / F + 1)^3; mean and std over subsets."""
    a, b = features_a.double(), features_b.double()
    size = min(subset_size, len(a), len(b))
    generator = torch.Generator().manual_seed(seed)
    estimates = []
    for _ in range(subsets):
        x = a[torch.randperm(len(a), generator=generator)[:size]]
        y = b[torch.randperm(len(b), generator=generator)[:size]]
        k_xx, k_yy = (x @ x.T / a.shape[1] + 1) ** 3, (y @ y.T / a.shape[1] + 1) ** 3
        k_xy = (x @ y.T / a.shape[1] + 1) ** 3
        off_diagonal = size * (size - 1)
        estimates.append((k_xx.sum() - k_xx.trace()) / off_diagonal + (k_yy.sum() - k_yy.trace()) / off_diagonal
                         - 2 * k_xy.mean())
    values = torch.stack(estimates)
    return float(values.mean()), float(values.std(unbiased=False)) if subsets > 1 else 0.0


def inception_score(logits: Tensor, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))), mean and std over `splits` consecutive chunks; at most num_classes."""
    probabilities = logits.double().softmax(1)
    scores = []
    for chunk in probabilities.chunk(splits):
        marginal = chunk.mean(0, keepdim=True)
        kl = (chunk * (chunk.clamp_min(1e-12).log() - marginal.clamp_min(1e-12).log())).sum(1)
        scores.append(kl.mean().exp())
    values = torch.stack(scores)
    return float(values.mean()), float(values.std(unbiased=False)) if splits > 1 else 0.0


def _label_metrics(logits: Tensor, labels: Tensor, num_classes: int) -> tuple[float, list[float]]:
    hits = (logits.argmax(1) == labels.cpu()).double()
    per_class = [float(hits[labels.cpu() == c].mean()) if (labels == c).any() else float("nan")
                 for c in range(num_classes)]
    return float(hits.mean()), per_class


class Evaluator:
    """Scores generators against one real reference set, whose features are computed once.

    `reference` holds the real-vs-real values: FID and KID of `train_images` against the reference
    (the floor), IS and accuracy of the reference images themselves (the ceiling).
    """

    def __init__(self, classifier: Classifier, real_images: Tensor, real_labels: Tensor, *, n: int = 10000,
                 seed: int = 0, train_images: Tensor | None = None, kid_subsets: int = 50):
        require(positive_int(n), "n", n, "an integer >= 1")
        self.classifier, self.n, self.seed, self.kid_subsets = classifier, n, seed, kid_subsets
        self.num_classes = classifier.config["num_classes"]
        pick = torch.randperm(len(real_labels), generator=torch.Generator().manual_seed(seed))[:n]
        self.real_labels = real_labels[pick].cpu()
        self.real_features, real_logits = classifier_outputs(classifier, real_images[pick])
        accuracy, per_class = _label_metrics(real_logits, self.real_labels, self.num_classes)
        self.reference: dict[str, Any] = {"is": inception_score(real_logits)[0], "cond_acc": accuracy,
                                          "per_class_acc": per_class}
        self.real_radii = knn_radii(self.real_features, MANIFOLD_K)  # the real manifold's balls, computed once
        by_class = {c: self.real_features[self.real_labels == c] for c in range(self.num_classes)}
        self.real_by_class = {c: (features, knn_radii(features, MANIFOLD_K))  # each label's points and balls
                              for c, features in by_class.items() if len(features) > MANIFOLD_K}
        if train_images is not None:
            other = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed + 1))[:n]
            train_features, _ = classifier_outputs(classifier, train_images[other])
            self.reference["fid"] = frechet_distance(train_features, self.real_features)
            self.reference["kid"], self.reference["kid_std"] = self._kid(train_features)
            self.reference.update(manifold_metrics(self.real_features, train_features, MANIFOLD_K, self.real_radii))

    def _coverage_per_class(self, features: Tensor, labels: Tensor) -> list[float]:
        """Coverage of each label's real points by the samples asked for that label (nan: too few of either)."""
        coverage = []
        for c in range(self.num_classes):
            fake = features[labels == c]
            if c not in self.real_by_class or len(fake) <= MANIFOLD_K:
                coverage.append(math.nan)
                continue
            real, radii = self.real_by_class[c]
            coverage.append(manifold_metrics(real, fake, MANIFOLD_K, radii)["coverage"])
        return coverage

    def _kid(self, features: Tensor) -> tuple[float, float]:
        return kernel_distance(features, self.real_features, subsets=self.kid_subsets, seed=self.seed)

    def __call__(self, generator: Generator) -> dict[str, Any]:
        """fid, kid, kid_std, is, is_std, cond_acc, per_class_acc, precision, recall, density, coverage and
        per_class_coverage of `n` class-balanced samples of `generator`."""
        labels = torch.arange(self.n) % self.num_classes  # balanced requests
        samples = torch.cat([generate(generator, labels[i:i + 1000], seed=self.seed + i)
                             for i in range(0, self.n, 1000)])
        if not torch.isfinite(samples).all():  # a diverged generator: nothing to measure
            return {**dict.fromkeys(("fid", "kid", "kid_std", "is", "is_std", "cond_acc", *MANIFOLD_METRICS), math.nan),
                    **dict.fromkeys(("per_class_acc", "per_class_coverage"), [math.nan] * self.num_classes),
                    "non_finite_samples": True}
        features, logits = classifier_outputs(self.classifier, samples)
        accuracy, per_class = _label_metrics(logits, labels, self.num_classes)
        kid, kid_std = self._kid(features)
        score, score_std = inception_score(logits)
        return {"fid": frechet_distance(features, self.real_features), "kid": kid, "kid_std": kid_std,
                "is": score, "is_std": score_std, "cond_acc": accuracy, "per_class_acc": per_class,
                **manifold_metrics(self.real_features, features, MANIFOLD_K, self.real_radii),
                "per_class_coverage": self._coverage_per_class(features, labels)}


def evaluate(generator: Generator, classifier: Classifier, real_images: Tensor, real_labels: Tensor,
             n: int = 10000, seed: int = 0) -> dict[str, Any]:
    """One-off evaluation of `generator` (see Evaluator, which caches the real features across calls)."""
    return Evaluator(classifier, real_images, real_labels, n=n, seed=seed)(generator)


def make_evaluator(config: FedConfig, train_images: Tensor, device: str | torch.device | None = None, *,
                   log: bool = True) -> Evaluator:
    """The Evaluator a Federation of `config` scores with: its metric classifier (trained once, then cached), the
    real reference, and the classifier's test accuracy in `reference`."""
    classifier, accuracy = train_classifier(
        config.dataset, device, epochs=config.classifier_epochs, seed=config.seed,
        train_subset=config.classifier_subset, data_root=config.data_root, log=log)
    test_images, test_labels = load_dataset(config.dataset, config.data_root, train=False)
    evaluator = Evaluator(classifier, test_images, test_labels, n=config.eval_samples, seed=config.seed,
                          train_images=train_images)
    evaluator.reference["classifier_test_accuracy"] = accuracy
    return evaluator


INCEPTION_WEIGHTS_ENV = "FEDGAN_INCEPTION_WEIGHTS"
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's, of its v0.2.0 release
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
INCEPTION_SHAPES = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "fc.weight": (1008, 2048)}  # two of its tensors


def check_inception_weights(path: Path) -> None:
    """`path` must be torch-fidelity's Inception-v3 state dict: loaded here with weights_only=True first, since
    torch-fidelity itself unpickles it without that guard."""
    if not path.is_file():
        raise FileNotFoundError(f"{INCEPTION_WEIGHTS_ENV}={path}: no such file; it should be {INCEPTION_WEIGHTS_FILE} "
                                f"from {INCEPTION_WEIGHTS_URL}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # not a torch file, or one holding more than tensors
        raise ValueError(f"{path} is not a state dict of tensors that loads with weights_only=True ({error})"
                         ) from error
    shapes = {key: tuple(state[key].shape) for key in INCEPTION_SHAPES if isinstance(state, dict) and key in state}
    if shapes != INCEPTION_SHAPES:
        raise ValueError(f"{path} is not torch-fidelity's Inception-v3 weights: it should hold {INCEPTION_SHAPES}, "
                         f"it holds {shapes or 'neither'}; the file is {INCEPTION_WEIGHTS_FILE} from "
                         f"{INCEPTION_WEIGHTS_URL}")


def inception_fid(real_images: Tensor, fake_images: Tensor, device: str | torch.device = "cpu",
                  batch_size: int = 200, weights: str | os.PathLike | None = None) -> float | None:
    """The standard FID in Inception-v3 features, computed by torchmetrics (through torch-fidelity).

    `weights` (default: $FEDGAN_INCEPTION_WEIGHTS) is a local copy of torch-fidelity's weights file, for machines
    without internet; given, every failure is an error. Without it the weights are downloaded, and offline or
    without torch-fidelity one line says the FID was skipped and why, and None is returned.
    Images: float in [-1, 1] or uint8, [N, C, H, W]; grey images are repeated to 3 channels.
    """
    weights = weights or os.environ.get(INCEPTION_WEIGHTS_ENV) or None
    if weights is not None:
        check_inception_weights(Path(weights))
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        metric = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=(
            str(weights) if weights is not None else None)).to(device)
    except Exception as error:  # torch-fidelity missing, weights not downloadable: both mean "not here"
        if weights is not None:
            raise
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"Inception FID skipped: {reason} (offline: set {INCEPTION_WEIGHTS_ENV} to a local copy of "
              f"{INCEPTION_WEIGHTS_FILE})")
        return None
    for images, real in ((real_images, True), (fake_images, False)):
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size].to(device)
            chunk = to_float_images(chunk) if chunk.dtype == torch.uint8 else chunk.float()
            chunk = ((chunk + 1) / 2).clamp(0, 1).expand(-1, 3, -1, -1)  # (B, 1|3, H, W) -> (B, 3, H, W) in [0, 1]
            metric.update(chunk, real=real)
    return float(metric.compute())
