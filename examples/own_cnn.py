"""Your own CNN, written the way people write CNNs, from training to a bit-exact integer model.

The network uses ``F.max_pool2d``, depthwise and grouped convolutions, ``F.relu6``, a residual add, ``torch.cat``
along channels, nearest upsampling, ``x.mean((2, 3))`` and ``x.view(x.size(0), -1)``; the data is a plain
``TensorDataset`` of float images it makes itself (no downloads). lowbit trains it, quantizes it to W4A4 with
LSQ, fine-tunes with distillation, scores the layers with EAGL, drops half of the candidate MACs to 2 bits,
fine-tunes that plan, exports it as an integer ``.lowbit`` model and checks the integer runtime against an
independent simulation, bit for bit.

    python examples/own_cnn.py                  # about a minute on a CPU
    python examples/own_cnn.py --n 600          # smaller (the test suite runs this)
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SIZE, CLASSES = 16, 4


class OwnCNN(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width)  # depthwise
        self.pw = nn.Conv2d(width, width, 1)
        self.grouped = nn.Conv2d(width, width, 3, padding=1, groups=4)
        self.mix = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.fine = nn.Conv2d(2 * width, width, 1)
        self.head = nn.Linear(width + 2 * width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = F.max_pool2d(x, 2)                                    # 16 -> 8
        y = F.relu6(self.pw(F.relu(self.dw(x)))) + x             # residual add
        z = F.relu(self.grouped(x))
        x = F.relu(self.mix(torch.cat([y, z], dim=1)))           # concatenate along channels
        coarse = F.max_pool2d(x, 2)                               # 8 -> 4
        up = F.interpolate(coarse, scale_factor=2, mode="nearest")  # back to 8
        fine = F.relu(self.fine(up))
        pooled = torch.cat([fine.mean((2, 3)), F.adaptive_avg_pool2d(x, 1).view(x.size(0), -1)], dim=1)
        return self.head(pooled)


def make_model(width: int = 16) -> nn.Module:
    return OwnCNN(width)


def make_data(n: int = 2000, seed: int = 0) -> dict:
    """Noisy images whose class is where a bright bar sits; train and test sets (lowbit holds out validation)."""
    g = torch.Generator().manual_seed(seed)

    def make(m: int) -> torch.utils.data.TensorDataset:
        y = torch.randint(0, CLASSES, (m,), generator=g)
        x = 0.4 * torch.randn(m, 1, SIZE, SIZE, generator=g)
        for k in range(CLASSES):
            x[y == k, :, 4 * k:4 * k + 3, 2:-2] += 1.5
        return torch.utils.data.TensorDataset(x, y)

    return {"train": make(n), "test": make(max(200, n // 5))}


def main(n: int = 2000, epochs: int = 4) -> dict:
    from lowbit.cost import profile_layers
    from lowbit.data import as_splits
    from lowbit.export.exporter import export_model
    from lowbit.export.simulate import Simulation
    from lowbit.frontier import select_layers
    from lowbit.quant import Plan, QuantConfig, calibrate_, plan_of, quantize_
    from lowbit.runtime.engine import IntegerModel
    from lowbit.sensitivity import score_layers
    from lowbit.train import FitConfig, calibration_batches, evaluate, fit

    torch.manual_seed(0)
    data = as_splits(make_data(n), "own-cnn")
    model = make_model()
    fit(model, data, FitConfig(epochs=epochs, lr=0.05, batch_size=64, quiet=True))
    fp32 = evaluate(model, data.test)[1]

    def quantized(plan: Plan) -> nn.Module:
        q = quantize_(copy.deepcopy(model), plan, QuantConfig(method="lsq"))
        calibrate_(q, calibration_batches(data, 64, n_batches=1))
        fit(q, data, FitConfig(epochs=max(1, epochs // 2), lr=0.01, batch_size=64, quiet=True, distill=True),
            teacher=model)
        return q

    w4a4 = quantized(Plan.preset("w4a4", model))
    eagl = score_layers("eagl", w4a4, data)
    layers = profile_layers(w4a4, data.example(1))
    plan, cost, chosen = select_layers(layers, plan_of(w4a4), eagl.scores, 0.5)
    mixed = quantized(plan)

    with tempfile.TemporaryDirectory() as tmp:
        result = export_model(mixed, Path(tmp) / "own_cnn.lowbit", input_shape=(1, SIZE, SIZE))
        runtime = IntegerModel.load(result.path)
        x = torch.stack([data.test[i][0] for i in range(len(data.test))])
        y = torch.tensor([int(data.test[i][1]) for i in range(len(data.test))])
        codes = runtime.run_int(x)                                 # integer logits of the integer runtime
        exact = torch.equal(codes, Simulation(result.lowered).run_int(x))
        logits = runtime(x)
        integer_acc = (logits.argmax(1) == y).double().mean().item()
        size = result.summary()
    print(f"fp32 test accuracy {100 * fp32:.2f}%  W4A4 {100 * evaluate(w4a4, data.test)[1]:.2f}%  "
          f"mixed 4/2 ({len(chosen.chosen)} layers at 2 bits, throughput x{cost.relative_throughput:.2f}) "
          f"{100 * evaluate(mixed, data.test)[1]:.2f}%")
    print(f"integer model: {size}; accuracy {100 * integer_acc:.2f}%; bit-exact vs simulation: {exact}")
    return {"fp32": fp32, "integer_acc": integer_acc, "bit_exact": exact, "low_layers": list(chosen.chosen)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="training images")
    ap.add_argument("--epochs", type=int, default=4)
    args = ap.parse_args()
    main(args.n, args.epochs)
