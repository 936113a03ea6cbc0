"""The data protocol: tensors, tuples and dicts from Datasets, DataLoaders and plain iterables."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowbit.data import DataSplits, as_splits, get_data, iterate, num_batches, num_examples, split_batch
from lowbit.data.protocol import call_model, head, logits_of, to_device
from lowbit.errors import LowbitError


class Dicts(torch.utils.data.Dataset):
    def __init__(self, n):
        self.x = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"features": self.x[i], "mask": torch.ones(3), "labels": torch.tensor(i % 2)}


def test_split_batch_kinds():
    x, y = torch.zeros(4, 3), torch.arange(4)
    assert split_batch(x)[1] is None and split_batch(x)[0] is x
    assert split_batch((x, y))[1] is y
    assert split_batch([x])[1] is None
    inputs, target = split_batch((x, x, y))
    assert isinstance(inputs, tuple) and len(inputs) == 2 and target is y
    inputs, target = split_batch({"input_ids": x, "attention_mask": x, "labels": y})
    assert set(inputs) == {"input_ids", "attention_mask"} and target is y
    inputs, target = split_batch({"input_ids": x})
    assert target is None and set(inputs) == {"input_ids"}
    with pytest.raises(LowbitError, match="a batch must be"):
        split_batch(3.0)


def test_call_model_by_kind():
    class Two(nn.Module):
        def forward(self, a, b=None):
            return a if b is None else a + b

    m, x = Two(), torch.ones(2)
    assert call_model(m, x).sum() == 2
    assert call_model(m, (x, x)).sum() == 4
    assert call_model(m, {"a": x, "b": x}).sum() == 4


def test_helpers_on_nested_batches():
    batch = {"a": torch.zeros(5, 2), "b": (torch.ones(5), [torch.ones(5, 1)])}
    h = head(batch, 2)
    assert h["a"].shape == (2, 2) and h["b"][0].shape == (2,) and h["b"][1][0].shape == (2, 1)
    assert to_device(batch, "cpu")["b"][1][0].device.type == "cpu"
    assert logits_of({"logits": torch.ones(1)}).shape == (1,)
    assert logits_of((torch.zeros(2), torch.ones(3))).shape == (2,)


def test_map_style_dataset_order_depends_on_seed_and_epoch_only():
    ds = TensorDataset(torch.arange(50).float()[:, None], torch.arange(50))
    def order(**kw):
        return torch.cat([y for _, y in iterate(ds, 8, train=True, **kw)]).tolist()

    a = order(seed=1, epoch=0)
    assert a == order(seed=1, epoch=0) and sorted(a) == list(range(50))
    assert a != order(seed=1, epoch=1) and a != order(seed=2, epoch=0)
    assert torch.cat([y for _, y in iterate(ds, 8)]).tolist() == list(range(50))  # evaluation: in order
    assert sum(len(y) for _, y in iterate(ds, 8, limit=20)) == 20
    shards = [set(torch.cat([y for _, y in iterate(ds, 8, train=True, shard=(r, 2))]).tolist()) for r in range(2)]
    assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(50))
    assert num_examples(ds) == 50 and num_batches(ds, 8) == 7 and num_batches(ds, 8, limit=20) == 3


def test_dict_dataset_is_collated_into_dict_batches():
    batches = list(iterate(Dicts(10), 4))
    assert len(batches) == 3 and set(batches[0]) == {"features", "mask", "labels"}
    assert batches[0]["features"].shape == (4, 3) and batches[-1]["labels"].shape == (2,)


def test_dataloader_and_plain_iterables():
    ds = TensorDataset(torch.randn(30, 2), torch.arange(30))
    loader = DataLoader(ds, batch_size=7, shuffle=True)
    a = [y.tolist() for _, y in iterate(loader, 999, train=True, seed=3, epoch=1)]
    b = [y.tolist() for _, y in iterate(loader, 999, train=True, seed=3, epoch=1)]
    assert a == b and len(a) == 5  # the loader keeps its batch size; its shuffle is seeded per (seed, epoch)
    assert num_examples(loader) == 30 and num_batches(loader, 999) == 5
    batches = [(torch.randn(4, 2), torch.zeros(4, dtype=torch.long)) for _ in range(3)]
    assert num_examples(batches) == 12 and num_batches(batches, 1) == 3
    assert len(list(iterate(batches, 1, limit=5))) == 2
    with pytest.raises(LowbitError, match="cannot be split over torchrun"):
        list(iterate(loader, 8, shard=(0, 2)))


def test_augmentation_is_never_applied_to_user_data():
    ds = TensorDataset(torch.randn(8, 1, 4, 4), torch.zeros(8, dtype=torch.long))
    with pytest.raises(LowbitError, match="augment your own data"):
        list(iterate(ds, 4, train=True, augmentation="flip"))
    x = torch.cat([x for x, _ in iterate(ds, 4, train=True, augmentation=None, seed=0)])
    assert torch.equal(x.sort(0).values, ds.tensors[0].sort(0).values)  # same examples, untouched


def test_builtin_sets_keep_their_own_augmentation():
    data = get_data("synthetic")
    assert data.train.augmentation == "flip" and data.val.augmentation == "none"


def test_as_splits_holds_out_a_seeded_validation_split():
    ds = TensorDataset(torch.randn(100, 3), torch.arange(100))
    s = as_splits({"train": ds, "test": ds}, "mine")
    assert num_examples(s.train) == 90 and num_examples(s.val) == 10 and s.test is ds
    again = as_splits((ds, None), "mine")
    assert list(again.val.indices) == list(s.val.indices)
    assert num_examples(as_splits((ds, None), val_fraction=0.25).val) == 25
    assert as_splits((ds, ds)).test is None
    with pytest.raises(LowbitError, match="cannot be split"):
        as_splits({"train": DataLoader(ds)})
    with pytest.raises(LowbitError, match="expected keys"):
        as_splits({"training": ds})
    with pytest.raises(LowbitError, match="expected DataSplits"):
        as_splits(ds)
    with pytest.raises(LowbitError, match="must be a torch Dataset"):
        DataSplits("train.csv", ds)


def test_input_shape_and_classes_of_user_data():
    ds = TensorDataset(torch.randn(8, 3, 5, 5), torch.zeros(8, dtype=torch.long))
    s = DataSplits(ds, ds)
    assert s.input_shape == (3, 5, 5) and s.num_classes is None
    assert DataSplits(Dicts(4), Dicts(4)).input_shape is None
