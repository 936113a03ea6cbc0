import os

import pytest
import torch

from lowbit.data import augment, get_data, iterate, split_train_val, synthetic
from lowbit.errors import LowbitError
from tests.conftest import FMNIST_DIR


def test_split_is_fixed_disjoint_and_complete():
    tr1, va1 = split_train_val(1000, 100)
    tr2, va2 = split_train_val(1000, 100)
    assert torch.equal(tr1, tr2) and torch.equal(va1, va2)
    assert len(va1) == 100 and len(tr1) == 900
    assert len(set(tr1.tolist()) | set(va1.tolist())) == 1000
    assert not set(tr1.tolist()) & set(va1.tolist())


def test_split_rejects_bad_sizes():
    with pytest.raises(LowbitError):
        split_train_val(10, 10)


def test_training_order_depends_only_on_seed_and_epoch():
    ds = synthetic(n_train=64).train
    a = [x for x, _ in iterate(ds, 16, train=True, seed=3, epoch=2)]
    b = [x for x, _ in iterate(ds, 16, train=True, seed=3, epoch=2)]
    c = [x for x, _ in iterate(ds, 16, train=True, seed=3, epoch=1)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))


def test_eval_iteration_is_plain_and_normalised():
    ds = synthetic(n_train=10).train
    (x, y), = list(iterate(ds, 64))
    assert torch.allclose(x, (ds.images.float() / 255 - ds.mean) / ds.std)
    assert torch.equal(y, ds.labels)


def test_augment_crops_and_flips_within_padding():
    x = torch.arange(4 * 1 * 6 * 6, dtype=torch.float32).reshape(4, 1, 6, 6)
    out = augment(x, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == x.shape
    # with pad 0 and no flip the augmentation is the identity
    assert torch.equal(augment(x, torch.Generator().manual_seed(0), pad=0, flip=False), x)


def test_limit_takes_a_fraction_of_an_epoch():
    ds = synthetic(n_train=100).train
    assert sum(len(y) for _, y in iterate(ds, 32, train=True, limit=40)) == 40


def test_unknown_dataset():
    with pytest.raises(LowbitError, match="unknown data set"):
        get_data("cifar")


@pytest.mark.skipif(not os.path.exists(os.path.join(FMNIST_DIR, "train-images-idx3-ubyte.gz")),
                    reason="Fashion-MNIST not installed")
def test_real_fashion_mnist_split_sizes():
    d = get_data("fashion-mnist", FMNIST_DIR)
    assert (len(d.train), len(d.val), len(d.test)) == (55000, 5000, 10000)
    assert d.train.labels.bincount().min() > 5000
    d = get_data("fashion-mnist", FMNIST_DIR, val_fraction=0.1)
    assert (len(d.train), len(d.val)) == (54000, 6000)


def test_options_a_data_set_cannot_honour_are_errors():
    with pytest.raises(LowbitError, match="--image-size applies to --data imagefolder"):
        get_data("synthetic", image_size=32)
    with pytest.raises(LowbitError, match="--val-fraction does not apply"):
        get_data("synthetic", val_fraction=0.2)
    with pytest.raises(LowbitError, match=r"--val-fraction must be in \(0, 1\)"):
        get_data("fashion-mnist", val_fraction=1.0)
    assert len(get_data("synthetic", workers=2).train) == 512  # in-memory sets need no loader workers


def test_geometric_augmentation_refuses_per_pixel_labels():
    ds = synthetic(n_train=8).train
    dense = type(ds)(ds.images, torch.zeros(len(ds), 28, 28, dtype=torch.int64), ds.mean, ds.std, 2)
    with pytest.raises(LowbitError, match="per-pixel"):
        next(iterate(dense, 4, train=True, augmentation="flip"))
    x, y = next(iterate(dense, 4, train=True, augmentation="none"))
    assert y.shape == (4, 28, 28)
