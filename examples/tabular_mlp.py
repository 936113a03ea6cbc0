"""Your own MLP on tabular data, with your own loss and metric, through lowbit's Python API.

Everything here is user code: a Dataset of ``(features, label)`` rows, a residual MLP, a class-weighted
cross-entropy as the loss and macro-F1 as the metric. lowbit trains it, quantizes it to W4A4 (first and last
layers at 8 bits), fine-tunes with distillation from the fp32 teacher, scores the layers with EAGL and ALPS, and
picks a mixed 4/2-bit plan under a budget. No downloads: the data is generated.

    python examples/tabular_mlp.py                 # about half a minute on a CPU
    python examples/tabular_mlp.py --rows 400      # smaller (the test suite runs this)

The same functions are the import paths of the command-line example ``examples/tabular_cli.sh``
(``--model examples/tabular_mlp.py:make_model --data examples/tabular_mlp.py:make_data ...``).
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn

FEATURES, CLASSES = 12, 3


class Rows(torch.utils.data.Dataset):
    """Rows of a made-up tabular task: the class depends on a few features, non-linearly."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, FEATURES, generator=g)
        score = self.x[:, 0] * self.x[:, 1] + self.x[:, 2] - 0.5 * self.x[:, 3] ** 2
        self.y = torch.bucketize(score, torch.tensor([-0.8, 0.6]))  # 3 unbalanced classes

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class TabularMLP(nn.Module):
    def __init__(self, hidden: int = 64):
        super().__init__()
        self.inp = nn.Linear(FEATURES, hidden)
        self.h1 = nn.Linear(hidden, hidden)
        self.h2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, CLASSES)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.inp(features))
        x = F.relu(self.h1(x)) + x
        return self.out(F.relu(self.h2(x)))


def make_model(hidden: int = 64) -> nn.Module:
    return TabularMLP(hidden)


def make_data(rows: int = 3000) -> dict:
    """Train and test sets; lowbit holds out a seeded validation share of train for every selection."""
    return {"train": Rows(rows, 0), "test": Rows(max(200, rows // 4), 1)}


CLASS_WEIGHTS = torch.tensor([1.0, 1.0, 2.0])


def weighted_ce(outputs: torch.Tensor, batch: tuple) -> torch.Tensor:
    """The loss lowbit calls as ``loss_fn(outputs, batch)``."""
    return F.cross_entropy(outputs, batch[1], weight=CLASS_WEIGHTS.to(outputs.device))


@torch.no_grad()
def macro_f1(model: nn.Module, data) -> float:
    """The metric lowbit calls as ``metric(model, data)``; higher is better."""
    from lowbit.data import iterate

    model.eval()
    preds, labels = [], []
    for x, y in iterate(data, 256, device=next(model.parameters()).device):
        preds.append(model(x).argmax(1).cpu())
        labels.append(y.cpu())
    p, y = torch.cat(preds), torch.cat(labels)
    f1 = []
    for c in range(CLASSES):
        tp = ((p == c) & (y == c)).sum().item()
        f1.append(2 * tp / max(1, (p == c).sum().item() + (y == c).sum().item()))
    return sum(f1) / CLASSES


def main(rows: int = 3000, epochs: float = 8) -> dict:
    from lowbit.cost import profile_layers
    from lowbit.data import as_splits
    from lowbit.frontier import select_layers
    from lowbit.quant import Plan, QuantConfig, calibrate_, plan_of, quantize_
    from lowbit.sensitivity import score_layers
    from lowbit.sensitivity.candidates import example_input
    from lowbit.train import FitConfig, calibration_batches, fit

    torch.manual_seed(0)
    data = as_splits(make_data(rows), "tabular")  # (train, test) -> train / val / test
    model = make_model()
    fit(model, data, FitConfig(epochs=epochs, lr=0.05, batch_size=64, quiet=True), loss_fn=weighted_ce)
    fp32 = macro_f1(model, data.test)

    # W4A4 with the first and last layers at 8 bits, LSQ+KD fine-tune
    qmodel = quantize_(copy.deepcopy(model), Plan.preset("w4a4", model), QuantConfig(method="lsq"))
    calibrate_(qmodel, calibration_batches(data, 64, n_batches=1))
    cfg = FitConfig(epochs=max(1, epochs // 2), lr=0.01, batch_size=64, quiet=True, distill=True)
    fit(qmodel, data, cfg, teacher=model, loss_fn=weighted_ce)
    w4a4 = macro_f1(qmodel, data.test)

    # which layers may drop to 2 bits: EAGL (data-free) and ALPS (fine-tune per layer, scored by macro-F1)
    eagl = score_layers("eagl", qmodel, data)
    alps = score_layers("alps", qmodel, data, metric=macro_f1, loss=weighted_ce,
                        options={"epochs": 1, "batch_size": 64})
    layers = profile_layers(qmodel, example_input(data=data))
    plan, _, chosen = select_layers(layers, plan_of(qmodel).layers, alps.scores, 0.5)
    print(f"fp32 macro-F1 {fp32:.3f}   W4A4 (LSQ+KD) {w4a4:.3f}")
    print(f"EAGL scores  {', '.join(f'{n} {s:.3f}' for n, s in eagl.scores.items())}")
    print(f"ALPS scores  {', '.join(f'{n} {s:.3f}' for n, s in alps.scores.items())}")
    print(f"half of the candidate MACs at 2 bits: {', '.join(chosen.chosen)}")
    return {"fp32": fp32, "w4a4": w4a4, "plan": plan.to_dict(), "chosen": list(chosen.chosen)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--epochs", type=float, default=8)
    args = ap.parse_args()
    main(args.rows, args.epochs)
