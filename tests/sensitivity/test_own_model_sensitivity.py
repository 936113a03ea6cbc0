"""Every sensitivity method on a model the user wrote, called with dict batches, with the user's loss/metric."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.cost import profile_layers
from lowbit.data import DataSplits
from lowbit.errors import LowbitError
from lowbit.frontier import select_layers
from lowbit.quant import Plan, calibrate_, plan_of, quantize_
from lowbit.sensitivity import METHODS, score_layers
from lowbit.train import FitConfig, calibration_batches, evaluate, fit


class Tabular(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x[:, :3].sum(1)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"features": self.x[i], "target": self.y[i]}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 1)

    def forward(self, features):
        x = F.relu(self.a(features))
        x = F.relu(self.b(x)) + x
        return self.d(F.relu(self.c(x))).squeeze(-1)


def mse(out, batch):
    return F.mse_loss(out, batch["target"])


def neg_mse(model, data):
    return -evaluate(model, data, loss_fn=mse)[0]


@pytest.fixture(scope="module")
def w4a4():
    torch.manual_seed(0)
    data = DataSplits(Tabular(256, 0), Tabular(64, 1), Tabular(64, 2))
    model = Net()
    fit(model, data, FitConfig(epochs=3, lr=0.05, batch_size=32, quiet=True), loss_fn=mse)
    quantize_(model, Plan.preset("w4a4", model))
    calibrate_(model, calibration_batches(data, 32, n_batches=1))
    fit(model, data, FitConfig(epochs=1, lr=0.01, batch_size=32, quiet=True), loss_fn=mse)
    return model, data


@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_a_user_model(w4a4, method):
    model, data = w4a4
    options = {"alps": {"epochs": 0.25, "batch_size": 32}, "hessian": {"max_iter": 3, "examples": 64}}.get(method)
    table = score_layers(method, model, data, metric=neg_mse, loss=mse, options=options)
    assert set(table.layers) == {"b", "c"} and all(r.macs for r in table.rows)
    layers = profile_layers(model, data.example(1))
    plan, _, chosen = select_layers(layers, plan_of(model), table.scores, 0.5)
    assert len(chosen.chosen) >= 1 and all(plan.layers[n] == (2, 2) for n in chosen.chosen)


def test_alps_on_regression_needs_a_metric(w4a4):
    model, data = w4a4
    with pytest.raises(LowbitError, match="needs class labels"):
        score_layers("alps", model, data, loss=mse, options={"epochs": 0.25})
