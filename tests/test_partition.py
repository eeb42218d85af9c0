"""partition: invariants for every scheme, the skew each produces, and errors for bad arguments."""
import numpy as np
import pytest

import fedgan_utils as fu

LABELS = np.repeat(np.arange(10), 100)  # 1,000 labels, 100 of each class
SCHEMES = [("iid", {}), ("dirichlet", {"alpha": 0.3}), ("shards", {"shards_per_client": 2}),
           ("classes", {"classes_per_client": 3}), ("quantity", {"sigma": 1.5})]


@pytest.mark.parametrize("scheme,kw", SCHEMES)
def test_every_index_is_held_exactly_once(scheme, kw):
    parts = fu.partition(LABELS, 10, scheme, seed=1, **kw)
    assert len(parts) == 10
    assert all(p.dtype == np.int64 for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))


@pytest.mark.parametrize("scheme,kw", SCHEMES)
def test_a_seed_gives_the_same_split_and_another_seed_another(scheme, kw):
    first, again, other = (fu.partition(LABELS, 10, scheme, seed=s, **kw) for s in (1, 1, 2))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_iid_gives_equal_sizes_and_every_label_everywhere():
    counts = fu.partition_report(LABELS, fu.partition(LABELS, 10, "iid"))
    assert counts.sum(1).tolist() == [100] * 10
    assert (counts > 0).all()


def test_smaller_dirichlet_alpha_skews_labels_more():
    def skew(alpha):  # mean share of a client's most common label
        counts = fu.partition_report(LABELS, fu.partition(LABELS, 10, "dirichlet", alpha=alpha, min_size=1))
        return (counts.max(1) / counts.sum(1)).mean()
    assert skew(0.1) > skew(1.0) > skew(100.0)
    assert skew(100.0) < 0.2


def test_dirichlet_keeps_min_size():
    parts = fu.partition(LABELS, 20, "dirichlet", alpha=0.1, min_size=15)
    assert min(len(p) for p in parts) >= 15


def test_shards_of_sorted_labels_give_each_client_few_labels():
    counts = fu.partition_report(LABELS, fu.partition(LABELS, 10, "shards", shards_per_client=2))
    assert counts.sum(1).tolist() == [100] * 10
    assert ((counts > 0).sum(1) <= 2).all()  # 50-image shards never straddle a 100-image class here


def test_classes_gives_each_client_exactly_its_labels():
    counts = fu.partition_report(LABELS, fu.partition(LABELS, 10, "classes", classes_per_client=3))
    assert ((counts > 0).sum(1) == 3).all()
    assert (counts.sum(0) == 100).all()


def test_quantity_skew_varies_sizes_but_not_label_mix():
    parts = fu.partition(LABELS, 10, "quantity", sigma=1.5, min_size=20)
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 20 and sizes.max() > 2 * sizes.min()
    assert fu.partition(LABELS, 4, "quantity", sigma=0.0, min_size=0)[0].size == 250  # sigma 0: equal


def test_partition_accepts_torch_labels(mnist_small):
    _, labels = mnist_small
    parts = fu.partition(labels, 4, "dirichlet", alpha=0.5)
    assert sum(len(p) for p in parts) == len(labels)
    assert fu.partition_report(labels, parts).sum() == len(labels)


@pytest.mark.parametrize("args,kw,message", [
    ((LABELS, 0), {}, "num_clients=0 is not allowed"),
    ((LABELS, 1001), {}, "num_clients=1001 is not allowed"),
    ((LABELS, 5, "random"), {}, "scheme='random' is not allowed"),
    ((LABELS, 5, "iid"), {"alpha": 0.5}, r"scheme='iid' takes no parameters, not \['alpha'\]"),
    ((LABELS, 5, "dirichlet"), {"alpha": 0.0}, "alpha=0.0 is not allowed: a number > 0"),
    ((LABELS, 5, "dirichlet"), {"min_size": 300}, "min_size=300 is not allowed"),
    ((LABELS, 5, "shards"), {"shards_per_client": 0}, "shards_per_client=0 is not allowed"),
    ((LABELS, 600, "shards"), {"shards_per_client": 2}, "1200 shards > 1000 images"),
    ((LABELS, 5, "classes"), {"classes_per_client": 11}, "the labels hold only 10 classes"),
    ((LABELS, 3, "classes"), {"classes_per_client": 2}, "num_clients x classes_per_client >= 10"),
    ((LABELS, 5, "quantity"), {"sigma": -1}, "sigma=-1 is not allowed"),
    ((LABELS.reshape(10, 100), 5), {}, "labels must be a 1-D integer array"),
    ((LABELS.astype(float), 5), {}, "labels must be a 1-D integer array"),
    ((LABELS, 5, "iid", -1), {}, "seed=-1 is not allowed"),
])
def test_bad_arguments_raise_a_clear_value_error(args, kw, message):
    with pytest.raises(ValueError, match=message):
        fu.partition(*args, **kw)


def test_report_counts_each_clients_labels():
    parts = [np.array([0, 1, 100]), np.array([200, 201])]
    assert fu.partition_report(LABELS, parts, num_classes=3).tolist() == [[2, 1, 0], [0, 0, 2]]
