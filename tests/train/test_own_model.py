"""fit / evaluate / calibrate_ on models and data the user wrote: tensors, tuples, dicts, own loss and metric."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowbit.data import DataSplits
from lowbit.errors import LowbitError
from lowbit.quant import Plan, calibrate_, quant_layers, quantize_
from lowbit.train import FitConfig, FitState, evaluate, fit
from lowbit.train.loop import distill_loss


class ViewCNN(nn.Module):
    """Ordinary user code: flattening with ``x.view(x.size(0), -1)`` breaks under channels-last."""

    def __init__(self, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.fc(x.view(x.size(0), -1))


class Regressor(nn.Module):
    """Called as ``model(features=..., scale=...)`` from dict batches."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 16), nn.Linear(16, 1)

    def forward(self, features, scale):
        return self.b(F.relu(self.a(features))).squeeze(-1) * scale


class Rows(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 5, generator=g)
        self.y = self.x[:, 0] - 0.5 * self.x[:, 1]

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"features": self.x[i], "scale": torch.tensor(1.0), "target": self.y[i]}


def mse(out, batch):
    return F.mse_loss(out, batch["target"])


def neg_mse(model, data):
    return -evaluate(model, data, loss_fn=mse)[0]


def _images(n=96, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 1, 16, 16, generator=g) * 0.3
    for k in range(classes):
        x[y == k, :, 5 * k:5 * k + 5] += 1.5
    return TensorDataset(x, y)


def test_fit_on_a_model_that_views_after_convs():
    model = ViewCNN()
    data = DataSplits(_images(), _images(48, seed=1))
    state = fit(model, data, FitConfig(epochs=3, lr=0.05, batch_size=16, quiet=True))
    assert state.rows[-1]["val_acc"] > 0.6 and state.rows[-1]["train_acc"] is not None
    with pytest.raises(RuntimeError):  # asked for explicitly, channels-last breaks this model as it does in torch
        fit(ViewCNN(), data, FitConfig(epochs=1, batch_size=16, quiet=True, channels_last=True))


def test_fit_dict_batches_with_own_loss_and_metric():
    model = Regressor()
    data = DataSplits(Rows(256, 0), Rows(64, 1), Rows(64, 2))
    before = neg_mse(model, data.val)
    state = fit(model, data, FitConfig(epochs=4, lr=0.05, batch_size=32, quiet=True), loss_fn=mse, metric=neg_mse)
    row = state.rows[-1]
    assert row["val_acc"] is None and row["train_acc"] is None  # no class labels: no accuracy, no crash
    assert row["val_metric"] > before and math.isclose(row["val_metric"], -row["val_loss"], rel_tol=1e-5)
    loss, acc = evaluate(model, data.test, loss_fn=mse)
    assert math.isnan(acc) and loss < -before


def test_fit_from_a_dataloader_with_tensor_only_batches_and_own_loss():
    x = torch.randn(64, 6)
    ae = nn.Sequential(nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 6))
    loader = DataLoader(TensorDataset(x), batch_size=16, shuffle=True)
    data = DataSplits(loader, [x[:32]])
    def reconstruction(out, batch):  # a DataLoader over TensorDataset(x) gives [x]; the val list gives x
        return F.mse_loss(out, batch[0] if isinstance(batch, list) else batch)

    state = fit(ae, data, FitConfig(epochs=2, lr=0.05, quiet=True), loss_fn=reconstruction)
    assert state.rows[-1]["examples"] == 64 and state.rows[-1]["val_acc"] is None
    with pytest.raises(LowbitError, match="no target"):
        fit(copy.deepcopy(ae), data, FitConfig(epochs=1, quiet=True))


def test_resumed_fit_on_a_user_dataset_equals_an_uninterrupted_one():
    data = DataSplits(Rows(128, 0), Rows(32, 1))
    cfg = FitConfig(epochs=3, lr=0.05, batch_size=16, quiet=True)
    torch.manual_seed(0)
    full = Regressor()
    init = copy.deepcopy(full.state_dict())
    fit(full, data, cfg, loss_fn=mse)
    part = Regressor()
    part.load_state_dict(init)
    opt = torch.optim.SGD(part.parameters(), lr=cfg.lr)
    saved = {}

    def keep(state, optimizer):
        saved.update(model=copy.deepcopy(part.state_dict()), opt=copy.deepcopy(optimizer.state_dict()),
                     state=FitState(state.epoch, list(state.rows)))

    from lowbit.train import make_optimizer

    opt = make_optimizer(part, cfg)
    fit(part, data, cfg, optimizer=opt, loss_fn=mse, on_epoch_end=keep, stop_after=2)
    resumed = Regressor()
    resumed.load_state_dict(saved["model"])
    opt = make_optimizer(resumed, cfg)
    opt.load_state_dict(saved["opt"])
    fit(resumed, data, cfg, optimizer=opt, loss_fn=mse, start=saved["state"])
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


@pytest.mark.parametrize("kind", ["kl", "mse", "cosine"])
def test_distillation_losses(kind):
    s = torch.randn(8, 5, requires_grad=True)
    assert distill_loss(s, s.detach(), kind).item() == pytest.approx(0.0, abs=1e-6)
    t = torch.randn(8, 5)
    value = distill_loss(s, t, kind)
    if kind == "mse":
        assert value.item() == pytest.approx(F.mse_loss(s, t).item())
    elif kind == "cosine":
        assert value.item() == pytest.approx((1 - F.cosine_similarity(s, t)).mean().item(), rel=1e-5)
    value.backward()
    assert s.grad.abs().sum() > 0


def test_kl_distillation_of_dense_logits_is_a_mean_over_positions():
    """Per-pixel logits: the same value as the flattened (N·H·W, C) rows, not H·W times it (1:1 with the CE)."""
    s, t = torch.randn(2, 5, 8, 8), torch.randn(2, 5, 8, 8)
    rows = (x.permute(0, 2, 3, 1).reshape(-1, 5) for x in (s, t))
    assert distill_loss(s, t, "kl", 2.0).item() == pytest.approx(distill_loss(*rows, "kl", 2.0).item(), rel=1e-5)


def test_quantized_fine_tune_with_feature_distillation():
    teacher = Regressor()
    data = DataSplits(Rows(128, 0), Rows(32, 1))
    fit(teacher, data, FitConfig(epochs=2, lr=0.05, batch_size=16, quiet=True), loss_fn=mse)
    student = quantize_(copy.deepcopy(teacher), Plan({"a": (4, 4), "b": (8, 8)}))
    calibrate_(student, DataLoader(Rows(64, 3), batch_size=16))
    cfg = FitConfig(epochs=1, lr=0.01, batch_size=16, quiet=True, distill=True, distill_loss="mse")
    state = fit(student, data, cfg, teacher=teacher, loss_fn=mse)
    assert math.isfinite(state.rows[-1]["val_loss"])
    with pytest.raises(LowbitError, match="distillation loss"):
        FitConfig(distill_loss="l1")


def test_calibrate_with_dict_batches_from_a_dataloader():
    model = quantize_(Regressor(), Plan({"a": (4, 4), "b": (4, 8)}))
    calibrate_(model, DataLoader(Rows(64, 0), batch_size=16))
    assert all(m.input_quantizer._ready for m in quant_layers(model).values())


def test_fit_refuses_a_used_up_generator():
    x = torch.randn(8, 3)
    gen = ((x, torch.zeros(8, dtype=torch.long)) for _ in range(1))
    data = DataSplits(gen, [(x, torch.zeros(8, dtype=torch.long))])
    with pytest.raises(LowbitError, match="saw no training batch"):
        fit(nn.Linear(3, 2), data, FitConfig(epochs=2, quiet=True))
