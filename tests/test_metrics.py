"""Metrics: FID/KID/IS against torchmetrics, known cases on real MNIST, and the Evaluator's references."""

import pytest
import torch
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

import fedgan_utils as fu
from fedgan.metrics import INCEPTION_WEIGHTS_FILE
from helpers import write_mnist


class Identity(torch.nn.Module):
    """A 'feature extractor' that returns its input: lets torchmetrics score feature tensors we make."""

    def __init__(self, num_features):
        super().__init__()
        self.num_features = num_features

    def forward(self, x):
        return x


@pytest.fixture(scope="module")
def features():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(600, 8, generator=generator, dtype=torch.float64)
    b = torch.randn(500, 8, generator=generator, dtype=torch.float64) @ torch.diag(torch.linspace(0.5, 2, 8, dtype=torch.float64)) + 0.3
    return a, b


@pytest.fixture(scope="module")
def classifier(mnist):
    # one epoch on 10,000 images (97% accurate) is enough for the properties below; the 3-epoch classifier
    # of the cpu and full presets reaches 99%, which the notebooks print
    model, accuracy = fu.train_classifier("mnist", "cpu", epochs=1, train_subset=10000, log=False)
    assert accuracy > 0.95
    return model


@pytest.fixture(scope="module")
def mnist_test():
    return fu.load_dataset("mnist", train=False)


def test_frechet_distance_agrees_with_torchmetrics(features):
    a, b = features
    metric = FrechetInceptionDistance(feature=Identity(8))
    metric.update(a, real=True)
    metric.update(b, real=False)
    assert fu.frechet_distance(a, b) == pytest.approx(metric.compute().item(), rel=1e-6)


def test_kernel_distance_agrees_with_torchmetrics_on_the_full_set(features):
    a, b = features
    metric = KernelInceptionDistance(feature=Identity(8), subsets=1, subset_size=500)
    metric.update(a[:500], real=True)
    metric.update(b, real=False)
    mean, _ = metric.compute()
    assert fu.kernel_distance(a[:500], b, subsets=1, subset_size=500)[0] == pytest.approx(mean.item(), rel=1e-6)


def test_inception_score_agrees_with_torchmetrics_in_one_split(features):
    logits = features[0]
    metric = InceptionScore(feature=Identity(8), splits=1)
    metric.update(logits)
    assert fu.inception_score(logits, splits=1)[0] == pytest.approx(metric.compute()[0].item(), rel=1e-6)


def test_inception_score_is_1_for_one_class_and_num_classes_for_confident_balanced_ones():
    one_class = torch.zeros(100, 10)
    one_class[:, 3] = 50
    assert fu.inception_score(one_class, splits=1)[0] == pytest.approx(1.0)
    balanced = torch.full((100, 10), -50.0)
    balanced[torch.arange(100), torch.arange(100) % 10] = 50
    assert fu.inception_score(balanced, splits=1)[0] == pytest.approx(10.0, rel=1e-6)


def test_fid_of_a_set_against_itself_is_zero(classifier, mnist_test):
    images, _ = mnist_test
    feats, _ = fu.classifier_outputs(classifier, images[:2000])
    assert abs(fu.frechet_distance(feats, feats)) < 1e-6


def test_fid_grows_as_noise_is_added_to_real_images(classifier, mnist_test):
    images, _ = mnist_test
    real = fu.to_float_images(images[:2000])
    reference, _ = fu.classifier_outputs(classifier, fu.to_float_images(images[2000:4000]))
    generator = torch.Generator().manual_seed(0)
    fids = []
    for sigma in (0.0, 0.2, 0.5, 1.0):
        noisy = (real + sigma * torch.randn(real.shape, generator=generator)).clamp(-1, 1)
        fids.append(fu.frechet_distance(fu.classifier_outputs(classifier, noisy)[0], reference))
    assert fids == sorted(fids) and fids[-1] > 10 * fids[0]


def test_real_test_images_score_the_classifiers_accuracy_and_near_its_is_ceiling(classifier, mnist_test, mnist):
    images, labels = mnist_test
    evaluator = fu.Evaluator(classifier, images, labels, n=3000, train_images=mnist[0])
    picked = torch.randperm(10000, generator=torch.Generator().manual_seed(0))[:3000]  # the Evaluator's pick
    _, logits = fu.classifier_outputs(classifier, images[picked])
    accuracy = (logits.argmax(1) == evaluator.real_labels).double().mean().item()
    assert evaluator.reference["cond_acc"] == pytest.approx(accuracy)
    assert evaluator.reference["is"] > 8.0  # real, balanced, confidently classified: near the ceiling of 10
    assert 0 <= evaluator.reference["fid"] < 5  # train split vs test split: the floor


def test_an_untrained_generator_scores_far_worse_than_real_data(classifier, mnist_test, mnist):
    images, labels = mnist_test
    evaluator = fu.Evaluator(classifier, images, labels, n=500, train_images=mnist[0])
    metrics = evaluator(fu.Generator(z_dim=16, ngf=8))
    assert set(metrics) == {"fid", "kid", "kid_std", "is", "is_std", "cond_acc", "per_class_acc", "precision",
                            "recall", "density", "coverage", "per_class_coverage"}
    reference = evaluator.reference
    assert metrics["fid"] > 20 * reference["fid"] and metrics["kid"] > 20 * abs(reference["kid"])
    assert metrics["cond_acc"] < 0.5 and metrics["is"] < reference["is"]
    assert len(metrics["per_class_acc"]) == 10
    # real train images on the real test manifold: most inside it and covering it; an untrained G covers little
    assert reference["precision"] > 0.7 and reference["recall"] > 0.7 and reference["coverage"] > 0.8
    assert 0.6 < reference["density"] < 1.5
    assert metrics["coverage"] < 0.5 * reference["coverage"] and metrics["precision"] < reference["precision"]
    assert len(metrics["per_class_coverage"]) == 10 and all(0 <= c <= 1 for c in metrics["per_class_coverage"])


def test_evaluation_repeats_for_the_same_generator(classifier, mnist_test):
    images, labels = mnist_test
    generator = fu.Generator(z_dim=16, ngf=8)
    first = fu.evaluate(generator, classifier, images, labels, n=300)
    assert fu.evaluate(generator, classifier, images, labels, n=300) == first


def test_classifier_is_cached_and_reloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDGAN_CACHE", str(tmp_path))
    first, accuracy = fu.train_classifier("mnist", "cpu", epochs=1, train_subset=500, log=False)
    assert len(list((tmp_path / "classifiers").glob("mnist_e1_n500_s0-*.pt"))) == 1
    again, cached_accuracy = fu.train_classifier("mnist", "cpu", epochs=1, train_subset=500, log=False)
    assert cached_accuracy == accuracy
    for key, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[key])


def test_a_classifier_trained_on_another_folders_data_is_not_read_back_for_these(tmp_path, monkeypatch, mnist):
    """The cache finds a classifier by the data it was trained and tested on, not by the dataset's name: MNIST's
    images with every label moved by one, in a folder of their own, train a classifier of their own."""
    monkeypatch.setenv("FEDGAN_CACHE", str(tmp_path / "cache"))
    images, labels = (t[:2000].numpy() for t in mnist)
    other = write_mnist(tmp_path / "moved", images[:, 0], (labels + 1) % 10)
    moved, _ = fu.train_classifier("mnist", "cpu", epochs=1, train_subset=1000, data_root=str(other), log=False)
    real, accuracy = fu.train_classifier("mnist", "cpu", epochs=1, train_subset=1000, log=False)
    assert len(list((tmp_path / "cache" / "classifiers").glob("mnist_e1_n1000_s0-*.pt"))) == 2
    test_images, test_labels = fu.load_dataset("mnist", train=False)
    _, logits = fu.classifier_outputs(real, test_images[:1000])
    assert accuracy > 0.5 and (logits.argmax(1) == test_labels[:1000]).double().mean() > 0.5  # MNIST's own, not 0.05
    with pytest.raises(ValueError, match=r"train_subset=0 is not allowed: None \(every image\) or an integer"):
        fu.train_classifier("mnist", "cpu", epochs=1, train_subset=0, log=False)


def test_federation_evaluates_at_the_last_round_and_every_n(mnist_small, tiny_config):
    federation = fu.run_federation(tiny_config(rounds=3, eval_every=2, eval_samples=100, classifier_epochs=1,
                                               classifier_subset=1000), data=mnist_small, progress=False)
    assert ["metrics" in r for r in federation.history] == [False, True, True]
    assert {"fid", "cond_acc"} <= federation.history[-1]["metrics"].keys()
    assert {"fid", "is", "cond_acc", "classifier_test_accuracy"} <= federation.evaluator.reference.keys()
    never = fu.run_federation(tiny_config(rounds=1, eval_every=None), data=mnist_small, progress=False)
    assert "metrics" not in never.history[-1] and never.evaluator is None


def test_inception_fid_without_its_weights_is_skipped_with_one_line(capsys, mnist_test):
    images, _ = mnist_test
    result = fu.inception_fid(images[:10], images[10:20])
    lines = capsys.readouterr().out.strip().splitlines()
    if result is None:  # here: no torch-fidelity or no internet
        assert len(lines) == 1 and lines[0].startswith("Inception FID skipped: ")
    else:  # where the weights can be had, it is a real distance
        assert result >= 0


def test_images_of_the_wrong_shape_are_refused_by_the_metric_classifier():
    classifier = fu.Classifier()
    with pytest.raises(ValueError, match=r"images of shape \(4, 3, 28, 28\) given; the classifier takes a tensor "
                                         r"\[N, 1, 28, 28\]"):
        fu.classifier_outputs(classifier, torch.zeros(4, 3, 28, 28))


def write_inception_weights(path, seed=0):
    """A weights file in torch-fidelity's format: its Inception-v3 state dict, here of seeded random weights (the
    real file cannot be downloaded here)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # build the layers, load nothing
            return None

    empty = path.with_name("empty.pth")
    torch.save({}, empty)
    torch.manual_seed(seed)
    model = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    for module in model.modules():  # He initialisation: features that keep their scale through 90 layers
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    return write_inception_weights(tmp_path_factory.mktemp("inception") / INCEPTION_WEIGHTS_FILE)


def test_inception_fid_reads_its_weights_from_the_file_the_environment_names(inception_weights, mnist_test,
                                                                              monkeypatch, capsys):
    real, noise = mnist_test[0][:8], torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    monkeypatch.setenv("FEDGAN_INCEPTION_WEIGHTS", str(inception_weights))
    first = fu.inception_fid(real, noise)  # each call takes seconds: the 2048 x 2048 matrix square root
    assert first > 0 and "skipped" not in capsys.readouterr().out
    # the weights really are the file's: another file gives another distance
    second = write_inception_weights(inception_weights.with_name("second.pth"), seed=1)
    assert fu.inception_fid(real, noise, weights=second) != pytest.approx(first, rel=1e-3)


def test_inception_weights_that_are_missing_or_not_inceptions_are_a_clear_error(tmp_path, mnist_test):
    images = mnist_test[0][:4]
    with pytest.raises(FileNotFoundError, match=r"FEDGAN_INCEPTION_WEIGHTS=.*nowhere.pth: no such file; it should be "
                                                r"weights-inception-2015-12-05-6726825d.pth from https://github.com"):
        fu.inception_fid(images, images, weights=tmp_path / "nowhere.pth")
    torch.save({"fc.weight": torch.zeros(10, 2048)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"is not torch-fidelity's Inception-v3 weights: .* it holds \{'fc.weight': "
                                         r"\(10, 2048\)\}"):
        fu.inception_fid(images, images, weights=tmp_path / "other.pth")
    torch.save({"fc.weight": fu.FedConfig()}, tmp_path / "pickled.pth")  # more than tensors: not unpickled at all
    with pytest.raises(ValueError, match="not a state dict of tensors that loads with weights_only=True"):
        fu.inception_fid(images, images, weights=tmp_path / "pickled.pth")
