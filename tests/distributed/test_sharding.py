"""Data-parallel pieces that need no second process: shards, the no-op helpers, rank-0-only files, bf16."""

import pytest
import torch

from lowbit import distributed as dist
from lowbit.data import DataSplits, TensorDataset, iterate, synthetic
from lowbit.errors import LowbitError
from lowbit.models import create_model
from lowbit.runs import RunDir
from lowbit.train import FitConfig, fit


def _indexed(n: int) -> TensorDataset:
    """Labels are the example indices, so the batches say which examples a rank saw."""
    return TensorDataset(torch.zeros(n, 1, 2, 2, dtype=torch.uint8), torch.arange(n), 0.0, 1.0, n)


def _seen(ds, world, **kw) -> list[list[int]]:
    return [[i for _, y in iterate(ds, 3, shard=(r, world), augmentation="none", **kw) for i in y.tolist()]
            for r in range(world)]


@pytest.mark.parametrize("n,world,limit", [(10, 2, None), (11, 3, None), (7, 4, 5), (16, 1, 9), (5, 5, None)])
@pytest.mark.parametrize("train", [True, False])
def test_shards_are_disjoint_and_cover_the_epoch(n, world, limit, train):
    ds = _indexed(n)
    parts = _seen(ds, world, train=train, seed=3, epoch=2, limit=limit)
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat))  # disjoint
    whole = [i for _, y in iterate(ds, 4, train=train, seed=3, epoch=2, limit=limit, augmentation="none")
             for i in y.tolist()]
    assert sorted(flat) == sorted(whole)  # together: exactly the one-process epoch
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_every_rank_draws_the_same_order_and_a_new_one_each_epoch():
    ds = _indexed(12)
    e0, e1 = _seen(ds, 2, train=True, seed=0, epoch=0), _seen(ds, 2, train=True, seed=0, epoch=1)
    order0 = [i for _, y in iterate(ds, 12, train=True, seed=0, epoch=0, augmentation="none") for i in y.tolist()]
    assert e0[0] == order0[0::2] and e0[1] == order0[1::2]
    assert e0 != e1


def test_bad_shards_and_unsplittable_data_are_one_line_errors():
    with pytest.raises(LowbitError, match="rank"):
        next(iterate(_indexed(4), 2, shard=(2, 2)))

    class Folder:  # like FolderDataset: its own batches(), without a shard keyword
        def __len__(self):
            return 4

        def batches(self, batch_size, *, train, seed, epoch, device, limit):
            yield torch.zeros(1), torch.zeros(1)

    with pytest.raises(LowbitError, match="one process"):
        next(iterate(Folder(), 2, shard=(0, 2)))
    assert len(list(iterate(Folder(), 2, shard=(0, 1)))) == 1  # one rank: nothing to split


def test_helpers_are_no_ops_in_a_plain_process():
    assert not dist.init_from_env("cpu") and not dist.initialized()
    assert (dist.rank(), dist.world_size(), dist.is_main()) == (0, 1, True)
    dist.barrier()
    t = torch.tensor([1.5, 2.0])
    assert dist.all_reduce_sum(t) is t and t.tolist() == [1.5, 2.0]
    assert dist.broadcast_(t) is t
    assert dist.broadcast_object({"a": 1}) == {"a": 1} and dist.all_gather_object(3) == [3]


def test_only_rank_0_touches_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")  # torchrun's variables, before any process group exists
    assert (dist.rank(), dist.world_size(), dist.is_main()) == (1, 2, False)
    run = RunDir(tmp_path / "r")
    run.write_config({"a": 1})
    run.write_summary({"a": 1})
    run.write_metrics([{"epoch": 1}])
    run.write_report("# r")
    assert not (tmp_path / "r").exists()
    monkeypatch.setenv("RANK", "0")
    RunDir(tmp_path / "r").write_summary({"a": 1})
    assert (tmp_path / "r" / "summary.json").exists()


def test_amp_must_be_bf16():
    with pytest.raises(LowbitError, match="bf16"):
        FitConfig(amp="fp16")


def test_bf16_autocast_trains():
    torch.manual_seed(0)
    data = synthetic(n_train=64, n_val=32, n_test=32)
    model = create_model("mlp", 10)
    state = fit(model, data, FitConfig(epochs=1, batch_size=16, lr=0.05, amp="bf16", quiet=True))
    row = state.rows[0]
    assert torch.isfinite(torch.tensor(row["train_loss"])) and 0 <= row["train_acc"] <= 1
    assert next(model.parameters()).dtype == torch.float32  # autocast leaves the weights in float32


def test_per_pixel_targets_train_and_report_pixel_accuracy():
    torch.manual_seed(0)

    def seg(n):
        x = torch.randint(0, 255, (n, 1, 6, 6), dtype=torch.uint8)
        return TensorDataset(x, (x[:, 0] > 127).long(), 0.5, 0.25, 2)  # (N, H, W) masks

    data = DataSplits(seg(32), seg(16), seg(16), "seg")
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
    state = fit(model, data, FitConfig(epochs=2, batch_size=8, lr=0.1, augmentation="none", quiet=True))
    for row in state.rows:
        assert 0 <= row["train_acc"] <= 1 and 0 <= row["val_acc"] <= 1
    assert state.rows[-1]["val_acc"] > 0.6
